// RunJob end to end on small random Llama checkpoints.
#include "worker/engine/recipe/runner.h"

#include <ATen/ATen.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/sha256.h"
#include "tests/engine/test_util.h"
#include "worker/engine/eval/eval.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/model/safetensors_reader.h"
#include "worker/engine/quant/awq.h"
#include "worker/engine/quant/gptq.h"
#include "worker/engine/quant/packing.h"
#include "worker/engine/recipe/block_checkpoint.h"
#include "worker/engine/recipe/calibration.h"
#include "worker/engine/quant/quantized_tensor.h"
#include "worker/engine/tokenizer/bpe_trainer.h"
#include "worker/engine/tokenizer/tokenizer.h"
#include "worker/engine/tokenizer/unicode.h"

namespace compress::engine {
namespace {

namespace fs = std::filesystem;
namespace v1 = compress::v1;
using testing::ExpectInvalidArgument;
using testing::ReadBytes;
using testing::TempDir;

constexpr int kTargetsPerLayer = 7;  // q, k, v, o, gate, up, down

v1::JobSpec RtnSpec(int bits, bool symmetric, int group_size,
                    std::vector<v1::OutputFormat> outputs = {}) {
  v1::JobSpec spec;
  spec.set_name("test");
  v1::RtnStage* rtn = spec.add_stages()->mutable_rtn();
  rtn->set_bits(bits);
  rtn->set_symmetric(symmetric);
  rtn->set_group_size(group_size);
  for (v1::OutputFormat f : outputs) spec.add_outputs(f);
  return spec;
}

// Everything the callbacks saw.
struct Recorded {
  std::vector<std::tuple<double, std::string, std::string>> progress;
  std::vector<std::tuple<std::string, std::string, double, std::string>> metrics;
  RunCallbacks callbacks;
  Recorded() {
    callbacks.on_progress = [this](double f, const std::string& stage, const std::string& m) {
      progress.emplace_back(f, stage, m);
    };
    callbacks.on_metric = [this](const std::string& stage, const std::string& name, double value,
                                 const std::string& unit) {
      metrics.emplace_back(stage, name, value, unit);
    };
  }
};

class RunJobTest : public ::testing::Test {
 protected:
  // A 2-layer F16 model, one file, plus a tokenizer file to copy.
  void SetUp() override {
    RandomModelOptions options;
    options.dtype = SafetensorsDtype::kF16;
    options.seed = 42;
    model_dir_ = dir_ / "model";
    ASSERT_TRUE(WriteRandomLlamaModel(options, model_dir_).ok());
    testing::WriteBytes(model_dir_ + "/tokenizer.json", "{\"model\": {}}");
    out_dir_ = dir_ / "out";
  }

  absl::StatusOr<RunResult> Run(const v1::JobSpec& spec, const RunCallbacks& callbacks = {},
                                const std::string& model = "") {
    RunOptions options;
    options.model_path = model.empty() ? model_dir_ : model;
    options.output_dir = out_dir_;
    return RunJob(spec, options, callbacks);
  }

  // Relative paths of every file under the output folder.
  std::set<std::string> FilesInOutput() const {
    std::set<std::string> files;
    if (!fs::exists(out_dir_)) return files;
    for (const auto& entry : fs::recursive_directory_iterator(out_dir_)) {
      if (entry.is_regular_file()) files.insert(fs::relative(entry.path(), out_dir_).string());
    }
    return files;
  }

  void ExpectNothingWritten() const {
    EXPECT_TRUE(FilesInOutput().empty());
    if (fs::exists(out_dir_)) EXPECT_TRUE(fs::is_empty(out_dir_)) << "no staging folder left";
  }

  TempDir dir_;
  std::string model_dir_;
  std::string out_dir_;
};

// Every artifact exists with its size and sha256, and nothing else was written.
void ExpectArtifactsMatchDisk(const RunResult& result, const std::string& out_dir,
                              const std::set<std::string>& files_on_disk) {
  std::set<std::string> names;
  for (const ProducedArtifact& a : result.artifacts) {
    SCOPED_TRACE(a.name);
    EXPECT_TRUE(names.insert(a.name).second) << "listed twice";
    const std::string path = out_dir + "/" + a.name;
    ASSERT_TRUE(fs::exists(path));
    EXPECT_EQ(static_cast<int64_t>(fs::file_size(path)), a.size_bytes);
    EXPECT_EQ(*Sha256OfFile(path), a.sha256);
    const v1::OutputFormat expected =
        absl::StartsWith(a.name, "dequantized/") ? v1::DEQUANTIZED_SAFETENSORS
        : absl::StartsWith(a.name, "packed/")    ? v1::PACKED_SAFETENSORS
                                                 : v1::OUTPUT_FORMAT_UNSPECIFIED;
    EXPECT_EQ(a.format, expected);
  }
  EXPECT_EQ(names, files_on_disk);
}

TEST_F(RunJobTest, DequantizedAndPackedOutputsAgreeWithTheReport) {
  Recorded recorded;
  absl::StatusOr<RunResult> result =
      Run(RtnSpec(4, false, 32, {v1::DEQUANTIZED_SAFETENSORS, v1::PACKED_SAFETENSORS}),
          recorded.callbacks);
  ASSERT_TRUE(result.ok()) << result.status();

  const std::set<std::string> files = FilesInOutput();
  EXPECT_EQ(files,
            (std::set<std::string>{"dequantized/model.safetensors", "dequantized/config.json",
                                   "dequantized/tokenizer.json", "packed/model.safetensors",
                                   "packed/config.json", "packed/quantize_config.json",
                                   "packed/tokenizer.json", "report.json"}));
  ExpectArtifactsMatchDisk(*result, out_dir_, files);

  absl::StatusOr<SafetensorsCheckpoint> input = SafetensorsCheckpoint::Open(model_dir_);
  absl::StatusOr<SafetensorsCheckpoint> dequantized =
      SafetensorsCheckpoint::Open(out_dir_ + "/dequantized");
  absl::StatusOr<SafetensorsCheckpoint> packed = SafetensorsCheckpoint::Open(out_dir_ + "/packed");
  ASSERT_TRUE(input.ok() && dequantized.ok() && packed.ok());

  // Dequantized: same names, order, shapes and dtypes; only targets changed.
  const v1::StageReport& stage = result->report.stages(0);
  std::map<std::string, const v1::TensorReport*> reported;
  for (const v1::TensorReport& t : stage.tensors()) reported[t.name()] = &t;
  ASSERT_EQ(reported.size(), 2u * kTargetsPerLayer);
  ASSERT_EQ(dequantized->tensors().size(), input->tensors().size());
  int64_t before = 0, parameters = 0, quantized_parameters = 0;
  for (size_t i = 0; i < input->tensors().size(); ++i) {
    const SafetensorsTensorInfo& in = input->tensors()[i].info;
    const SafetensorsTensorInfo& out = dequantized->tensors()[i].info;
    SCOPED_TRACE(in.name);
    EXPECT_EQ(out.name, in.name);
    EXPECT_EQ(out.shape, in.shape);
    EXPECT_EQ(out.dtype, in.dtype);
    before += static_cast<int64_t>(in.NumBytes());
    parameters += in.NumElements();
    auto report = reported.find(in.name);
    if (report == reported.end()) {
      EXPECT_EQ(*dequantized->RawBytes(in.name), *input->RawBytes(in.name));
      EXPECT_EQ(*packed->RawBytes(in.name), *input->RawBytes(in.name));
      continue;
    }
    quantized_parameters += in.NumElements();
    at::Tensor original = *input->Load(in.name, at::kCPU);
    at::Tensor result_values = *dequantized->Load(in.name, at::kCPU);
    EXPECT_FALSE(original.equal(result_values));
    EXPECT_NEAR(report->second->relative_error(), RelativeError(original, result_values), 1e-12);
    EXPECT_GT(report->second->relative_error(), 0.0);
    EXPECT_LT(report->second->relative_error(), 0.15);
    EXPECT_EQ(report->second->bits(), 4);
    EXPECT_EQ(report->second->bytes_before(), static_cast<int64_t>(in.NumBytes()));
    EXPECT_EQ(report->second->bytes_after(), PackedLinearBytes(in.shape[0], in.shape[1], 4, 32));

    // Packed: the four tensors unpack to exactly the dequantized values.
    const std::string prefix = in.name.substr(0, in.name.size() - std::string(".weight").size());
    EXPECT_EQ(packed->Find(in.name), nullptr);
    PackedLinear parts;
    parts.qweight = *packed->Load(prefix + ".qweight", at::kCPU);
    parts.qzeros = *packed->Load(prefix + ".qzeros", at::kCPU);
    parts.scales = *packed->Load(prefix + ".scales", at::kCPU);
    parts.g_idx = *packed->Load(prefix + ".g_idx", at::kCPU);
    absl::StatusOr<QuantizedTensor> unpacked = UnpackLinear(parts, 4, in.name);
    ASSERT_TRUE(unpacked.ok()) << unpacked.status();
    EXPECT_EQ(unpacked->group_size, 32);
    EXPECT_TRUE(Dequantize(*unpacked, at::kHalf).equal(result_values));
  }

  // Report totals.
  const v1::JobReport& report = result->report;
  uint64_t packed_bytes = 0;
  for (const auto& shard : packed->shards()) packed_bytes += shard->header().DataSectionBytes();
  int64_t quantized_after = 0;
  double error_sum = 0;
  for (const v1::TensorReport& t : stage.tensors()) {
    quantized_after += t.bytes_after();
    error_sum += t.relative_error();
  }
  EXPECT_EQ(report.size_before_bytes(), before);
  EXPECT_EQ(report.size_after_bytes(), static_cast<int64_t>(packed_bytes));
  EXPECT_LT(report.size_after_bytes(), report.size_before_bytes());
  EXPECT_EQ(report.parameters(), parameters);
  EXPECT_EQ(report.quantized_parameters(), quantized_parameters);
  EXPECT_DOUBLE_EQ(report.bits_per_weight(), 8.0 * quantized_after / quantized_parameters);
  // 4 + 16/32 (scales) + 4/32 (zeros) + 32/out_features (g_idx, large for this tiny model).
  EXPECT_GT(report.bits_per_weight(), 4.625);
  EXPECT_LT(report.bits_per_weight(), 5.625);
  EXPECT_EQ(stage.name(), "rtn");
  EXPECT_EQ(stage.method(), "rtn");
  EXPECT_DOUBLE_EQ(stage.mean_relative_error(), error_sum / stage.tensors_size());
  EXPECT_EQ(stage.bytes_out(), quantized_after);
  EXPECT_GT(report.seconds(), 0.0);

  // report.json is the same report.
  v1::JobReport from_file;
  ASSERT_TRUE(
      google::protobuf::util::JsonStringToMessage(ReadBytes(out_dir_ + "/report.json"), &from_file)
          .ok());
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(from_file, report));

