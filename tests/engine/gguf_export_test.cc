// Jobs that write GGUF files: the weights the stages leave, re-encoded into
// each preset's types, with the metadata llama.cpp's llama loader reads.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>

#include "common/gguf_file.h"
#include "compress/v1/compress.pb.h"
#include "tests/engine/test_util.h"
#include "worker/engine/gguf/gguf_export.h"
#include "worker/engine/model/llama_config.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/model/safetensors_reader.h"
#include "worker/engine/quant/quantized_tensor.h"
#include "worker/engine/recipe/runner.h"
#include "worker/engine/tokenizer/bpe_trainer.h"

namespace compress::engine {
namespace {

namespace fs = std::filesystem;
namespace v1 = compress::v1;

class GgufExportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string text;
    for (int i = 0; i < 40; ++i) text += "In the beginning was the Word, and the Word was with God. ";
    BpeTrainerOptions trainer;
    trainer.vocab_size = 300;
    absl::StatusOr<std::string> tokenizer = TrainByteLevelBpe(text, trainer);
    ASSERT_TRUE(tokenizer.ok());
    RandomModelOptions options;
    options.hidden_size = 256;  // a k-quant block per row
    options.intermediate_size = 512;
    options.num_layers = 2;
    options.num_heads = 4;
    options.num_kv_heads = 2;
    options.vocab_size = 320;  // padded past the tokenizer's 300
    options.seed = 3;
    options.init_std = 0.05;
    model_dir_ = dir_ / "kjv-tiny";
    ASSERT_TRUE(WriteRandomLlamaModel(options, model_dir_).ok());
    testing::WriteBytes(model_dir_ + "/tokenizer.json", *tokenizer);
    calibration_ = dir_ / "calibration.txt";
    testing::WriteBytes(calibration_, text);
  }

  absl::StatusOr<RunResult> Run(const v1::JobSpec& spec, const std::string& out) {
    RunOptions options;
    options.model_path = model_dir_;
    options.output_dir = out;
    return RunJob(spec, options, {});
  }

  testing::TempDir dir_;
  std::string model_dir_;
  std::string calibration_;
};

