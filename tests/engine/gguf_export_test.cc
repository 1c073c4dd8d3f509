// Jobs that write GGUF files: the weights the stages leave, re-encoded into
// each preset's types, with the metadata llama.cpp's llama and qwen2
// loaders read.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

#include "common/gguf_file.h"
#include "compress/v1/compress.pb.h"
#include "tests/engine/test_util.h"
#include "worker/engine/gguf/gguf_export.h"
#include "worker/engine/gguf/gguf_llama.h"
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

// A Qwen2 checkpoint (q/k/v biases, tied embeddings, Qwen2's tokenizer)
// as llama.cpp's qwen2 architecture: qwen2.* keys, the biases, no
// output.weight, and q/k rows exactly as the checkpoint has them (llama.cpp
// rotates qwen2 NEOX style, as transformers does).
class GgufQwen2ExportTest : public ::testing::Test {
 protected:
  // Writes a random Qwen2 model with the qwen2_tiny tokenizer into `name`.
  std::string WriteModel(const std::string& name, const std::string& extra_config = "{}",
                         int64_t head_dim = 0) {
    RandomModelOptions options;
    options.model_type = "qwen2";
    options.hidden_size = 64;
    options.intermediate_size = 128;
    options.num_layers = 2;
    options.num_heads = 4;
    options.num_kv_heads = 2;
    options.head_dim = head_dim;
    options.vocab_size = 272;  // padded past the tokenizer's 268
    options.tie_word_embeddings = true;
    options.rope_theta = 1000000.0;
    options.init_std = 0.05;
    options.seed = 11;
    nlohmann::json extra = nlohmann::json::parse(extra_config);
    // As Qwen2-Instruct's config.json: BOS <|endoftext|>, EOS <|im_end|>.
    extra["bos_token_id"] = 265;
    extra["eos_token_id"] = 267;
    options.extra_config_json = extra.dump();
    const std::string model = dir_ / name;
    EXPECT_TRUE(WriteRandomLlamaModel(options, model).ok());
    const std::string fixture =
        std::string(FIXTURES_DIR) + "/../engine/fixtures/tokenizer/qwen2_tiny/";
    for (const char* file : {"tokenizer.json", "tokenizer_config.json"}) {
      fs::copy_file(fixture + file, model + "/" + file);
    }
    return model;
  }

  absl::StatusOr<RunResult> Export(const std::string& model, std::vector<std::string> presets) {
    v1::JobSpec spec;
    for (const std::string& preset : presets) spec.add_gguf()->set_preset(preset);
    RunOptions run;
    run.model_path = model;
    run.output_dir = dir_ / "out";
    return RunJob(spec, run, {});
  }

  testing::TempDir dir_;
};