  // config.json: the dequantized one unchanged, the packed one with quantization_config.
  EXPECT_EQ(ReadBytes(out_dir_ + "/dequantized/config.json"),
            ReadBytes(model_dir_ + "/config.json"));
  nlohmann::json config = nlohmann::json::parse(ReadBytes(out_dir_ + "/packed/config.json"));
  EXPECT_EQ(config["model_type"], "llama");
  const nlohmann::json& q = config["quantization_config"];
  EXPECT_EQ(q["quant_method"], "gptq");
  EXPECT_EQ(q["bits"], 4);
  EXPECT_EQ(q["group_size"], 32);
  EXPECT_EQ(q["desc_act"], false);
  EXPECT_EQ(q["sym"], false);

  // Progress: nondecreasing, one message per tensor naming it, then done.
  ASSERT_EQ(recorded.progress.size(), reported.size() + 1);
  double last = 0;
  for (size_t i = 0; i < recorded.progress.size(); ++i) {
    const auto& [fraction, stage_name, message] = recorded.progress[i];
    EXPECT_GE(fraction, last);
    last = fraction;
    if (i + 1 < recorded.progress.size()) {
      EXPECT_EQ(stage_name, "rtn");
      // "rtn: <tensor> [shape] ..."
      const size_t begin = message.find(' ') + 1;
      const std::string tensor = message.substr(begin, message.find(' ', begin) - begin);
      EXPECT_TRUE(reported.count(tensor)) << message;
    }
  }
  EXPECT_EQ(std::get<0>(recorded.progress.back()), 1.0);

