// Prune stages in whole jobs (RunJob on small random Llama checkpoints): the
// pattern survives later quantization into the dequantized, packed and GGUF
// outputs; the report carries each tensor's sparsity; bad recipes are
// refused before any work.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/recipe.h"
#include "common/stage_targets.h"
#include "tests/engine/test_util.h"
#include "worker/engine/gguf/gguf_export.h"
#include "worker/engine/model/llama_config.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/model/safetensors_reader.h"
#include "worker/engine/quant/gptq.h"
#include "worker/engine/quant/packing.h"
#include "worker/engine/quant/quantized_tensor.h"
#include "worker/engine/recipe/calibration.h"
#include "worker/engine/recipe/runner.h"
#include "worker/engine/tokenizer/bpe_trainer.h"
#include "worker/engine/tokenizer/tokenizer.h"

namespace compress::engine {
namespace {

namespace fs = std::filesystem;
namespace v1 = compress::v1;
using testing::ExpectInvalidArgument;
using testing::TempDir;

constexpr int kLayers = 2;
constexpr int kTargetsPerLayer = 7;  // q, k, v, o, gate, up, down

bool IsBlockLinear(const std::string& name) {
  for (const char* linear : {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"}) {
    if (name.find(absl::StrCat(linear, ".weight")) != std::string::npos) return true;
  }
  return false;
}

// At most n nonzeros in every run of m consecutive inputs of a row.
void ExpectNm(const at::Tensor& t, int64_t n, int64_t m) {
  const at::Tensor nonzero = (t.reshape({t.size(0), t.size(1) / m, m}) != 0).sum(-1);
  EXPECT_LE(nonzero.max().item<int64_t>(), n);
}

class PruneJobTest : public ::testing::Test {
 protected:
  // A 2-layer BF16 model with a trained tokenizer (GGUF needs a real one)
  // and a calibration text.
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
    options.dtype = SafetensorsDtype::kBF16;
    options.num_layers = kLayers;
    options.seed = 21;
    model_dir_ = dir_ / "model";
    ASSERT_TRUE(WriteRandomLlamaModel(options, model_dir_).ok());
    testing::WriteBytes(model_dir_ + "/tokenizer.json", *json);
    text_path_ = dir_ / "calibration.txt";
    testing::WriteBytes(text_path_, text);
    out_dir_ = dir_ / "out";
  }

  v1::JobSpec Spec(bool calibrated) const {
    v1::JobSpec spec;
    spec.set_name("prune");
    spec.mutable_model()->set_path(model_dir_);
    if (calibrated) {
      spec.mutable_calibration()->set_path(text_path_);
      spec.mutable_calibration()->set_num_samples(8);
      spec.mutable_calibration()->set_sequence_length(32);
    }
    return spec;
  }

  static v1::PruneStage* AddPrune(v1::JobSpec& spec, v1::PruneMethod method, double sparsity,
                                  int n = 0, int m = 0) {
    v1::PruneStage* prune = spec.add_stages()->mutable_prune();
    prune->set_method(method);
    prune->set_sparsity(sparsity);
    prune->set_n(n);
    prune->set_m(m);
    return prune;
  }

  absl::StatusOr<RunResult> Run(const v1::JobSpec& spec) {
    RunOptions options;
    options.model_path = model_dir_;
    options.output_dir = out_dir_;
    return RunJob(spec, options, {});
  }

  std::vector<SafetensorsTensorInfo> Infos() const {
    std::vector<SafetensorsTensorInfo> infos;
    const SafetensorsCheckpoint checkpoint = *SafetensorsCheckpoint::Open(model_dir_);
    for (const CheckpointTensor& t : checkpoint.tensors()) {
      infos.push_back(t.info);
    }
    return infos;
  }

  void ExpectNothingWritten() const {
    if (fs::exists(out_dir_)) EXPECT_TRUE(fs::is_empty(out_dir_));
  }

  TempDir dir_;
  std::string model_dir_;
  std::string text_path_;
  std::string out_dir_;
};

TEST_F(PruneJobTest, WandaTwoFourThenRtnKeepsThePatternInTheCheckpointAndGguf) {
  v1::JobSpec spec = Spec(true);
  AddPrune(spec, v1::WANDA, 0, 2, 4);
  v1::RtnStage* rtn = spec.add_stages()->mutable_rtn();
  rtn->set_bits(4);
  rtn->set_group_size(32);
  spec.add_outputs(v1::DEQUANTIZED_SAFETENSORS);
  spec.add_outputs(v1::GGUF);
  spec.add_gguf()->set_preset("Q8_0");
  spec.add_gguf()->set_preset("F16");
  absl::StatusOr<RunResult> result = Run(spec);
  ASSERT_TRUE(result.ok()) << result.status();

  // The report: the prune stage by method name, each tensor at 50%; then
  // RTN, then the GGUF encoding's own time and bytes.
  ASSERT_EQ(result->report.stages_size(), 3);
  const v1::StageReport& prune = result->report.stages(0);
  EXPECT_EQ(prune.method(), "wanda");
  EXPECT_EQ(prune.kind(), "prune");
  EXPECT_EQ(result->report.stages(1).kind(), "quantize");
  const v1::StageReport& exported = result->report.stages(2);
  EXPECT_EQ(exported.kind(), "export");
  EXPECT_EQ(exported.method(), "gguf");
  EXPECT_GT(exported.seconds(), 0.0);
  EXPECT_LT(exported.seconds(), result->report.seconds());
  ASSERT_EQ(result->report.gguf_size(), 2);
  EXPECT_EQ(exported.bytes_out(),
            result->report.gguf(0).size_bytes() + result->report.gguf(1).size_bytes());
  ASSERT_EQ(prune.tensors_size(), kLayers * kTargetsPerLayer);
  for (const v1::TensorReport& t : prune.tensors()) {
    SCOPED_TRACE(t.name());
    EXPECT_DOUBLE_EQ(t.sparsity(), 0.5);
    EXPECT_GT(t.relative_error(), 0.0);
    EXPECT_GT(t.output_error(), 0.0);
    EXPECT_LT(t.output_error(), 1.0);
    EXPECT_EQ(t.bytes_after(), t.bytes_before());
  }
  EXPECT_EQ(result->report.stages(1).tensors(0).sparsity(), 0.0) << "only prune stages report it";

  const SafetensorsCheckpoint input = *SafetensorsCheckpoint::Open(model_dir_);
  const SafetensorsCheckpoint written = *SafetensorsCheckpoint::Open(out_dir_ + "/dequantized");
  const LlamaConfig config = *ReadLlamaConfig(model_dir_);
  std::map<std::string, std::map<std::string, at::Tensor>> gguf;
  for (const std::string preset : {"Q8_0", "F16"}) {
    absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> tensors =
        ReadGgufAsLlamaTensors(out_dir_ + "/gguf/model-" + preset + ".gguf", config);
    ASSERT_TRUE(tensors.ok()) << tensors.status();
    for (auto& [name, values] : *tensors) gguf[preset][name] = values;
  }
  int checked = 0;
  for (const CheckpointTensor& t : input.tensors()) {
    const std::string& name = t.info.name;
    if (!IsBlockLinear(name)) continue;
    SCOPED_TRACE(name);
    const at::Tensor values = *written.Load(name, at::kCPU);
    EXPECT_EQ(values.scalar_type(), at::kBFloat16);
    ExpectNm(values, 2, 4);
    EXPECT_GE((values == 0).to(at::kDouble).mean().item<double>(), 0.5);
    for (const std::string preset : {"Q8_0", "F16"}) {
      SCOPED_TRACE(preset);
      const at::Tensor exported = gguf[preset].at(name);
      EXPECT_TRUE((exported == 0).equal(values == 0)) << "the same zeros";
      ExpectNm(exported, 2, 4);
    }
    ++checked;
  }
  EXPECT_EQ(checked, kLayers * kTargetsPerLayer);
}

TEST_F(PruneJobTest, GptqAfterPruningKeepsTheZerosAndPacksTheSameValues) {
  for (v1::PruneMethod method : {v1::WANDA, v1::SPARSEGPT}) {
    SCOPED_TRACE(v1::PruneMethod_Name(method));
    v1::JobSpec spec = Spec(true);
    AddPrune(spec, method, 0, 4, 8);
    v1::GptqStage* gptq = spec.add_stages()->mutable_gptq();
    gptq->set_bits(3);
    gptq->set_group_size(32);
    spec.add_outputs(v1::DEQUANTIZED_SAFETENSORS);
    spec.add_outputs(v1::PACKED_SAFETENSORS);
    absl::StatusOr<RunResult> result = Run(spec);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->report.stages(0).method(), method == v1::WANDA ? "wanda" : "sparsegpt");
    const SafetensorsCheckpoint written = *SafetensorsCheckpoint::Open(out_dir_ + "/dequantized");
    const SafetensorsCheckpoint packed = *SafetensorsCheckpoint::Open(out_dir_ + "/packed");
    for (const CheckpointTensor& t : written.tensors()) {
      if (!IsBlockLinear(t.info.name)) continue;
      SCOPED_TRACE(t.info.name);
      const at::Tensor values = *written.Load(t.info.name, at::kCPU);
      ExpectNm(values, 4, 8);
      const std::string prefix = t.info.name.substr(0, t.info.name.size() - 7);  // ".weight"
      PackedLinear parts;
      parts.qweight = *packed.Load(prefix + ".qweight", at::kCPU);
      parts.qzeros = *packed.Load(prefix + ".qzeros", at::kCPU);
      parts.scales = *packed.Load(prefix + ".scales", at::kCPU);
      parts.g_idx = *packed.Load(prefix + ".g_idx", at::kCPU);
      absl::StatusOr<QuantizedTensor> unpacked = UnpackLinear(parts, 3, t.info.name);
      ASSERT_TRUE(unpacked.ok()) << unpacked.status();
      EXPECT_TRUE(Dequantize(*unpacked, at::kBFloat16).equal(values));
    }
  }
}

TEST_F(PruneJobTest, MagnitudeAloneNeedsNoCalibrationAndChangesOnlyItsTargets) {
  v1::JobSpec spec = Spec(false);
  AddPrune(spec, v1::MAGNITUDE, 0.5);
  absl::StatusOr<RunResult> result = Run(spec);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->report.stages_size(), 1);
  EXPECT_EQ(result->report.stages(0).method(), "magnitude");
  EXPECT_EQ(result->report.stages(0).tensors_size(), kLayers * kTargetsPerLayer);
  const SafetensorsCheckpoint input = *SafetensorsCheckpoint::Open(model_dir_);
  const SafetensorsCheckpoint written = *SafetensorsCheckpoint::Open(out_dir_ + "/dequantized");
  for (const CheckpointTensor& t : input.tensors()) {
    const std::string& name = t.info.name;
    SCOPED_TRACE(name);
    if (!IsBlockLinear(name)) {
      EXPECT_EQ(*written.RawBytes(name), *input.RawBytes(name));
      continue;
    }
    const at::Tensor original = *input.Load(name, at::kCPU);
    const at::Tensor values = *written.Load(name, at::kCPU);
    // Per tensor: exactly half of it, the smallest magnitudes; the rest as is.
    EXPECT_DOUBLE_EQ((values == 0).to(at::kDouble).mean().item<double>(), 0.5);
    const at::Tensor kept = values != 0;
    EXPECT_TRUE(values.equal(original * kept));
    EXPECT_LE(original.masked_select(kept.logical_not()).abs().max().item<float>(),
              original.masked_select(kept).abs().min().item<float>());
  }
  for (const v1::TensorReport& t : result->report.stages(0).tensors()) {
    EXPECT_DOUBLE_EQ(t.sparsity(), 0.5);
    EXPECT_EQ(t.output_error(), 0.0) << "no calibration, no output error";
  }
}