TEST_F(GgufExportTest, EveryPresetHoldsTheJobsWeightsUnderLlamaCppsNames) {
  v1::JobSpec spec;
  v1::RtnStage* rtn = spec.add_stages()->mutable_rtn();
  rtn->set_bits(4);
  rtn->set_group_size(64);
  spec.add_outputs(v1::DEQUANTIZED_SAFETENSORS);
  spec.add_outputs(v1::GGUF);
  for (const char* preset : {"F32", "Q8_0", "Q4_K_M", "Q2_K"}) spec.add_gguf()->set_preset(preset);
  const std::string out = dir_ / "out";
  absl::StatusOr<RunResult> result = Run(spec, out);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->report.gguf_size(), 4);

  const LlamaConfig config = *ReadLlamaConfig(model_dir_);
  const SafetensorsCheckpoint dequantized = *SafetensorsCheckpoint::Open(out + "/dequantized");
  std::map<std::string, double> errors;  // preset -> relative error over all tensors
  for (const v1::GgufFileReport& report : result->report.gguf()) {
    SCOPED_TRACE(report.preset());
    const std::string path = out + "/" + report.file();
    ASSERT_TRUE(fs::exists(path));
    EXPECT_EQ(report.file(), "gguf/kjv-tiny-" + report.preset() + ".gguf");
    EXPECT_EQ(report.size_bytes(), static_cast<int64_t>(fs::file_size(path)));
    bool listed = false;
    for (const ProducedArtifact& a : result->artifacts) {
      if (a.name == report.file()) {
        listed = true;
        EXPECT_EQ(a.format, v1::GGUF);
        EXPECT_EQ(a.size_bytes, report.size_bytes());
      }
    }
    EXPECT_TRUE(listed);

    // The metadata llama.cpp's loader needs.
    const GgufHeader header = *ReadGgufHeader(path);
    EXPECT_EQ(*header.FindMetadata("general.architecture")->Get<std::string>(), "llama");
    EXPECT_EQ(*header.FindMetadata("llama.block_count")->Get<uint32_t>(), 2u);
    EXPECT_EQ(*header.FindMetadata("llama.embedding_length")->Get<uint32_t>(), 256u);
    EXPECT_EQ(*header.FindMetadata("llama.feed_forward_length")->Get<uint32_t>(), 512u);
    EXPECT_EQ(*header.FindMetadata("llama.attention.head_count")->Get<uint32_t>(), 4u);
    EXPECT_EQ(*header.FindMetadata("llama.attention.head_count_kv")->Get<uint32_t>(), 2u);
    EXPECT_EQ(*header.FindMetadata("llama.rope.dimension_count")->Get<uint32_t>(), 64u);
    EXPECT_EQ(header.FindMetadata("tokenizer.ggml.tokens")->array_size(), 320u);
    EXPECT_EQ(*header.FindMetadata("tokenizer.ggml.model")->Get<std::string>(), "gpt2");
    EXPECT_EQ(*header.FindMetadata("general.file_type")->Get<uint32_t>(),
              FindGgufPreset(report.preset())->file_type);
    ASSERT_NE(header.FindTensor("blk.1.attn_q.weight"), nullptr);
    EXPECT_EQ(header.FindTensor("blk.1.attn_norm.weight")->type, GgufType::kF32);
    int tensors = 0;
    for (const auto& [type, count] : report.tensor_types()) tensors += count;
    EXPECT_EQ(tensors, static_cast<int>(header.tensors.size()));

    // Read back in Hugging Face names and row order: the job's weights.
    absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> read =
        ReadGgufAsLlamaTensors(path, config);
    ASSERT_TRUE(read.ok()) << read.status();
    ASSERT_EQ(read->size(), dequantized.tensors().size());
    double error = 0, norm = 0;
    for (const auto& [name, values] : *read) {
      const at::Tensor expected = dequantized.Load(name, at::kCPU)->to(at::kFloat);
      ASSERT_EQ(values.sizes(), expected.sizes()) << name;
      if (report.preset() == "F32") {
        EXPECT_TRUE(values.equal(expected)) << name << ": F32 keeps every value";
      }
      error += (values - expected).square().sum().item<double>();
      norm += expected.square().sum().item<double>();
    }
    errors[report.preset()] = std::sqrt(error / norm);
  }
  EXPECT_EQ(errors["F32"], 0.0);
  EXPECT_LT(errors["Q8_0"], 0.01);
  EXPECT_LT(errors["Q8_0"], errors["Q4_K_M"]);
  EXPECT_LT(errors["Q4_K_M"], errors["Q2_K"]);
  // The preset's mix: output Q6_K; of two layers, only the last is in
  // use_more_bits' last eighth, so its attn_v gets Q6_K.
  const GgufHeader q4km = *ReadGgufHeader(out + "/gguf/kjv-tiny-Q4_K_M.gguf");
  EXPECT_EQ(q4km.FindTensor("output.weight")->type, GgufType::kQ6_K);
  EXPECT_EQ(q4km.FindTensor("blk.0.attn_v.weight")->type, GgufType::kQ4_K);
  EXPECT_EQ(q4km.FindTensor("blk.1.attn_v.weight")->type, GgufType::kQ6_K);
  EXPECT_EQ(q4km.FindTensor("blk.0.attn_q.weight")->type, GgufType::kQ4_K);
}

TEST_F(GgufExportTest, GgufOnlyJobsWithImportanceCalibrateAndLeaveNothingElse) {
  v1::JobSpec spec;
  spec.add_stages()->mutable_rtn()->set_bits(8);
  v1::GgufOutput* plain = spec.add_gguf();
  plain->set_preset("Q3_K_M");
  v1::GgufOutput* weighted = spec.add_gguf();
  weighted->set_preset("Q3_K_M");
  weighted->set_importance(true);
  spec.mutable_calibration()->set_path(calibration_);
  spec.mutable_calibration()->set_num_samples(4);
  spec.mutable_calibration()->set_sequence_length(16);
  const std::string out = dir_ / "out";
  absl::StatusOr<RunResult> result = Run(spec, out);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_FALSE(fs::exists(out + "/dequantized")) << "only GGUF was asked for";
  const std::string a = testing::ReadBytes(out + "/gguf/kjv-tiny-Q3_K_M.gguf");
  const std::string b = testing::ReadBytes(out + "/gguf/kjv-tiny-Q3_K_M-imatrix.gguf");
  ASSERT_EQ(a.size(), b.size()) << "same types, same sizes";
  EXPECT_NE(a, b) << "the importance weights change the search";
  EXPECT_TRUE(result->report.gguf(1).importance());
}