  // One metric of each kind for the stage.
  std::map<std::string, double> metrics;
  for (const auto& [stage_name, name, value, unit] : recorded.metrics) {
    EXPECT_EQ(stage_name, "rtn");
    metrics[name] = value;
  }
  EXPECT_EQ(metrics.size(), 4u);
  EXPECT_EQ(metrics[kMetricStageBytesOut], static_cast<double>(quantized_after));
  EXPECT_DOUBLE_EQ(metrics[kMetricStageMeanRelativeError], stage.mean_relative_error());
}

TEST_F(RunJobTest, ShardedInputIsMirroredInBothOutputs) {
  RandomModelOptions options;
  options.dtype = SafetensorsDtype::kBF16;
  options.max_shard_bytes = 30000;
  const std::string sharded = dir_ / "sharded";
  ASSERT_TRUE(WriteRandomLlamaModel(options, sharded).ok());

  absl::StatusOr<RunResult> result =
      Run(RtnSpec(3, true, 0, {v1::PACKED_SAFETENSORS, v1::DEQUANTIZED_SAFETENSORS}), {}, sharded);
  ASSERT_TRUE(result.ok()) << result.status();
  ExpectArtifactsMatchDisk(*result, out_dir_, FilesInOutput());

  absl::StatusOr<SafetensorsCheckpoint> input = SafetensorsCheckpoint::Open(sharded);
  absl::StatusOr<SafetensorsCheckpoint> dequantized =
      SafetensorsCheckpoint::Open(out_dir_ + "/dequantized");
  absl::StatusOr<SafetensorsCheckpoint> packed = SafetensorsCheckpoint::Open(out_dir_ + "/packed");
  ASSERT_TRUE(input.ok() && dequantized.ok() && packed.ok());
  ASSERT_TRUE(dequantized->sharded() && packed->sharded());
  ASSERT_EQ(dequantized->shards().size(), input->shards().size());
  ASSERT_EQ(packed->shards().size(), input->shards().size());
  for (size_t s = 0; s < input->shards().size(); ++s) {
    EXPECT_EQ(FileBaseName(dequantized->shards()[s]->path()),
              FileBaseName(input->shards()[s]->path()));
    EXPECT_EQ(FileBaseName(packed->shards()[s]->path()), FileBaseName(input->shards()[s]->path()));
  }
  for (const CheckpointTensor& t : input->tensors()) {
    SCOPED_TRACE(t.info.name);
    const CheckpointTensor* d = dequantized->Find(t.info.name);
    ASSERT_NE(d, nullptr);
    EXPECT_EQ(d->shard, t.shard);
    EXPECT_EQ(d->info.dtype, SafetensorsDtype::kBF16);
    if (absl::StrContains(t.info.name, "proj")) {
      const std::string prefix = t.info.name.substr(0, t.info.name.size() - 7);
      const CheckpointTensor* qweight = packed->Find(prefix + ".qweight");
      ASSERT_NE(qweight, nullptr);
      EXPECT_EQ(qweight->shard, t.shard) << "packed parts stay in the input's shard";
      PackedLinear parts{
          *packed->Load(prefix + ".qweight", at::kCPU), *packed->Load(prefix + ".qzeros", at::kCPU),
          *packed->Load(prefix + ".scales", at::kCPU), *packed->Load(prefix + ".g_idx", at::kCPU)};
      EXPECT_EQ(parts.scales.size(0), 1) << "per channel: one group";
      absl::StatusOr<QuantizedTensor> unpacked = UnpackLinear(parts, 3, t.info.name);
      ASSERT_TRUE(unpacked.ok()) << unpacked.status();
      EXPECT_TRUE(
          Dequantize(*unpacked, at::kBFloat16).equal(*dequantized->Load(t.info.name, at::kCPU)));
    } else {
      EXPECT_EQ(*packed->RawBytes(t.info.name), *input->RawBytes(t.info.name));
    }
  }
  nlohmann::json config = nlohmann::json::parse(ReadBytes(out_dir_ + "/packed/config.json"));
  EXPECT_EQ(config["quantization_config"]["quant_method"], "gptq");
  EXPECT_EQ(config["quantization_config"]["bits"], 3);
  EXPECT_EQ(config["quantization_config"]["group_size"], -1);
  EXPECT_EQ(config["quantization_config"]["sym"], true);
}

TEST_F(RunJobTest, CancellationReturnsCancelledAndLeavesNoFinishedLookingFiles) {
  for (int cancel_after : {0, 3, 13}) {
    SCOPED_TRACE(cancel_after);
    int progress_calls = 0;
    RunCallbacks callbacks;
    callbacks.on_progress = [&](double, const std::string&, const std::string&) {
      ++progress_calls;
    };
    callbacks.is_cancelled = [&] { return progress_calls >= cancel_after; };
    absl::StatusOr<RunResult> result =
        Run(RtnSpec(4, true, 32, {v1::DEQUANTIZED_SAFETENSORS, v1::PACKED_SAFETENSORS}), callbacks);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled) << result.status();
    EXPECT_EQ(progress_calls, cancel_after) << "stopped between tensors";
    ExpectNothingWritten();
  }
}

TEST_F(RunJobTest, IncludeAndExcludePatternsAreHonoured) {
  absl::StatusOr<SafetensorsCheckpoint> input = SafetensorsCheckpoint::Open(model_dir_);
  ASSERT_TRUE(input.ok());
  struct Case {
    std::vector<std::string> include, exclude;
    std::function<bool(const std::string&)> expect_quantized;
  };
  const Case cases[] = {
      {{},
       {"down_proj", R"(layers\.1\.self_attn)"},
       [](const std::string& n) {
         return absl::StrContains(n, "layers.") && absl::StrContains(n, "proj") &&
                !absl::StrContains(n, "down_proj") && !absl::StrContains(n, "layers.1.self_attn");
       }},
      {{"^lm_head"}, {}, [](const std::string& n) { return n == "lm_head.weight"; }},
      {{"embed_tokens", "mlp"},
       {"layers\\.0\\."},
       [](const std::string& n) {
         return n == "model.embed_tokens.weight" || absl::StrContains(n, "layers.1.mlp");
       }},
  };
  for (const Case& c : cases) {
    v1::JobSpec spec = RtnSpec(8, false, 0);
    for (const std::string& p : c.include) spec.mutable_stages(0)->mutable_rtn()->add_include(p);
    for (const std::string& p : c.exclude) spec.mutable_stages(0)->mutable_rtn()->add_exclude(p);
    SCOPED_TRACE(spec.ShortDebugString());
    absl::StatusOr<RunResult> result = Run(spec);
    ASSERT_TRUE(result.ok()) << result.status();
    absl::StatusOr<SafetensorsCheckpoint> out =
        SafetensorsCheckpoint::Open(out_dir_ + "/dequantized");
    ASSERT_TRUE(out.ok());
    std::set<std::string> reported;
    for (const v1::TensorReport& t : result->report.stages(0).tensors()) reported.insert(t.name());
    for (const CheckpointTensor& t : input->tensors()) {
      const bool quantized = c.expect_quantized(t.info.name);
      EXPECT_EQ(reported.count(t.info.name) == 1, quantized) << t.info.name;
      EXPECT_EQ(*out->RawBytes(t.info.name) != *input->RawBytes(t.info.name), quantized)
          << t.info.name;
    }
  }
}

TEST_F(RunJobTest, PatternsMatchingNothingAreInvalidArgumentNamingThePattern) {
  auto with = [](const std::string& include, const std::string& exclude) {
    v1::JobSpec spec = RtnSpec(4, false, 0);
    if (!include.empty()) spec.mutable_stages(0)->mutable_rtn()->add_include(include);
    if (!exclude.empty()) spec.mutable_stages(0)->mutable_rtn()->add_exclude(exclude);
    return spec;
  };
  ExpectInvalidArgument(Run(with("q_projection", "")).status(), {"'q_projection'", "matches no"});
  ExpectInvalidArgument(Run(with("", "no_such_tensor")).status(),
                        {"'no_such_tensor'", "matches no"});
  ExpectInvalidArgument(Run(with("input_layernorm", "")).status(),
                        {"'input_layernorm'", "2-D"});  // only 1-D tensors match
  ExpectInvalidArgument(Run(with("proj(", "")).status(), {"'proj('", "RE2"});
  ExpectInvalidArgument(Run(with("", "proj")).status(), {"leave no tensor"});
  ExpectNothingWritten();
}

TEST_F(RunJobTest, GroupSizeThatDoesNotDivideIsInvalidArgumentBeforeAnyWork) {
  Recorded recorded;
  absl::Status status = Run(RtnSpec(4, false, 48), recorded.callbacks).status();
  ExpectInvalidArgument(status,
                        {"model.layers.0.self_attn.q_proj.weight", "[64, 64]", "group_size 48"});
  EXPECT_TRUE(recorded.progress.empty());
  ExpectNothingWritten();
  // 128 divides the MLP's in_features but not attention's 64.
  ExpectInvalidArgument(Run(RtnSpec(4, false, 128)).status(), {"[64, 64]", "group_size 128"});
}