TEST_F(PruneJobTest, EveryLaterQuantizerKeepsTheZeros) {
  for (const std::string quantizer : {"hqq", "nf4", "fp4", "rtn-sym"}) {
    SCOPED_TRACE(quantizer);
    v1::JobSpec spec = Spec(false);
    AddPrune(spec, v1::MAGNITUDE, 0, 2, 4);
    v1::Stage* stage = spec.add_stages();
    if (quantizer == "hqq") {
      stage->mutable_hqq()->set_bits(3);
      stage->mutable_hqq()->set_group_size(32);
    } else if (quantizer == "rtn-sym") {
      stage->mutable_rtn()->set_bits(2);
      stage->mutable_rtn()->set_symmetric(true);
    } else {
      stage->mutable_bnb_4bit()->set_type(quantizer == "nf4" ? v1::BNB_4BIT_NF4 : v1::BNB_4BIT_FP4);
    }
    absl::StatusOr<RunResult> result = Run(spec);
    ASSERT_TRUE(result.ok()) << result.status();
    const SafetensorsCheckpoint written = *SafetensorsCheckpoint::Open(out_dir_ + "/dequantized");
    for (const CheckpointTensor& t : written.tensors()) {
      if (IsBlockLinear(t.info.name)) ExpectNm(*written.Load(t.info.name, at::kCPU), 2, 4);
    }
  }
}

