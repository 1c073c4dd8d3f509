// The random Llama checkpoint generator.
#include "worker/engine/model/random_model.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "tests/engine/test_util.h"
#include "worker/engine/model/safetensors_reader.h"

namespace compress::engine {
namespace {

namespace fs = std::filesystem;
using testing::ReadBytes;
using testing::TempDir;

TEST(RandomModel, WritesHuggingFaceLlamaNamesShapesAndConfig) {
  TempDir dir;
  RandomModelOptions options;
  options.hidden_size = 32;
  options.intermediate_size = 48;
  options.num_layers = 3;
  options.num_heads = 4;
  options.num_kv_heads = 2;
  options.vocab_size = 100;
  options.dtype = SafetensorsDtype::kBF16;
  ASSERT_TRUE(WriteRandomLlamaModel(options, dir.path()).ok());
  EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / kSafetensorsIndexFileName));

  nlohmann::json config = nlohmann::json::parse(ReadBytes(dir / "config.json"));
  EXPECT_EQ(config["architectures"][0], "LlamaForCausalLM");
  EXPECT_EQ(config["model_type"], "llama");
  EXPECT_EQ(config["hidden_size"], 32);
  EXPECT_EQ(config["intermediate_size"], 48);
  EXPECT_EQ(config["num_hidden_layers"], 3);
  EXPECT_EQ(config["num_attention_heads"], 4);
  EXPECT_EQ(config["num_key_value_heads"], 2);
  EXPECT_EQ(config["vocab_size"], 100);
  EXPECT_EQ(config["tie_word_embeddings"], false);
  EXPECT_EQ(config["torch_dtype"], "bfloat16");
  EXPECT_TRUE(config.contains("rms_norm_eps"));
  EXPECT_TRUE(config.contains("rope_theta"));
  EXPECT_TRUE(config.contains("max_position_embeddings"));

  absl::StatusOr<SafetensorsCheckpoint> checkpoint = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ(checkpoint->tensors().size(), 2u + 9u * 3u + 1u);
  const std::map<std::string, std::vector<int64_t>> expected = {
      {"model.embed_tokens.weight", {100, 32}},
      {"model.layers.2.input_layernorm.weight", {32}},
      {"model.layers.2.post_attention_layernorm.weight", {32}},
      {"model.layers.2.self_attn.q_proj.weight", {32, 32}},
      {"model.layers.2.self_attn.k_proj.weight", {16, 32}},  // 2 kv heads of 8
      {"model.layers.2.self_attn.v_proj.weight", {16, 32}},
      {"model.layers.2.self_attn.o_proj.weight", {32, 32}},
      {"model.layers.2.mlp.gate_proj.weight", {48, 32}},
      {"model.layers.2.mlp.up_proj.weight", {48, 32}},
      {"model.layers.2.mlp.down_proj.weight", {32, 48}},
      {"model.norm.weight", {32}},
      {"lm_head.weight", {100, 32}},
  };
  for (const auto& [name, shape] : expected) {
    SCOPED_TRACE(name);
    const CheckpointTensor* t = checkpoint->Find(name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->info.shape, shape);
    EXPECT_EQ(t->info.dtype, SafetensorsDtype::kBF16);
  }
  // Norms start near 1, linear weights near N(0, 0.02).
  at::Tensor norm = *checkpoint->Load("model.norm.weight", at::kCPU);
  EXPECT_NEAR(norm.to(at::kFloat).mean().item<float>(), 1.0f, 0.02f);
  at::Tensor q = *checkpoint->Load("model.layers.0.self_attn.q_proj.weight", at::kCPU);
  EXPECT_NEAR(q.to(at::kFloat).std().item<float>(), 0.02f, 0.003f);
  EXPECT_NEAR(q.to(at::kFloat).mean().item<float>(), 0.0f, 0.003f);
}

TEST(RandomModel, IsDeterministicForASeedAndIndependentOfSharding) {
  TempDir dir;
  RandomModelOptions options;
  options.seed = 11;
  ASSERT_TRUE(WriteRandomLlamaModel(options, dir / "a").ok());
  ASSERT_TRUE(WriteRandomLlamaModel(options, dir / "b").ok());
  EXPECT_EQ(ReadBytes(dir / "a/model.safetensors"), ReadBytes(dir / "b/model.safetensors"));
  options.seed = 12;
  ASSERT_TRUE(WriteRandomLlamaModel(options, dir / "c").ok());
  EXPECT_NE(ReadBytes(dir / "a/model.safetensors"), ReadBytes(dir / "c/model.safetensors"));

  options.seed = 11;
  options.max_shard_bytes = 50000;
  ASSERT_TRUE(WriteRandomLlamaModel(options, dir / "sharded").ok());
  absl::StatusOr<SafetensorsCheckpoint> single = SafetensorsCheckpoint::Open(dir / "a");
  absl::StatusOr<SafetensorsCheckpoint> sharded = SafetensorsCheckpoint::Open(dir / "sharded");
  ASSERT_TRUE(single.ok() && sharded.ok());
  EXPECT_GT(sharded->shards().size(), 1u);
  for (const auto& shard : sharded->shards()) {
    // No shard above the limit unless it holds a single larger tensor.
    EXPECT_TRUE(shard->header().DataSectionBytes() <= 50000 || shard->header().tensors.size() == 1);
  }
  for (const CheckpointTensor& t : single->tensors()) {
    EXPECT_EQ(*single->RawBytes(t.info.name), *sharded->RawBytes(t.info.name)) << t.info.name;
  }
  nlohmann::json index =
      nlohmann::json::parse(ReadBytes(dir / "sharded/" + kSafetensorsIndexFileName));
  EXPECT_EQ(index["weight_map"].size(), single->tensors().size());
  uint64_t total = 0;
  for (const CheckpointTensor& t : single->tensors()) total += t.info.NumBytes();
  EXPECT_EQ(index["metadata"]["total_size"], total);
}

TEST(RandomModel, RejectsInconsistentOptions) {
  TempDir dir;
  RandomModelOptions options;
  options.num_heads = 5;  // 64 % 5 != 0
  EXPECT_EQ(WriteRandomLlamaModel(options, dir.path()).code(), absl::StatusCode::kInvalidArgument);
  options = RandomModelOptions();
  options.num_kv_heads = 3;  // 4 % 3 != 0
  EXPECT_EQ(WriteRandomLlamaModel(options, dir.path()).code(), absl::StatusCode::kInvalidArgument);
  options = RandomModelOptions();
  options.dtype = SafetensorsDtype::kI32;
  EXPECT_EQ(WriteRandomLlamaModel(options, dir.path()).code(), absl::StatusCode::kInvalidArgument);
  options = RandomModelOptions();
  options.num_layers = 0;
  EXPECT_EQ(WriteRandomLlamaModel(options, dir.path()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

}  // namespace
}  // namespace compress::engine