TEST_F(RunJobTest, SleepStageHoldsTheJobAndChangesNothing) {
  v1::JobSpec spec;
  v1::Stage* sleep = spec.add_stages();
  sleep->set_name("nap");
  sleep->mutable_sleep()->set_millis_per_tensor(5);
  Recorded recorded;
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<RunResult> result = Run(spec, recorded.callbacks);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_GE(std::chrono::steady_clock::now() - start,
            std::chrono::milliseconds(5 * 2 * kTargetsPerLayer));
  EXPECT_EQ(ReadBytes(out_dir_ + "/dequantized/model.safetensors"),
            ReadBytes(model_dir_ + "/model.safetensors"));
  ASSERT_EQ(result->report.stages_size(), 1);
  EXPECT_EQ(result->report.stages(0).name(), "nap");
  EXPECT_EQ(result->report.stages(0).method(), "sleep");
  EXPECT_EQ(result->report.stages(0).bytes_in(), result->report.stages(0).bytes_out());
  EXPECT_EQ(result->report.quantized_parameters(), 0);
  EXPECT_EQ(result->report.size_after_bytes(), result->report.size_before_bytes());
  EXPECT_EQ(recorded.progress.size(), 2u * kTargetsPerLayer + 1);
  EXPECT_EQ(std::get<1>(recorded.progress.front()), "nap");
}

TEST_F(RunJobTest, StagesRunInOrderOnEachTensor) {
  v1::JobSpec spec = RtnSpec(4, false, 32, {v1::PACKED_SAFETENSORS});
  spec.mutable_stages()->Add()->mutable_sleep()->set_millis_per_tensor(0);
  spec.mutable_stages()->SwapElements(0, 1);  // sleep, then rtn
  Recorded recorded;
  absl::StatusOr<RunResult> result = Run(spec, recorded.callbacks);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->report.stages_size(), 2);
  EXPECT_EQ(result->report.stages(0).method(), "sleep");
  EXPECT_EQ(result->report.stages(1).method(), "rtn");
  ASSERT_EQ(recorded.progress.size(), 2u * 2 * kTargetsPerLayer + 1);
  EXPECT_EQ(std::get<1>(recorded.progress[0]), "sleep");
  EXPECT_EQ(std::get<1>(recorded.progress[1]), "rtn");
  EXPECT_EQ(recorded.metrics.size(), 8u);
  EXPECT_FALSE(fs::exists(out_dir_ + "/dequantized")) << "only the requested output";
  EXPECT_TRUE(fs::exists(out_dir_ + "/packed/model.safetensors"));
}