// Records the inputs of one linear as float64 rows.
class InputRecorder : public LinearHook {
 public:
  InputRecorder(int64_t layer, std::string linear) : layer_(layer), linear_(std::move(linear)) {}
  absl::Status OnLinearInput(int64_t layer, absl::string_view linear,
                             const at::Tensor& input) override {
    if (layer == layer_ && linear == linear_) {
      rows_.push_back(input.reshape({-1, input.size(-1)}).to(at::kDouble));
    }
    return absl::OkStatus();
  }
  at::Tensor XtX() const {
    const at::Tensor x = at::cat(rows_);
    return x.t().mm(x);
  }

 private:
  int64_t layer_;
  std::string linear_;
  std::vector<at::Tensor> rows_;
};

// Layer 0's q_proj sees the original model's inputs in every job, so its
// output error on the calibration samples ranks the methods; the report's
// figure is that error. (This random model's inputs have no loud channels,
// so Wanda has little to exploit here: prune_test.cc shows where it wins.)
TEST_F(PruneJobTest, OutputErrorsRankSparseGptWandaMagnitudeAndTheReportAgrees) {
  const std::string name = "model.layers.0.self_attn.q_proj.weight";
  const absl::StatusOr<Tokenizer> tokenizer = Tokenizer::FromFile(model_dir_ + "/tokenizer.json");
  ASSERT_TRUE(tokenizer.ok());
  CalibrationSampleOptions sample_options;
  sample_options.num_samples = 8;
  sample_options.sequence_length = 32;
  sample_options.vocab_size = tokenizer->vocab_size();
  const at::Tensor samples = *LoadCalibrationSamples(text_path_, &*tokenizer, sample_options);
  InputRecorder recorder(0, "self_attn.q_proj");
  ASSERT_TRUE(LlamaModel::Load(model_dir_)->Forward(samples, nullptr, &recorder).ok());
  const at::Tensor h = recorder.XtX();
  const at::Tensor original = *SafetensorsCheckpoint::Open(model_dir_)->Load(name, at::kCPU);

  for (const auto& [n, m] : std::vector<std::pair<int, int>>{{0, 0}, {2, 4}}) {
    SCOPED_TRACE(::testing::Message() << n << ":" << m);
    std::map<v1::PruneMethod, double> errors;
    for (v1::PruneMethod method : {v1::MAGNITUDE, v1::WANDA, v1::SPARSEGPT}) {
      v1::JobSpec spec = Spec(method != v1::MAGNITUDE);
      AddPrune(spec, method, n == 0 ? 0.5 : 0.0, n, m);
      absl::StatusOr<RunResult> result = Run(spec);
      ASSERT_TRUE(result.ok()) << result.status();
      const at::Tensor pruned =
          *SafetensorsCheckpoint::Open(out_dir_ + "/dequantized")->Load(name, at::kCPU);
      errors[method] = RelativeOutputError(original, pruned, h);
      for (const v1::TensorReport& t : result->report.stages(0).tensors()) {
        if (t.name() != name || method == v1::MAGNITUDE) continue;
        EXPECT_NEAR(t.output_error(), errors[method], 1e-3 * errors[method]);
      }
    }
    EXPECT_GT(errors[v1::MAGNITUDE], 0.0);
    EXPECT_LT(errors[v1::WANDA], 1.01 * errors[v1::MAGNITUDE]);
    EXPECT_LT(errors[v1::SPARSEGPT], 0.9 * errors[v1::WANDA]);
  }
}