TEST_F(GgufQwen2ExportTest, WritesLlamaCppsQwen2ArchitectureAndReadsBackExactly) {
  const std::string model = WriteModel("qwen-tiny");
  absl::StatusOr<RunResult> result = Export(model, {"F32", "Q8_0", "Q4_K_M"});
  ASSERT_TRUE(result.ok()) << result.status();
  const std::string path = dir_ / "out/gguf/qwen-tiny-F32.gguf";
  const GgufMappedFile file = *GgufMappedFile::Open(path);
  const GgufHeader& header = file.header();

  // The hyper-parameters under qwen2.*, none under llama.*.
  EXPECT_EQ(*header.FindMetadata("general.architecture")->Get<std::string>(), "qwen2");
  const std::vector<std::pair<std::string, uint32_t>> counts = {
      {"qwen2.context_length", 2048},   {"qwen2.embedding_length", 64},
      {"qwen2.block_count", 2},         {"qwen2.feed_forward_length", 128},
      {"qwen2.attention.head_count", 4}, {"qwen2.attention.head_count_kv", 2},
      {"qwen2.rope.dimension_count", 16}, {"qwen2.vocab_size", 272},
  };
  for (const auto& [key, value] : counts) {
    const GgufValue* found = header.FindMetadata(key);
    ASSERT_NE(found, nullptr) << key;
    ASSERT_NE(found->Get<uint32_t>(), nullptr) << key << " is a UINT32";
    EXPECT_EQ(*found->Get<uint32_t>(), value) << key;
  }
  EXPECT_EQ(*header.FindMetadata("qwen2.rope.freq_base")->Get<float>(), 1000000.0f);
  EXPECT_EQ(*header.FindMetadata("qwen2.attention.layer_norm_rms_epsilon")->Get<float>(), 1e-5f);
  for (const GgufKeyValue& kv : header.metadata) {
    EXPECT_FALSE(absl::StartsWith(kv.key, "llama.")) << kv.key;
  }
  // The tokenizer as the converter writes Qwen2's: BOS from config.json
  // (the tokenizer has none), nothing added in front, EOS and padding from
  // tokenizer_config.json.
  EXPECT_EQ(*header.FindMetadata("tokenizer.ggml.model")->Get<std::string>(), "gpt2");
  EXPECT_EQ(*header.FindMetadata("tokenizer.ggml.pre")->Get<std::string>(), "qwen2");
  EXPECT_EQ(header.FindMetadata("tokenizer.ggml.tokens")->array_size(), 272u);
  EXPECT_EQ(header.FindMetadata("tokenizer.ggml.merges")->array_size(), 9u);
  EXPECT_EQ(*header.FindMetadata("tokenizer.ggml.bos_token_id")->Get<uint32_t>(), 265u);
  EXPECT_EQ(*header.FindMetadata("tokenizer.ggml.eos_token_id")->Get<uint32_t>(), 267u);
  EXPECT_EQ(*header.FindMetadata("tokenizer.ggml.padding_token_id")->Get<uint32_t>(), 265u);
  EXPECT_FALSE(*header.FindMetadata("tokenizer.ggml.add_bos_token")->Get<bool>());
  EXPECT_NE(header.FindMetadata("tokenizer.chat_template"), nullptr);

  // Tied: no output.weight. The q/k/v biases are there (F32), o_proj has none.
  EXPECT_EQ(header.FindTensor("output.weight"), nullptr);
  for (const char* name : {"blk.0.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"}) {
    ASSERT_NE(header.FindTensor(name), nullptr) << name;
    EXPECT_EQ(header.FindTensor(name)->type, GgufType::kF32) << name;
  }
  EXPECT_EQ(header.FindTensor("blk.0.attn_output.bias"), nullptr);

  // Every tensor's bytes are the checkpoint's, row for row: no q/k reordering.
  const SafetensorsCheckpoint checkpoint = *SafetensorsCheckpoint::Open(model);
  ASSERT_EQ(header.tensors.size(), checkpoint.tensors().size());
  for (const auto& tensor : checkpoint.tensors()) {
    const std::string& hf = tensor.info.name;
    const GgufTensorInfo* info = header.FindTensor(*GgufTensorName(hf));
    ASSERT_NE(info, nullptr) << hf;
    const at::Tensor expected = checkpoint.Load(hf, at::kCPU)->to(at::kFloat).contiguous();
    EXPECT_EQ(file.TensorBytes(*info),
              absl::string_view(static_cast<const char*>(expected.data_ptr()), expected.nbytes()))
        << hf;
  }

  // Read back in Hugging Face names: the checkpoint, exactly for F32, close
  // for the quantized presets (whose biases and norms stay F32).
  const LlamaConfig config = *ReadLlamaConfig(model);
  for (const char* preset : {"F32", "Q8_0", "Q4_K_M"}) {
    SCOPED_TRACE(preset);
    absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> read =
        ReadGgufAsLlamaTensors(dir_ / absl::StrCat("out/gguf/qwen-tiny-", preset, ".gguf"), config);
    ASSERT_TRUE(read.ok()) << read.status();
    ASSERT_EQ(read->size(), checkpoint.tensors().size());
    for (const auto& [name, values] : *read) {
      const at::Tensor expected = checkpoint.Load(name, at::kCPU)->to(at::kFloat);
      ASSERT_EQ(values.sizes(), expected.sizes()) << name;
      const double error = ((values - expected).norm() / expected.norm()).item<double>();
      if (std::string(preset) == "F32" || absl::EndsWith(name, ".bias") ||
          absl::EndsWith(name, "norm.weight")) {
        EXPECT_TRUE(values.equal(expected)) << name;
      } else {
        EXPECT_LT(error, std::string(preset) == "Q8_0" ? 0.01 : 0.12) << name;
      }
    }
  }
  // A Llama config does not read a qwen2 file (its rows would be reordered).
  LlamaConfig llama = config;
  llama.family = LlamaFamily::kLlama;
  llama.qkv_bias = llama.o_bias = false;
  const absl::Status wrong = ReadGgufAsLlamaTensors(path, llama).status();
  EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.message().find("qwen2"), std::string::npos) << wrong;
}

TEST_F(GgufQwen2ExportTest, WhatLlamaCppsQwen2CannotExpressIsRefusedWithAReason) {
  // Its loader declares attn_q as hidden_size x hidden_size.
  const absl::Status wide = Export(WriteModel("wide", "{}", /*head_dim=*/32), {"F16"}).status();
  EXPECT_EQ(wide.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wide.message().find("hidden_size"), std::string::npos) << wide;
  // It has no rope_freqs tensor for llama3 scaling.
  const absl::Status llama3 =
      Export(WriteModel("llama3", R"({"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64}})"),
             {"F16"})
          .status();
  EXPECT_EQ(llama3.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(llama3.message().find("rope"), std::string::npos) << llama3;
  EXPECT_FALSE(fs::exists(dir_ / "out/report.json"));
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