TEST_F(RunJobTest, BadRequestsAndModelsAreRejectedWithTheRightCode) {
  RunOptions options;
  options.model_path = model_dir_;
  options.output_dir = out_dir_;
  options.device = "tpu:0";
  EXPECT_EQ(RunJob(RtnSpec(4, false, 0), options, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  if (!at::hasCUDA()) {
    options.device = "cuda:0";
    EXPECT_EQ(RunJob(RtnSpec(4, false, 0), options, {}).status().code(),
              absl::StatusCode::kFailedPrecondition);
  }
  ExpectInvalidArgument(Run(v1::JobSpec()).status(), {"no stages"});
  ExpectInvalidArgument(Run(RtnSpec(9, false, 0)).status(), {"bits 9"});
  // Packed 4-bit (GPTQ's loaders) and 5-bit (the bit stream) cannot share a checkpoint.
  v1::JobSpec mixed = RtnSpec(4, false, 0, {v1::PACKED_SAFETENSORS});
  mixed.mutable_stages(0)->mutable_rtn()->add_exclude("down_proj");
  *mixed.add_stages() = RtnSpec(5, false, 0).stages(0);
  mixed.mutable_stages(1)->mutable_rtn()->add_include("down_proj");
  ExpectInvalidArgument(Run(mixed).status(), {"different loaders", "4-bit", "5-bit"});
  EXPECT_TRUE(Run(RtnSpec(4, false, 0), {}, dir_ / "missing").status().code() ==
              absl::StatusCode::kNotFound);

  // A malformed checkpoint: the header lies about an offset.
  std::string bytes = ReadBytes(model_dir_ + "/model.safetensors");
  bytes.resize(bytes.size() - 2);
  testing::WriteBytes(model_dir_ + "/model.safetensors", bytes);
  ExpectInvalidArgument(Run(RtnSpec(4, false, 0)).status(),
                        {model_dir_ + "/model.safetensors", "tensor 'lm_head.weight'"});
  ExpectNothingWritten();
}

TEST_F(RunJobTest, SingleFileInputAndRerunsReplaceEarlierOutputs) {
  const std::string file = model_dir_ + "/model.safetensors";
  absl::StatusOr<RunResult> first =
      Run(RtnSpec(2, false, 64, {v1::DEQUANTIZED_SAFETENSORS, v1::PACKED_SAFETENSORS}), {}, file);
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<RunResult> second = Run(RtnSpec(8, false, 64), {}, file);
  ASSERT_TRUE(second.ok()) << second.status();
  const std::set<std::string> files = FilesInOutput();
  ExpectArtifactsMatchDisk(*second, out_dir_, files);
  EXPECT_EQ(std::distance(fs::directory_iterator(out_dir_), fs::directory_iterator()), 2)
      << "dequantized/ and report.json: the first run's packed/ is gone, nothing hidden left";
  EXPECT_LT(second->report.stages(0).mean_relative_error(),
            first->report.stages(0).mean_relative_error());
}

// ------------------------------------------------------------------ evaluate

// A random Llama with a tokenizer trained on a small text, and a text to
// evaluate on.
// Progress never goes back and ends at 1.
bool ExpectProgressOrdered(const Recorded& recorded) {
  for (size_t i = 1; i < recorded.progress.size(); ++i) {
    if (std::get<0>(recorded.progress[i]) < std::get<0>(recorded.progress[i - 1])) return false;
  }
  return !recorded.progress.empty() && std::get<0>(recorded.progress.back()) == 1.0;
}

class EvaluateStageTest : public RunJobTest {
 protected:
  void SetUp() override {
    std::string text;
    for (int i = 0; i < 30; ++i) {
      text += "and the light shineth in darkness; and the darkness comprehended it not. ";
    }
    BpeTrainerOptions trainer;
    trainer.vocab_size = 300;
    absl::StatusOr<std::string> json = TrainByteLevelBpe(text, trainer);
    ASSERT_TRUE(json.ok());
    absl::StatusOr<Tokenizer> tokenizer = Tokenizer::FromJson(*json, "trained.json");
    ASSERT_TRUE(tokenizer.ok());
    RandomModelOptions options;
    options.vocab_size = tokenizer->vocab_size();
    options.init_std = 0.1;  // peaked enough that quantization moves the measures
    options.seed = 9;
    model_dir_ = dir_ / "model";
    ASSERT_TRUE(WriteRandomLlamaModel(options, model_dir_).ok());
    testing::WriteBytes(model_dir_ + "/tokenizer.json", *json);
    text_path_ = dir_ / "eval.txt";
    testing::WriteBytes(text_path_, text);
    tokens_ = tokenizer->Encode(text);
    tokenizer_.emplace(std::move(*tokenizer));
    out_dir_ = dir_ / "out";
  }

  v1::JobSpec Spec(int bits, std::vector<v1::OutputFormat> outputs) const {
    v1::JobSpec spec = bits > 0 ? RtnSpec(bits, false, 32, std::move(outputs)) : v1::JobSpec();
    if (bits == 0) {
      for (v1::OutputFormat f : outputs) spec.add_outputs(f);
    }
    v1::EvaluateStage* evaluate = spec.add_stages()->mutable_evaluate();
    evaluate->set_text_path(text_path_);
    evaluate->set_context_length(32);
    evaluate->set_stride(16);
    evaluate->set_sample_prompt("and the light");
    evaluate->set_sample_tokens(5);
    return spec;
  }

  PerplexityOptions Windows() const {
    PerplexityOptions windows;
    windows.context_length = 32;
    windows.stride = 16;
    return windows;
  }

  // The samples a job calibrated with 8 x 32 tokens of the text saw.
  at::Tensor CalibrationSamples() const {
    CalibrationSampleOptions options;
    options.num_samples = 8;
    options.sequence_length = 32;
    options.vocab_size = tokenizer_->vocab_size();
    return *LoadCalibrationSamples(text_path_, &*tokenizer_, options);
  }

  std::string Sample(const LlamaModel& model) const {
    GenerateOptions greedy;
    greedy.max_new_tokens = 5;
    return ToValidUtf8(SampleText(model, *tokenizer_, "and the light", greedy)->completion);
  }

  std::string text_path_;
  std::vector<int32_t> tokens_;
  std::optional<Tokenizer> tokenizer_;
};

TEST_F(EvaluateStageTest, ReportsTheOriginalAndTheWrittenModelOnTheSameWindows) {
  Recorded recorded;
  absl::StatusOr<RunResult> result =
      Run(Spec(3, {v1::DEQUANTIZED_SAFETENSORS}), recorded.callbacks);
  ASSERT_TRUE(result.ok()) << result.status();
  const v1::EvaluationReport& evaluation = result->report.evaluation();

  // Each figure is what eval/ computes on the models on disk.
  const LlamaModel original = *LlamaModel::Load(model_dir_);
  const LlamaModel written = *LlamaModel::Load(out_dir_ + "/dequantized");
  const PerplexityResult before = *Perplexity(original, tokens_, Windows());
  const DivergenceResult divergence = *CompareToReference(original, written, tokens_, Windows());
  EXPECT_NEAR(evaluation.before().perplexity(), before.perplexity, 1e-9 * before.perplexity);
  EXPECT_NEAR(evaluation.after().perplexity(), divergence.candidate.perplexity,
              1e-9 * divergence.candidate.perplexity);
  EXPECT_EQ(evaluation.before().tokens_scored(), static_cast<int64_t>(tokens_.size()) - 1);
  EXPECT_NEAR(evaluation.mean_kl_divergence(), divergence.mean_kl, 1e-12);
  EXPECT_GT(evaluation.mean_kl_divergence(), 0.0);
  EXPECT_GE(evaluation.max_kl_divergence(), evaluation.mean_kl_divergence());
  EXPECT_EQ(evaluation.top1_agreement(), divergence.top1_agreement);
  EXPECT_EQ(evaluation.context_length(), 32);
  EXPECT_EQ(evaluation.stride(), 16);
  EXPECT_EQ(evaluation.before().sample(), Sample(original));
  EXPECT_EQ(evaluation.after().sample(), Sample(written));
  EXPECT_FALSE(evaluation.before().sample().empty());

  ASSERT_EQ(result->report.stages_size(), 2);
  EXPECT_EQ(result->report.stages(1).method(), "evaluate");
  std::set<std::string> metric_names;
  for (const auto& [stage, name, value, unit] : recorded.metrics) {
    if (stage == "evaluate") metric_names.insert(name);
  }
  EXPECT_EQ(metric_names, (std::set<std::string>{"perplexity_before", "perplexity_after",
                                                  "mean_kl_divergence", "top1_agreement",
                                                  kMetricStageSeconds}));
  // Progress stays ordered through the evaluation and ends at 1.
  for (size_t i = 1; i < recorded.progress.size(); ++i) {
    EXPECT_GE(std::get<0>(recorded.progress[i]), std::get<0>(recorded.progress[i - 1]));
  }
  EXPECT_EQ(std::get<0>(recorded.progress.back()), 1.0);
}

TEST_F(EvaluateStageTest, FewerBitsDivergeMoreAndAnUnchangedModelNotAtAll) {
  absl::StatusOr<RunResult> unchanged = Run(Spec(0, {}));
  ASSERT_TRUE(unchanged.ok()) << unchanged.status();
  const v1::EvaluationReport& same = unchanged->report.evaluation();
  EXPECT_EQ(same.mean_kl_divergence(), 0.0);
  EXPECT_EQ(same.top1_agreement(), 1.0);
  EXPECT_EQ(same.before().perplexity(), same.after().perplexity());
  EXPECT_EQ(same.before().sample(), same.after().sample());

  absl::StatusOr<RunResult> eight = Run(Spec(8, {}));
  absl::StatusOr<RunResult> two = Run(Spec(2, {}));
  ASSERT_TRUE(eight.ok() && two.ok());
  EXPECT_GT(eight->report.evaluation().mean_kl_divergence(), 0.0);
  EXPECT_LT(eight->report.evaluation().mean_kl_divergence(),
            two->report.evaluation().mean_kl_divergence());
  EXPECT_GT(eight->report.evaluation().top1_agreement(), two->report.evaluation().top1_agreement());
}

TEST_F(EvaluateStageTest, PackedOnlyJobsEvaluateWithoutPublishingTheDequantizedModel) {
  absl::StatusOr<RunResult> packed = Run(Spec(3, {v1::PACKED_SAFETENSORS}));
  ASSERT_TRUE(packed.ok()) << packed.status();
  const std::set<std::string> files = FilesInOutput();
  ExpectArtifactsMatchDisk(*packed, out_dir_, files);
  for (const std::string& file : files) EXPECT_FALSE(absl::StartsWith(file, "dequantized")) << file;
  absl::StatusOr<RunResult> both = Run(Spec(3, {v1::DEQUANTIZED_SAFETENSORS}));
  ASSERT_TRUE(both.ok());
  EXPECT_EQ(packed->report.evaluation().after().perplexity(),
            both->report.evaluation().after().perplexity());
}

TEST_F(EvaluateStageTest, NeedsATokenizerAndATextBeforeAnythingIsPublished) {
  v1::JobSpec spec = Spec(4, {});
  spec.mutable_stages(1)->mutable_evaluate()->set_text_path(dir_ / "missing.txt");
  EXPECT_EQ(Run(spec).status().code(), absl::StatusCode::kNotFound);
  ExpectNothingWritten();
  fs::remove(model_dir_ + "/tokenizer.json");
  ExpectInvalidArgument(Run(Spec(4, {})).status(), {"evaluate", "tokenizer.json"});
  ExpectNothingWritten();
  // A checkpoint without config.json cannot be evaluated.
  fs::remove(model_dir_ + "/config.json");
  EXPECT_FALSE(Run(Spec(4, {})).ok());
  ExpectNothingWritten();
}

// ------------------------------------------------------------------ gptq

// Records the inputs of one linear as float64 rows.
class InputRecorder : public LinearHook {
 public:
  InputRecorder(int64_t layer, std::string linear) : layer_(layer), linear_(std::move(linear)) {}
  absl::Status OnLinearInput(int64_t layer, absl::string_view linear,
                             const at::Tensor& input) override {
    if (layer == layer_ && linear == linear_) {
      rows.push_back(input.reshape({-1, input.size(-1)}).to(at::kDouble));
    }
    return absl::OkStatus();
  }
  at::Tensor XtX() const {
    const at::Tensor x = at::cat(rows);
    return x.t().mm(x);
  }
  std::vector<at::Tensor> rows;

 private:
  int64_t layer_;
  std::string linear_;
};

TEST_F(EvaluateStageTest, GptqJobsBeatRtnOnTheLayersOutputErrorAndPackTheSameWay) {
  auto spec_for = [&](bool gptq) {
    v1::JobSpec spec = Spec(3, {v1::DEQUANTIZED_SAFETENSORS, v1::PACKED_SAFETENSORS});
    if (gptq) {
      v1::GptqStage* stage = spec.mutable_stages(0)->mutable_gptq();
      stage->set_bits(3);
      stage->set_group_size(32);
    }
    spec.mutable_calibration()->set_path(text_path_);
    spec.mutable_calibration()->set_num_samples(8);
    spec.mutable_calibration()->set_sequence_length(32);
    return spec;
  };
  Recorded recorded;
  absl::StatusOr<RunResult> gptq = Run(spec_for(true), recorded.callbacks);
  ASSERT_TRUE(gptq.ok()) << gptq.status();
  const std::string gptq_out = dir_ / "gptq";
  fs::rename(out_dir_, gptq_out);
  absl::StatusOr<RunResult> rtn = Run(spec_for(false));
  ASSERT_TRUE(rtn.ok()) << rtn.status();

  // Layer 0's q_proj sees the original model's inputs: the test can compute
  // its Hessian on the same calibration samples.
  const std::string name = "model.layers.0.self_attn.q_proj.weight";
  const at::Tensor samples = CalibrationSamples();
  const LlamaModel original = *LlamaModel::Load(model_dir_);
  InputRecorder recorder(0, "self_attn.q_proj");
  ASSERT_TRUE(original.Forward(samples, nullptr, &recorder).ok());
  const at::Tensor h = recorder.XtX();
  const at::Tensor w = *original.checkpoint().Load(name, at::kCPU);
  const at::Tensor w_gptq = *SafetensorsCheckpoint::Open(gptq_out + "/dequantized")->Load(name, at::kCPU);
  const at::Tensor w_rtn = *SafetensorsCheckpoint::Open(out_dir_ + "/dequantized")->Load(name, at::kCPU);
  const double gptq_error = RelativeOutputError(w, w_gptq, h);
  EXPECT_LT(gptq_error, 0.8 * RelativeOutputError(w, w_rtn, h));

  // The report's output error for every tensor, and the same figure here.
  const v1::StageReport& stage = gptq->report.stages(0);
  EXPECT_EQ(stage.method(), "gptq");
  ASSERT_EQ(stage.tensors_size(), 2 * kTargetsPerLayer);
  for (const v1::TensorReport& t : stage.tensors()) {
    EXPECT_GT(t.output_error(), 0.0) << t.name();
    EXPECT_LT(t.output_error(), t.rtn_output_error()) << t.name();
    if (t.name() == name) {
      EXPECT_NEAR(t.output_error(), gptq_error, 1e-3 * gptq_error);
      // The baseline is RTN's figure on the same inputs.
      const double rtn_error = RelativeOutputError(w, w_rtn, h);
      EXPECT_NEAR(t.rtn_output_error(), rtn_error, 1e-3 * rtn_error);
    }
  }
  double output_error_sum = 0;
  for (const v1::TensorReport& t : stage.tensors()) output_error_sum += t.output_error();
  EXPECT_NEAR(stage.mean_output_error(), output_error_sum / stage.tensors_size(), 1e-12);
  bool metric_seen = false;
  for (const auto& [stage_name, metric, value, unit] : recorded.metrics) {
    if (metric == kMetricStageMeanOutputError) {
      metric_seen = true;
      EXPECT_DOUBLE_EQ(value, stage.mean_output_error());
    }
  }
  EXPECT_TRUE(metric_seen);
  EXPECT_EQ(rtn->report.stages(0).mean_output_error(), 0.0) << "RTN collects no statistics";
  // Less output error, less divergence on the text.
  EXPECT_LT(gptq->report.evaluation().mean_kl_divergence(),
            rtn->report.evaluation().mean_kl_divergence());

  // The packed checkpoint holds exactly the dequantized values.
  const SafetensorsCheckpoint packed = *SafetensorsCheckpoint::Open(gptq_out + "/packed");
  const std::string prefix = "model.layers.1.mlp.down_proj";
  PackedLinear parts;
  parts.qweight = *packed.Load(prefix + ".qweight", at::kCPU);
  parts.qzeros = *packed.Load(prefix + ".qzeros", at::kCPU);
  parts.scales = *packed.Load(prefix + ".scales", at::kCPU);
  parts.g_idx = *packed.Load(prefix + ".g_idx", at::kCPU);
  absl::StatusOr<QuantizedTensor> unpacked = UnpackLinear(parts, 3, prefix);
  ASSERT_TRUE(unpacked.ok()) << unpacked.status();
  EXPECT_TRUE(Dequantize(*unpacked, at::kFloat)
                  .equal(*SafetensorsCheckpoint::Open(gptq_out + "/dequantized")
                              ->Load(prefix + ".weight", at::kCPU)));
  EXPECT_TRUE(ExpectProgressOrdered(recorded));
}

TEST_F(EvaluateStageTest, AwqAndHqqJobsLoseLessThanRtn) {
  auto spec_for = [&](const std::string& method) {
    v1::JobSpec spec = Spec(3, {v1::DEQUANTIZED_SAFETENSORS});
    if (method == "awq") {
      v1::AwqStage* awq = spec.mutable_stages(0)->mutable_awq();
      awq->set_bits(3);
      awq->set_group_size(32);
    } else if (method == "hqq") {
      v1::HqqStage* hqq = spec.mutable_stages(0)->mutable_hqq();
      hqq->set_bits(3);
      hqq->set_group_size(32);
    }
    spec.mutable_calibration()->set_path(text_path_);
    spec.mutable_calibration()->set_num_samples(8);
    spec.mutable_calibration()->set_sequence_length(32);
    return spec;
  };
  std::map<std::string, RunResult> results;
  for (const std::string method : {"awq", "hqq", "rtn"}) {
    Recorded recorded;
    absl::StatusOr<RunResult> result = Run(spec_for(method), recorded.callbacks);
    ASSERT_TRUE(result.ok()) << method << ": " << result.status();
    EXPECT_EQ(result->report.stages(0).method(), method);
    EXPECT_TRUE(ExpectProgressOrdered(recorded));
    results[method] = *result;
    fs::rename(out_dir_, dir_ / method);
  }

  // AWQ: layer 0's input is the original model's embedding of the samples,
  // so the test can run block 0 itself. The written model computes
  // x * (g / s) through W * s: the effective weights are the written ones
  // divided by s = g / g_written.
  const at::Tensor samples = CalibrationSamples();
  const LlamaModel original = *LlamaModel::Load(model_dir_);
  const SafetensorsCheckpoint awq = *SafetensorsCheckpoint::Open(dir_ / "awq/dequantized");
  const SafetensorsCheckpoint rtn = *SafetensorsCheckpoint::Open(dir_ / "rtn/dequantized");
  const std::string norm = "model.layers.0.input_layernorm.weight";
  const at::Tensor scales =
      *original.checkpoint().Load(norm, at::kCPU) / *awq.Load(norm, at::kCPU);
  const DecoderBlockWeights block =
      *LoadDecoderBlock(original.checkpoint(), original.config(), 0, at::kCPU, at::kFloat);
  const at::Tensor hidden =
      *Embed(*original.checkpoint().Load("model.embed_tokens.weight", at::kCPU), samples);
  const RotaryCache rope = *MakeRotaryCache(original.config(), 0, 32, at::kCPU, at::kFloat);
  const at::Tensor reference = *DecoderBlockForward(original.config(), block, hidden, rope, nullptr, nullptr);
  // Block 0's output error with its q/k/v from `written` (divided by `s`).
  auto attention_error = [&](const SafetensorsCheckpoint& written, const at::Tensor& s) {
    DecoderBlockWeights trial = block;
    for (LinearWeights* linear : {&trial.q_proj, &trial.k_proj, &trial.v_proj}) {
      const std::string name = linear == &trial.q_proj   ? "q_proj"
                               : linear == &trial.k_proj ? "k_proj"
                                                         : "v_proj";
      linear->weight =
          *written.Load(absl::StrCat("model.layers.0.self_attn.", name, ".weight"), at::kCPU) / s;
    }
    const at::Tensor out = *DecoderBlockForward(original.config(), trial, hidden, rope, nullptr, nullptr);
    return (out - reference).to(at::kDouble).square().sum().item<double>();
  };
  // The search tries no scaling too: never worse than RTN on its measure.
  EXPECT_LE(attention_error(awq, scales), attention_error(rtn, at::ones_like(scales)) * 1.001);
  // The report's output error is the layer's own, on the inputs it saw.
  InputRecorder recorder(0, "self_attn.q_proj");
  ASSERT_TRUE(original.Forward(samples, nullptr, &recorder).ok());
  const std::string q_name = "model.layers.0.self_attn.q_proj.weight";
  const double q_error = RelativeOutputError(*original.checkpoint().Load(q_name, at::kCPU),
                                             *awq.Load(q_name, at::kCPU) / scales, recorder.XtX());
  bool reported = false;
  for (const v1::TensorReport& t : results["awq"].report.stages(0).tensors()) {
    if (t.name() != q_name) continue;
    reported = true;
    EXPECT_NEAR(t.output_error(), q_error, 1e-3 * q_error);
  }
  EXPECT_TRUE(reported);

  // HQQ keeps, per group, the fit with the least squared error, RTN's included.
  EXPECT_LT(results["hqq"].report.stages(0).mean_relative_error(),
            results["rtn"].report.stages(0).mean_relative_error());
}

TEST_F(EvaluateStageTest, GptqRefusesTensorsOutsideTheBlocksAndMissingCalibration) {
  v1::JobSpec spec;
  v1::GptqStage* gptq = spec.add_stages()->mutable_gptq();
  gptq->set_bits(4);
  gptq->add_include("lm_head");
  spec.mutable_calibration()->set_path(text_path_);
  ExpectInvalidArgument(Run(spec).status(), {"lm_head.weight", "not a linear of a decoder block"});
  ExpectNothingWritten();
  gptq->clear_include();
  spec.mutable_calibration()->clear_path();
  ExpectInvalidArgument(Run(spec).status(), {"calibration.path"});
  ExpectNothingWritten();
  spec.mutable_calibration()->set_path(text_path_);
  spec.mutable_calibration()->set_sequence_length(100000);
  ExpectInvalidArgument(Run(spec).status(), {"eval.txt", "sequence_length 100000"});
  ExpectNothingWritten();
}

// ------------------------------------------------------------------ block ranges

// Relative path -> bytes of every file under `dir`, report.json aside (it
// holds timings).
std::map<std::string, std::string> OutputFiles(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (!entry.is_regular_file()) continue;
    const std::string name = fs::relative(entry.path(), dir).string();
    if (name == kReportFileName) continue;
    files[name] = testing::ReadBytes(entry.path().string());
  }
  return files;
}

class BlockRangeTest : public EvaluateStageTest {
 protected:
  // GPTQ 3-bit on every block, every output kind, GGUF with importance.
  v1::JobSpec GptqSpec(v1::Propagation propagation) const {
    v1::JobSpec spec = Spec(3, {v1::DEQUANTIZED_SAFETENSORS, v1::PACKED_SAFETENSORS});
    v1::GptqStage* stage = spec.mutable_stages(0)->mutable_gptq();
    stage->set_bits(3);
    stage->set_group_size(32);
    spec.mutable_calibration()->set_path(text_path_);
    spec.mutable_calibration()->set_num_samples(8);
    spec.mutable_calibration()->set_sequence_length(32);
    spec.mutable_calibration()->set_propagation(propagation);
    v1::GgufOutput* gguf = spec.add_gguf();
    gguf->set_preset("Q4_K_M");
    gguf->set_importance(true);
    return spec;
  }

  absl::StatusOr<RunResult> RunPart(const v1::JobSpec& spec, RunOptions::Part part,
                                    const std::string& out, int64_t first, int64_t end,
                                    const RunCallbacks& callbacks = {},
                                    std::set<int64_t> finished = {},
                                    const std::string& checkpoints = "") {
    RunOptions options;
    options.model_path = model_dir_;
    options.output_dir = out;
    options.part = part;
    options.first_layer = first;
    options.end_layer = end;
    options.finished_layers = std::move(finished);
    options.checkpoint_dir = checkpoints;
    return RunJob(spec, options, callbacks);
  }

  // Copies every block checkpoint under `from` into `to`.
  static void GatherCheckpoints(const std::string& from, const std::string& to) {
    fs::create_directories(fs::path(to) / kBlockCheckpointDir);
    for (const auto& entry : fs::directory_iterator(fs::path(from) / kBlockCheckpointDir)) {
      fs::copy_file(entry.path(), fs::path(to) / kBlockCheckpointDir / entry.path().filename(),
                    fs::copy_options::overwrite_existing);
    }
  }

  static void ExpectSameReports(const v1::JobReport& a, const v1::JobReport& b) {
    ASSERT_EQ(a.stages_size(), b.stages_size());
    for (int s = 0; s < a.stages_size(); ++s) {
      ASSERT_EQ(a.stages(s).tensors_size(), b.stages(s).tensors_size());
      for (int t = 0; t < a.stages(s).tensors_size(); ++t) {
        EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(a.stages(s).tensors(t),
                                                                       b.stages(s).tensors(t)))
            << a.stages(s).tensors(t).name();
      }
      EXPECT_EQ(a.stages(s).bytes_in(), b.stages(s).bytes_in());
      EXPECT_EQ(a.stages(s).bytes_out(), b.stages(s).bytes_out());
    }
    EXPECT_EQ(a.evaluation().after().perplexity(), b.evaluation().after().perplexity());
    EXPECT_EQ(a.evaluation().mean_kl_divergence(), b.evaluation().mean_kl_divergence());
    ASSERT_EQ(a.gguf_size(), b.gguf_size());
    for (int g = 0; g < a.gguf_size(); ++g) {
      EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(a.gguf(g), b.gguf(g)));
    }
  }
};

