// Llama checkpoints in llama.cpp's names and rotary row order.
#include "worker/engine/gguf/gguf_llama.h"
#include "worker/engine/gguf/gguf_vocabulary.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "tests/engine/test_util.h"

namespace compress::engine {
namespace {

TEST(GgufLlama, TensorNamesAreLlamaCpps) {
  EXPECT_EQ(*GgufTensorName("model.embed_tokens.weight"), "token_embd.weight");
  EXPECT_EQ(*GgufTensorName("model.norm.weight"), "output_norm.weight");
  EXPECT_EQ(*GgufTensorName("lm_head.weight"), "output.weight");
  EXPECT_EQ(*GgufTensorName("model.layers.12.self_attn.q_proj.weight"), "blk.12.attn_q.weight");
  EXPECT_EQ(*GgufTensorName("model.layers.0.self_attn.o_proj.weight"), "blk.0.attn_output.weight");
  EXPECT_EQ(*GgufTensorName("model.layers.3.input_layernorm.weight"), "blk.3.attn_norm.weight");
  EXPECT_EQ(*GgufTensorName("model.layers.3.post_attention_layernorm.weight"), "blk.3.ffn_norm.weight");
  EXPECT_EQ(*GgufTensorName("model.layers.7.mlp.down_proj.weight"), "blk.7.ffn_down.weight");
  EXPECT_EQ(*GgufTensorName("model.layers.1.self_attn.k_proj.bias"), "blk.1.attn_k.bias");
  EXPECT_FALSE(GgufTensorName("model.layers.1.self_attn.rotary_emb.inv_freq").has_value());
  EXPECT_FALSE(GgufTensorName("model.layers.x.mlp.up_proj.weight").has_value());
  EXPECT_EQ(GgufLayerOf("blk.12.attn_q.weight"), 12);
  EXPECT_EQ(GgufLayerOf("output.weight"), -1);
}

TEST(GgufLlama, QwenIsLlamaCppsQwen2ArchitectureWithRowsAsTheyAre) {
  EXPECT_STREQ(GgufArchitectureOf(LlamaFamily::kLlama).name, "llama");
  EXPECT_STREQ(GgufArchitectureOf(LlamaFamily::kMistral).name, "llama");
  EXPECT_STREQ(GgufArchitectureOf(LlamaFamily::kQwen2).name, "qwen2");
  EXPECT_TRUE(GgufArchitectureOf(LlamaFamily::kLlama).reorders_rotary_rows);
  EXPECT_TRUE(GgufArchitectureOf(LlamaFamily::kMistral).reorders_rotary_rows);
  // llama.cpp's qwen2 rope is NEOX style: halves, as transformers rotates.
  EXPECT_FALSE(GgufArchitectureOf(LlamaFamily::kQwen2).reorders_rotary_rows);
  EXPECT_EQ(*GgufTensorName("model.layers.2.self_attn.v_proj.bias"), "blk.2.attn_v.bias");
}

// Rotary embedding of one head's vector at `position`, two conventions.
at::Tensor RotateHalves(const at::Tensor& x, int64_t position) {  // transformers
  const int64_t d = x.size(0);
  at::Tensor out = x.clone();
  for (int64_t i = 0; i < d / 2; ++i) {
    const double angle = position * std::pow(10000.0, -2.0 * i / d);
    const double a = x[i].item<double>(), b = x[i + d / 2].item<double>();
    out[i] = a * std::cos(angle) - b * std::sin(angle);
    out[i + d / 2] = b * std::cos(angle) + a * std::sin(angle);
  }
  return out;
}

at::Tensor RotatePairs(const at::Tensor& x, int64_t position) {  // llama.cpp
  const int64_t d = x.size(0);
  at::Tensor out = x.clone();
  for (int64_t i = 0; i < d / 2; ++i) {
    const double angle = position * std::pow(10000.0, -2.0 * i / d);
    const double a = x[2 * i].item<double>(), b = x[2 * i + 1].item<double>();
    out[2 * i] = a * std::cos(angle) - b * std::sin(angle);
    out[2 * i + 1] = a * std::sin(angle) + b * std::cos(angle);
  }
  return out;
}

TEST(GgufLlama, PermutedRowsGiveTheSameAttentionScoresUnderLlamaCppsRope) {
  at::manual_seed(1);
  const int64_t heads = 3, head_dim = 8, hidden = 12;
  const at::Tensor wq = at::randn({heads * head_dim, hidden}, at::kDouble);
  const at::Tensor wk = at::randn({heads * head_dim, hidden}, at::kDouble);
  const at::Tensor pq = *PermuteRotaryRowsForGguf(wq, heads, "q");
  const at::Tensor pk = *PermuteRotaryRowsForGguf(wk, heads, "k");
  const at::Tensor x1 = at::randn({hidden}, at::kDouble), x2 = at::randn({hidden}, at::kDouble);
  for (int64_t h = 0; h < heads; ++h) {
    auto head = [&](const at::Tensor& w, const at::Tensor& x) {
      return w.mv(x).narrow(0, h * head_dim, head_dim);
    };
    // Query at position 5 against key at position 2, both conventions.
    const double hf = RotateHalves(head(wq, x1), 5).dot(RotateHalves(head(wk, x2), 2)).item<double>();
    const double gguf = RotatePairs(head(pq, x1), 5).dot(RotatePairs(head(pk, x2), 2)).item<double>();
    EXPECT_NEAR(gguf, hf, 1e-9 * std::abs(hf) + 1e-12) << "head " << h;
  }
  // A bias is a matrix of one column.
  const at::Tensor bias = at::arange(heads * head_dim, at::kDouble);
  const at::Tensor permuted = *PermuteRotaryRowsForGguf(bias, heads, "b");
  EXPECT_EQ(permuted[1].item<double>(), head_dim / 2);  // row 1 <- row D/2 of head 0
  EXPECT_EQ(permuted[head_dim + 2].item<double>(), head_dim + 1);
  EXPECT_EQ(PermuteRotaryRowsForGguf(at::zeros({10, 4}), 3, "w").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PermuteRotaryRowsForGguf(at::zeros({9, 4}), 3, "w").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GgufVocabulary, TheTrainedModelsTokenizerAsConvertHfToGgufWritesIt) {
  const std::string path = std::string(FIXTURES_DIR) + "/kjv-llama/tokenizer.json";
  absl::StatusOr<GgufVocabulary> vocabulary = ReadGgufVocabulary(path, 1024);
  ASSERT_TRUE(vocabulary.ok()) << vocabulary.status();
  const nlohmann::json json = nlohmann::json::parse(testing::ReadBytes(path));
  EXPECT_EQ(vocabulary->model, "gpt2");
  EXPECT_EQ(vocabulary->pre, "gpt-2");
  ASSERT_EQ(vocabulary->tokens.size(), 1024u);
  for (const auto& [token, id] : json["model"]["vocab"].items()) {
    ASSERT_EQ(vocabulary->tokens[id.get<int>()], token);
  }
  EXPECT_EQ(vocabulary->tokens[0], "<|begin_of_text|>");
  EXPECT_EQ(vocabulary->token_types[0], static_cast<int32_t>(GgufTokenType::kControl));
  EXPECT_EQ(vocabulary->token_types[300], static_cast<int32_t>(GgufTokenType::kNormal));
  ASSERT_EQ(vocabulary->merges.size(), json["model"]["merges"].size());
  EXPECT_EQ(vocabulary->merges[0], "t h");
  EXPECT_EQ(vocabulary->bos_id, 0);
  EXPECT_EQ(vocabulary->eos_id, 1);

  // A model whose vocabulary is padded past the tokenizer's.
  vocabulary = ReadGgufVocabulary(path, 1030);
  ASSERT_TRUE(vocabulary.ok());
  EXPECT_EQ(vocabulary->tokens[1029], "[PAD1029]");
  EXPECT_EQ(vocabulary->token_types[1029], static_cast<int32_t>(GgufTokenType::kUnused));
  // One smaller than the tokenizer's is a mismatch, named.
  EXPECT_EQ(ReadGgufVocabulary(path, 1000).status().code(), absl::StatusCode::kInvalidArgument);

  // A byte-level tokenizer with another pre-tokenizer is refused with a reason.
  testing::TempDir dir;
  nlohmann::json other = json;
  other["pre_tokenizer"] = {{"type", "Whitespace"}};
  testing::WriteBytes(dir / "tokenizer.json", other.dump());
  const absl::Status refused = ReadGgufVocabulary(dir / "tokenizer.json", 1024).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message().find("pre-tokenizer"), std::string::npos) << refused;
}

// Qwen2's tokenizer (byte-level BPE, NFC, its split) as convert_hf_to_gguf.py
// writes it: gpt2 with the qwen2 pre-tokenizer, no BOS added, EOS and
// padding from tokenizer_config.json, the chat template.
TEST(GgufVocabulary, Qwen2TokenizersAreGpt2WithTheQwen2PreTokenizer) {
  const std::string path =
      std::string(FIXTURES_DIR) + "/../engine/fixtures/tokenizer/qwen2_tiny/tokenizer.json";
  absl::StatusOr<GgufVocabulary> vocabulary = ReadGgufVocabulary(path, 272);
  ASSERT_TRUE(vocabulary.ok()) << vocabulary.status();
  const nlohmann::json json = nlohmann::json::parse(testing::ReadBytes(path));
  EXPECT_EQ(vocabulary->model, "gpt2");
  EXPECT_EQ(vocabulary->pre, "qwen2");
  ASSERT_EQ(vocabulary->tokens.size(), 272u);
  for (const auto& [token, id] : json["model"]["vocab"].items()) {
    ASSERT_EQ(vocabulary->tokens[id.get<int>()], token);
    ASSERT_EQ(vocabulary->token_types[id.get<int>()], static_cast<int32_t>(GgufTokenType::kNormal));
  }
  EXPECT_EQ(vocabulary->merges,
            json["model"]["merges"].get<std::vector<std::string>>());
  EXPECT_EQ(vocabulary->tokens[267], "<|im_end|>");
  for (int id : {265, 266, 267}) {
    EXPECT_EQ(vocabulary->token_types[id], static_cast<int32_t>(GgufTokenType::kControl)) << id;
  }
  EXPECT_EQ(vocabulary->token_types[271], static_cast<int32_t>(GgufTokenType::kUnused));
  EXPECT_EQ(vocabulary->bos_id, std::nullopt) << "bos_token is null";
  EXPECT_EQ(vocabulary->eos_id, 267);
  EXPECT_EQ(vocabulary->padding_id, 265);
  EXPECT_FALSE(vocabulary->add_bos);
  const nlohmann::json config = nlohmann::json::parse(
      testing::ReadBytes(std::filesystem::path(path).parent_path() / "tokenizer_config.json"));
  EXPECT_EQ(vocabulary->chat_template, config["chat_template"].get<std::string>());

  testing::TempDir dir;
  // Added tokens that look special are control tokens even when not marked
  // so (Qwen2.5's <|box_start|>); others are user-defined (<tool_call>).
  nlohmann::json added = json;
  added["added_tokens"].push_back({{"id", 268}, {"content", "<|box_start|>"}, {"special", false}});
  added["added_tokens"].push_back({{"id", 269}, {"content", "<tool_call>"}, {"special", false}});
  testing::WriteBytes(dir / "tokenizer.json", added.dump());
  vocabulary = ReadGgufVocabulary(dir / "tokenizer.json", 272);
  ASSERT_TRUE(vocabulary.ok()) << vocabulary.status();
  EXPECT_EQ(vocabulary->token_types[268], static_cast<int32_t>(GgufTokenType::kControl));
  EXPECT_EQ(vocabulary->token_types[269], static_cast<int32_t>(GgufTokenType::kUserDefined));
  EXPECT_TRUE(vocabulary->chat_template.empty()) << "no tokenizer_config.json here";

  // llama.cpp applies no normalizer: one other than NFC is refused.
  nlohmann::json replaced = json;
  replaced["normalizer"] = {{"type", "Replace"}, {"pattern", {{"String", "x"}}}, {"content", "y"}};
  testing::WriteBytes(dir / "tokenizer.json", replaced.dump());
  const absl::Status refused = ReadGgufVocabulary(dir / "tokenizer.json", 272).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message().find("normalizer"), std::string::npos) << refused;
}

// SentencePiece-style BPE (Llama-2, Mistral) as llama.cpp's "llama"
// tokenizer. llama.cpp itself (node-llama-cpp's build, commit 0ad4a86)
// tokenizes this fixture's export as HF tokenizers does: "hello world" ->
// [271, 276], "hello  world" -> [271, 259, 276], "hé😀" -> [267, 198, 172,
// 243, 162, 155, 131], "\n" -> [259, 13].
TEST(GgufVocabulary, SentencePieceStyleTokenizersScoreTokensByMergeRank) {
  const std::string path = std::string(FIXTURES_DIR) + "/../engine/fixtures/tokenizer/sentencepiece_tiny.json";
  absl::StatusOr<GgufVocabulary> vocabulary = ReadGgufVocabulary(path, 280);
  ASSERT_TRUE(vocabulary.ok()) << vocabulary.status();
  const nlohmann::json json = nlohmann::json::parse(testing::ReadBytes(path));
  EXPECT_EQ(vocabulary->model, "llama");
  EXPECT_EQ(vocabulary->pre, "default");
  EXPECT_TRUE(vocabulary->add_space_prefix);
  EXPECT_TRUE(vocabulary->merges.empty()) << "the llama model merges by score";
  EXPECT_EQ(vocabulary->unknown_id, 0);
  EXPECT_EQ(vocabulary->token_types[0], static_cast<int32_t>(GgufTokenType::kUnknown));
  EXPECT_EQ(vocabulary->token_types[1], static_cast<int32_t>(GgufTokenType::kControl));
  EXPECT_EQ(vocabulary->token_types[3], static_cast<int32_t>(GgufTokenType::kByte));  // <0x00>
  EXPECT_EQ(vocabulary->token_types[279], static_cast<int32_t>(GgufTokenType::kUnused));
  // The i-th merge's token scores -(i+1): the earlier merge wins.
  const std::vector<std::string> merges = json["model"]["merges"].get<std::vector<std::string>>();
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const size_t space = merges[rank].find(' ');
    const std::string token = merges[rank].substr(0, space) + merges[rank].substr(space + 1);
    const int id = json["model"]["vocab"][token].get<int>();
    EXPECT_EQ(vocabulary->scores[id], -static_cast<float>(rank + 1)) << token;
  }
  EXPECT_EQ(vocabulary->scores[5], 0.0f) << "a byte token is never made by a merge";

  // The Metaspace form of the same tokenizer.
  testing::TempDir dir;
  nlohmann::json metaspace = json;
  metaspace["normalizer"] = nullptr;
  metaspace["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}, {"split", false}};
  testing::WriteBytes(dir / "tokenizer.json", metaspace.dump());
  absl::StatusOr<GgufVocabulary> same = ReadGgufVocabulary(dir / "tokenizer.json", 280);
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_TRUE(same->add_space_prefix);
  EXPECT_EQ(same->scores, vocabulary->scores);
}

}  // namespace
}  // namespace compress::engine
