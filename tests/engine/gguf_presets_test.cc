// llama-quantize's preset mixes on a 32-layer Llama-2-7B: the type counts
// that llama.cpp's rules give (for Q4_K_M also what llama.cpp prints when it
// loads its own Q4_K_M file: 65 F32, 193 Q4_K, 33 Q6_K).
#include "worker/engine/gguf/gguf_presets.h"

#include <gtest/gtest.h>

#include <map>
#include <string>

#include "absl/strings/str_cat.h"

namespace compress::engine {
namespace {

// Llama-2-7B's tensors in GGUF names: hidden 4096, FFN 11008, 32 layers, no GQA.
std::vector<GgufTensorRole> Llama7B() {
  std::vector<GgufTensorRole> tensors;
  auto add = [&](std::string name, std::vector<int64_t> shape, int64_t layer) {
    tensors.push_back({std::move(name), std::move(shape), layer, 32, 1, false});
  };
  add("token_embd.weight", {32000, 4096}, -1);
  for (int64_t i = 0; i < 32; ++i) {
    const std::string b = absl::StrCat("blk.", i, ".");
    add(b + "attn_norm.weight", {4096}, i);
    for (const char* m : {"attn_q", "attn_k", "attn_v", "attn_output"}) {
      add(b + m + ".weight", {4096, 4096}, i);
    }
    add(b + "ffn_norm.weight", {4096}, i);
    add(b + "ffn_gate.weight", {11008, 4096}, i);
    add(b + "ffn_up.weight", {11008, 4096}, i);
    add(b + "ffn_down.weight", {4096, 11008}, i);
  }
  add("output_norm.weight", {4096}, -1);
  add("output.weight", {32000, 4096}, -1);
  return tensors;
}

std::map<std::string, int> Counts(const char* preset_name, const std::vector<GgufTensorRole>& tensors) {
  const GgufPreset preset = *FindGgufPreset(preset_name);
  std::map<std::string, int> counts;
  for (const GgufTensorRole& t : tensors) ++counts[GgufTypeOf(GgufTypeForTensor(preset, t)).name];
  return counts;
}

TEST(GgufPresets, MixesMatchWhatLlamaCppLoadsFromItsOwnQuantizations) {
  const std::vector<GgufTensorRole> llama = Llama7B();
  // llama_model_loader: "- type f32: 65 tensors, - type q4_K: 193, - type q6_K: 33".
  EXPECT_EQ(Counts("Q4_K_M", llama),
            (std::map<std::string, int>{{"F32", 65}, {"Q4_K", 193}, {"Q6_K", 33}}));
  EXPECT_EQ(Counts("Q5_K_M", llama),
            (std::map<std::string, int>{{"F32", 65}, {"Q5_K", 193}, {"Q6_K", 33}}));
  EXPECT_EQ(Counts("Q6_K", llama), (std::map<std::string, int>{{"F32", 65}, {"Q6_K", 226}}));
  EXPECT_EQ(Counts("Q8_0", llama), (std::map<std::string, int>{{"F32", 65}, {"Q8_0", 226}}));
  EXPECT_EQ(Counts("Q4_0", llama),
            (std::map<std::string, int>{{"F32", 65}, {"Q4_0", 225}, {"Q6_K", 1}}));
  // Q3_K_M: attn_v Q5_K in layers 0-1, Q4_K after; ffn_down Q5_K in layers
  // 0-1, Q4_K after; attn_output Q4_K.
  EXPECT_EQ(Counts("Q3_K_M", llama), (std::map<std::string, int>{{"F32", 65},
                                                                 {"Q3_K", 129},
                                                                 {"Q4_K", 92},
                                                                 {"Q5_K", 4},
                                                                 {"Q6_K", 1}}));
  // Q2_K: attn_v, ffn_down and attn_output Q3_K (no GQA).
  EXPECT_EQ(Counts("Q2_K", llama),
            (std::map<std::string, int>{{"F32", 65}, {"Q2_K", 129}, {"Q3_K", 96}, {"Q6_K", 1}}));
  EXPECT_EQ(Counts("F16", llama), (std::map<std::string, int>{{"F32", 65}, {"F16", 226}}));
}

TEST(GgufPresets, UseMoreBitsLayersAndFallbacks) {
  const GgufPreset q4km = *FindGgufPreset("q4_k_m");
  std::vector<int64_t> more;
  for (int64_t i = 0; i < 32; ++i) {
    const GgufTensorRole v{absl::StrCat("blk.", i, ".attn_v.weight"), {4096, 4096}, i, 32, 1, false};
    if (GgufTypeForTensor(q4km, v) == GgufType::kQ6_K) more.push_back(i);
  }
  EXPECT_EQ(more, (std::vector<int64_t>{0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}));
  // Rows that a 256-block does not divide fall back.
  GgufTensorRole odd{"blk.0.ffn_up.weight", {11008, 4096 + 32}, 0, 32, 1, false};
  EXPECT_EQ(GgufTypeForTensor(q4km, odd), GgufType::kQ5_0);
  odd.shape = {11008, 4096 + 16};
  EXPECT_EQ(GgufTypeForTensor(q4km, odd), GgufType::kF16);
  const GgufTensorRole output{"output.weight", {32000, 4096 + 32}, -1, 32, 1, false};
  EXPECT_EQ(GgufTypeForTensor(q4km, output), GgufType::kQ8_0);
  // A tied model's embedding is its output.
  const GgufTensorRole tied{"token_embd.weight", {32000, 4096}, -1, 32, 1, true};
  EXPECT_EQ(GgufTypeForTensor(q4km, tied), GgufType::kQ6_K);
  // GQA >= 4: Q2_K's attn_v gets Q4_K.
  const GgufTensorRole gqa{"blk.5.attn_v.weight", {1024, 4096}, 5, 32, 4, false};
  EXPECT_EQ(GgufTypeForTensor(*FindGgufPreset("Q2_K"), gqa), GgufType::kQ4_K);
  EXPECT_FALSE(FindGgufPreset("Q4_K_XL").has_value());
}

}  // namespace
}  // namespace compress::engine