TEST_F(BlockRangeTest, RangesOnSeparateRunsAssembleToTheWholeRunsBytes) {
  const v1::JobSpec spec = GptqSpec(v1::PROPAGATION_PARALLEL);
  const std::string whole_dir = dir_ / "whole";
  absl::StatusOr<RunResult> whole = RunPart(spec, RunOptions::Part::kWhole, whole_dir, 0, -1);
  ASSERT_TRUE(whole.ok()) << whole.status();

  // Each range on its own, as two workers would; layer 1's run still brings
  // the activations through layer 0 (original weights).
  const std::string ranges[] = {dir_ / "range0", dir_ / "range1"};
  std::vector<std::string> announced;
  RunCallbacks callbacks;
  callbacks.on_checkpoint = [&](const ProducedArtifact& a) {
    announced.push_back(a.name);
    return absl::OkStatus();
  };
  for (int64_t layer = 0; layer < 2; ++layer) {
    absl::StatusOr<RunResult> part =
        RunPart(spec, RunOptions::Part::kBlocks, ranges[layer], layer, layer + 1, callbacks);
    ASSERT_TRUE(part.ok()) << part.status();
    ASSERT_EQ(part->artifacts.size(), 1u);
    EXPECT_EQ(part->artifacts[0].name, BlockCheckpointName(layer));
    EXPECT_EQ(*Sha256OfFile(ranges[layer] + "/" + part->artifacts[0].name), part->artifacts[0].sha256);
    // Only the checkpoint: no outputs from a range.
    std::map<std::string, std::string> files = OutputFiles(ranges[layer]);
    ASSERT_EQ(files.size(), 1u);
    EXPECT_EQ(files.begin()->first, BlockCheckpointName(layer));
  }
  EXPECT_EQ(announced, (std::vector<std::string>{BlockCheckpointName(0), BlockCheckpointName(1)}));

  const std::string gathered = dir_ / "checkpoints";
  for (const std::string& range : ranges) GatherCheckpoints(range, gathered);
  const std::string assembled_dir = dir_ / "assembled";
  Recorded recorded;
  absl::StatusOr<RunResult> assembled = RunPart(spec, RunOptions::Part::kAssemble, assembled_dir,
                                                0, -1, recorded.callbacks, {}, gathered);
  ASSERT_TRUE(assembled.ok()) << assembled.status();
  EXPECT_TRUE(ExpectProgressOrdered(recorded));

  const std::map<std::string, std::string> expected = OutputFiles(whole_dir);
  const std::map<std::string, std::string> got = OutputFiles(assembled_dir);
  ASSERT_EQ(expected.size(), got.size());
  for (const auto& [name, bytes] : expected) {
    auto found = got.find(name);
    ASSERT_NE(found, got.end()) << name;
    EXPECT_TRUE(found->second == bytes) << name << " differs";
  }
  EXPECT_GT(expected.count("gguf/model-Q4_K_M-imatrix.gguf"), 0u);
  ExpectSameReports(whole->report, assembled->report);
  // The whole run's artifacts, listed the same way.
  ASSERT_EQ(whole->artifacts.size(), assembled->artifacts.size());
  for (size_t i = 0; i < whole->artifacts.size(); ++i) {
    EXPECT_EQ(whole->artifacts[i].name, assembled->artifacts[i].name);
    if (whole->artifacts[i].name != kReportFileName) {
      EXPECT_EQ(whole->artifacts[i].sha256, assembled->artifacts[i].sha256);
    }
  }
}