TEST_F(PruneJobTest, BadRecipesAreRefusedNamingTheFieldBeforeAnyWork) {
  // The recipe alone (common/recipe.cc).
  auto invalid = [&](const std::function<void(v1::PruneStage*)>& edit,
                     std::initializer_list<std::string> fragments, bool calibrated = true) {
    v1::JobSpec spec = Spec(calibrated);
    edit(AddPrune(spec, v1::WANDA, 0.5));
    ExpectInvalidArgument(ValidateJobSpec(spec), fragments);
  };
  invalid([](v1::PruneStage*) {}, {"stages[0].prune", "needs calibration data"}, false);
  invalid([](v1::PruneStage* p) { p->set_method(v1::SPARSEGPT); },
          {"stages[0].prune", "needs calibration data"}, false);
  invalid([](v1::PruneStage* p) { p->set_sparsity(1.0); }, {"stages[0].prune.sparsity", "[0, 1)"});
  invalid([](v1::PruneStage* p) { p->set_sparsity(0); }, {"stages[0].prune", "prunes nothing"});
  invalid([](v1::PruneStage* p) { p->set_n(4); p->set_m(4); p->set_sparsity(0); },
          {"stages[0].prune.n", "4:4", "0 < n < m"});
  invalid([](v1::PruneStage* p) { p->set_n(2); p->set_m(4); },
          {"stages[0].prune.sparsity", "either sparsity"});
  invalid([](v1::PruneStage* p) { p->set_dampening(0.1); }, {"SPARSEGPT only"});
  invalid([](v1::PruneStage* p) { p->set_method(static_cast<v1::PruneMethod>(7)); },
          {"stages[0].prune.method", "MAGNITUDE, WANDA, SPARSEGPT"});
  invalid([](v1::PruneStage* p) { p->add_include("("); }, {"stages[0].prune.include[0]"});
  {
    v1::JobSpec spec = Spec(false);
    AddPrune(spec, v1::MAGNITUDE, 0, 2, 4);
    EXPECT_TRUE(ValidateJobSpec(spec).ok()) << ValidateJobSpec(spec);
  }
  // The recipe file form: method names in any case.
  absl::StatusOr<v1::JobSpec> parsed = ParseRecipe(
      "model: {path: m}\nstages:\n  - prune: {method: wanda, n: 2, m: 4}\n  - rtn: {bits: 4}\n"
      "calibration: {path: c.txt}\n",
      "recipe.yaml");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->stages(0).prune().method(), v1::WANDA);
  EXPECT_TRUE(ValidateJobSpec(*parsed).ok()) << ValidateJobSpec(*parsed);

  // Against the model (common/stage_targets.h, at submit) and in the runner.
  v1::JobSpec three = Spec(false);
  AddPrune(three, v1::MAGNITUDE, 0, 2, 3);
  ExpectInvalidArgument(CheckStagesAgainstTensors(three, Infos()),
                        {"stages[0].prune.m", "3 does not divide the 64 inputs", "q_proj"});
  ExpectInvalidArgument(Run(three).status(), {"does not divide", "64 inputs", "[64, 64]"});
  ExpectNothingWritten();

  v1::JobSpec late = Spec(false);
  late.add_stages()->mutable_rtn()->set_bits(4);
  AddPrune(late, v1::MAGNITUDE, 0.5);
  ExpectInvalidArgument(CheckStagesAgainstTensors(late, Infos()),
                        {"stages[1].prune", "quantized by the earlier stage stages[0].rtn",
                         "prune before quantizing"});
  ExpectInvalidArgument(Run(late).status(), {"prune before quantizing", "'rtn'"});
  ExpectNothingWritten();
  v1::JobSpec early = Spec(false);
  AddPrune(early, v1::MAGNITUDE, 0.5);
  early.add_stages()->mutable_rtn()->set_bits(4);
  EXPECT_TRUE(CheckStagesAgainstTensors(early, Infos()).ok());

  // Calibrated methods without calibration data, and outside the blocks.
  v1::JobSpec uncalibrated = Spec(false);
  AddPrune(uncalibrated, v1::WANDA, 0.5);
  ExpectInvalidArgument(Run(uncalibrated).status(), {"calibration.path"});
  ExpectNothingWritten();
  v1::JobSpec head = Spec(true);
  AddPrune(head, v1::WANDA, 0.5)->add_include("lm_head");
  ExpectInvalidArgument(Run(head).status(), {"lm_head.weight", "wanda"});
  ExpectNothingWritten();
}

}  // namespace
}  // namespace compress::engine