TEST_F(GgufExportTest, SentencePieceStyleTokenizersBecomeLlamaCppsLlamaTokenizer) {
  RandomModelOptions options;
  options.hidden_size = 64;
  options.intermediate_size = 128;
  options.num_layers = 1;
  options.vocab_size = 278;
  const std::string model = dir_ / "spm";
  ASSERT_TRUE(WriteRandomLlamaModel(options, model).ok());
  fs::copy_file(std::string(FIXTURES_DIR) + "/../engine/fixtures/tokenizer/sentencepiece_tiny.json",
                model + "/tokenizer.json");
  v1::JobSpec spec;
  spec.add_gguf()->set_preset("F16");
  RunOptions run;
  run.model_path = model;
  run.output_dir = dir_ / "out";
  absl::StatusOr<RunResult> result = RunJob(spec, run, {});
  ASSERT_TRUE(result.ok()) << result.status();
  const GgufHeader header = *ReadGgufHeader(dir_ / "out/gguf/spm-F16.gguf");
  EXPECT_EQ(*header.FindMetadata("tokenizer.ggml.model")->Get<std::string>(), "llama");
  EXPECT_EQ(header.FindMetadata("tokenizer.ggml.scores")->array_size(), 278u);
  EXPECT_EQ(*header.FindMetadata("tokenizer.ggml.add_space_prefix")->Get<bool>(), true);
  EXPECT_EQ(*header.FindMetadata("tokenizer.ggml.unknown_token_id")->Get<uint32_t>(), 0u);
  EXPECT_EQ(header.FindMetadata("tokenizer.ggml.merges"), nullptr);
}

TEST_F(GgufExportTest, Llama3RopeScalingTravelsAsRopeFreqs) {
  RandomModelOptions options;
  options.hidden_size = 64;
  options.intermediate_size = 128;
  options.num_layers = 1;
  options.vocab_size = 320;
  options.rope_theta = 500000.0;
  options.extra_config_json =
      R"({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})";
  const std::string model = dir_ / "llama3";
  ASSERT_TRUE(WriteRandomLlamaModel(options, model).ok());
  fs::copy_file(model_dir_ + "/tokenizer.json", model + "/tokenizer.json");
  v1::JobSpec spec;
  spec.add_gguf()->set_preset("F32");
  RunOptions run;
  run.model_path = model;
  run.output_dir = dir_ / "out";
  absl::StatusOr<RunResult> result = RunJob(spec, run, {});
  ASSERT_TRUE(result.ok()) << result.status();
  const std::string path = dir_ / "out/gguf/llama3-F32.gguf";
  const GgufMappedFile file = *GgufMappedFile::Open(path);
  const GgufTensorInfo* freqs = file.header().FindTensor("rope_freqs.weight");
  ASSERT_NE(freqs, nullptr);
  EXPECT_EQ(freqs->ne, (std::vector<int64_t>{8}));  // head_dim 16 / 2
  // llama.cpp divides each frequency by its factor: llama3's rule, from
  // the converter (1 for short wavelengths, `factor` for long, a blend between).
  const absl::string_view bytes = file.TensorBytes(*freqs);
  const double original = 64, factor = 8, low = 1, high = 4;
  for (int i = 0; i < 8; ++i) {
    float stored;
    std::memcpy(&stored, bytes.data() + 4 * i, 4);
    const double freq = 1.0 / std::pow(500000.0, 2.0 * i / 16);
    const double wavelen = 2 * M_PI / freq;
    double expected = 1;
    if (wavelen > original / low) {
      expected = factor;
    } else if (wavelen >= original / high) {
      const double smooth = (original / wavelen - low) / (high - low);
      expected = 1 / ((1 - smooth) / factor + smooth);
    }
    EXPECT_NEAR(stored, expected, 1e-5 * expected) << i;
  }
  // The checkpoint read back has no such tensor, and every other one exact.
  const LlamaConfig config = *ReadLlamaConfig(model);
  EXPECT_EQ(ReadGgufAsLlamaTensors(path, config)->size(),
            SafetensorsCheckpoint::Open(model)->tensors().size());
}

TEST_F(GgufExportTest, ModelsTheExportCannotDescribeAreRefusedBeforeAnythingIsWritten) {
  v1::JobSpec spec;
  spec.add_stages()->mutable_rtn()->set_bits(4);
  spec.add_gguf()->set_preset("Q4_K_M");
  fs::remove(model_dir_ + "/tokenizer.json");
  const std::string out = dir_ / "out";
  const absl::Status missing = Run(spec, out).status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(missing.message().find("tokenizer.json"), std::string::npos) << missing;
  EXPECT_FALSE(fs::exists(out + "/report.json"));
  spec.mutable_gguf(0)->set_preset("Q4_K_XL");
  EXPECT_EQ(Run(spec, out).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace compress::engine