TEST_F(BlockRangeTest, SequentialRunResumesAfterItsLastCheckpoint) {
  const v1::JobSpec spec = GptqSpec(v1::PROPAGATION_SEQUENTIAL);
  const std::string whole_dir = dir_ / "whole";
  ASSERT_TRUE(RunPart(spec, RunOptions::Part::kWhole, whole_dir, 0, -1).ok());

  // The first attempt dies right after checkpointing layer 0.
  const std::string first = dir_ / "first";
  bool stop = false;
  RunCallbacks dying;
  dying.on_checkpoint = [&](const ProducedArtifact&) {
    stop = true;
    return absl::OkStatus();
  };
  dying.is_cancelled = [&] { return stop; };
  absl::StatusOr<RunResult> died = RunPart(spec, RunOptions::Part::kBlocks, first, 0, -1, dying);
  EXPECT_EQ(died.status().code(), absl::StatusCode::kCancelled);
  ASSERT_TRUE(fs::exists(first + "/" + BlockCheckpointName(0)));
  EXPECT_FALSE(fs::exists(first + "/" + BlockCheckpointName(1)));

  // The retry is given layer 0's checkpoint: it quantizes layer 1 only, with
  // activations run through layer 0's finished weights.
  const std::string second = dir_ / "second";
  Recorded recorded;
  absl::StatusOr<RunResult> resumed =
      RunPart(spec, RunOptions::Part::kBlocks, second, 0, -1, recorded.callbacks, {0}, first);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  ASSERT_EQ(resumed->artifacts.size(), 1u);
  EXPECT_EQ(resumed->artifacts[0].name, BlockCheckpointName(1));
  for (const auto& [fraction, stage, message] : recorded.progress) {
    EXPECT_FALSE(absl::StrContains(message, "model.layers.0.")) << message;
  }
  EXPECT_TRUE(ExpectProgressOrdered(recorded));

  const std::string gathered = dir_ / "checkpoints";
  GatherCheckpoints(first, gathered);
  GatherCheckpoints(second, gathered);
  const std::string assembled_dir = dir_ / "assembled";
  ASSERT_TRUE(
      RunPart(spec, RunOptions::Part::kAssemble, assembled_dir, 0, -1, {}, {}, gathered).ok());
  const std::map<std::string, std::string> expected = OutputFiles(whole_dir);
  const std::map<std::string, std::string> got = OutputFiles(assembled_dir);
  ASSERT_EQ(expected.size(), got.size());
  for (const auto& [name, bytes] : expected) {
    EXPECT_TRUE(got.count(name) > 0 && got.at(name) == bytes) << name << " differs";
  }

  // Without layer 0's checkpoint a sequential retry cannot resume.
  absl::StatusOr<RunResult> missing =
      RunPart(spec, RunOptions::Part::kBlocks, dir_ / "third", 0, -1, {}, {0}, dir_ / "nowhere");
  EXPECT_FALSE(missing.ok());
  EXPECT_TRUE(absl::StrContains(missing.status().message(), "layer-00000")) << missing.status();
}

TEST_F(BlockRangeTest, PartsNeedACalibratedJobAndEveryCheckpoint) {
  // RTN alone has no block ranges.
  absl::StatusOr<RunResult> rtn =
      RunPart(Spec(3, {v1::DEQUANTIZED_SAFETENSORS}), RunOptions::Part::kBlocks, out_dir_, 0, 1);
  EXPECT_EQ(rtn.status().code(), absl::StatusCode::kInvalidArgument);

  const v1::JobSpec spec = GptqSpec(v1::PROPAGATION_PARALLEL);
  absl::StatusOr<RunResult> out_of_range =
      RunPart(spec, RunOptions::Part::kBlocks, out_dir_, 1, 5);
  EXPECT_EQ(out_of_range.status().code(), absl::StatusCode::kInvalidArgument);

  const std::string only_first = dir_ / "range0";
  ASSERT_TRUE(RunPart(spec, RunOptions::Part::kBlocks, only_first, 0, 1).ok());
  absl::StatusOr<RunResult> assembled =
      RunPart(spec, RunOptions::Part::kAssemble, out_dir_, 0, -1, {}, {}, only_first);
  EXPECT_FALSE(assembled.ok());
  EXPECT_TRUE(absl::StrContains(assembled.status().message(), "layer-00001")) << assembled.status();
  ExpectNothingWritten();

  // A checkpoint of another layer is refused by name.
  fs::copy_file(only_first + "/" + BlockCheckpointName(0), only_first + "/" + BlockCheckpointName(1));
  assembled = RunPart(spec, RunOptions::Part::kAssemble, out_dir_, 0, -1, {}, {}, only_first);
  EXPECT_EQ(assembled.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(assembled.status().message(), "holds layer 0")) << assembled.status();
}

}  // namespace
}  // namespace compress::engine
