#include "worker/engine/gguf/gguf_presets.h"

#include "absl/strings/match.h"

namespace compress::engine {
namespace {

bool Is(const GgufPreset& preset, absl::string_view name) { return name == preset.name; }

// llama.cpp's use_more_bits: the first and last eighth of the layers, and
// every third layer in between.
bool UseMoreBits(int64_t layer, int64_t layers) {
  return layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2;
}

// The type the rules ask for, before the row-size fallback.
GgufType RuleType(const GgufPreset& preset, const GgufTensorRole& t) {
  const GgufType base = preset.base;
  // Float presets convert every matrix alike (llama-quantize applies the
  // rules to quantized presets only).
  if (GgufTypeOf(base).block_elements == 1) return base;
  const bool is_output =
      t.name == "output.weight" || (t.tied_output && t.name == "token_embd.weight");
  if (is_output) {
    if (t.shape.back() % GgufTypeOf(base).block_elements != 0) return GgufType::kQ8_0;
    return base == GgufType::kQ8_0 ? base : GgufType::kQ6_K;
  }
  const int64_t i = t.layer, n = t.num_layers;
  if (absl::StrContains(t.name, "attn_v.weight")) {
    if (Is(preset, "Q2_K")) return t.gqa >= 4 ? GgufType::kQ4_K : GgufType::kQ3_K;
    if (Is(preset, "Q3_K_M")) return i < 2 ? GgufType::kQ5_K : GgufType::kQ4_K;
    if ((Is(preset, "Q4_K_M") || Is(preset, "Q5_K_M")) && UseMoreBits(i, n)) return GgufType::kQ6_K;
    return base;
  }
  if (absl::StrContains(t.name, "ffn_down")) {
    if (Is(preset, "Q2_K")) return GgufType::kQ3_K;
    if (Is(preset, "Q3_K_M")) return i < n / 16 ? GgufType::kQ5_K : GgufType::kQ4_K;
    if ((Is(preset, "Q4_K_M") || Is(preset, "Q5_K_M")) && UseMoreBits(i, n)) return GgufType::kQ6_K;
    return base;
  }
  if (absl::StrContains(t.name, "attn_output.weight")) {
    if (Is(preset, "Q2_K")) return GgufType::kQ3_K;
    if (Is(preset, "Q3_K_M")) return GgufType::kQ4_K;
  }
  return base;
}

}  // namespace

GgufType GgufTypeForTensor(const GgufPreset& preset, const GgufTensorRole& tensor) {
  // Vectors (norms, biases) stay exact; llama.cpp quantizes matrices only.
  if (tensor.shape.size() < 2) return GgufType::kF32;
  GgufType type = RuleType(preset, tensor);
  const int64_t row = tensor.shape.back();
  if (row % GgufTypeOf(type).block_elements == 0) return type;
  switch (type) {
    case GgufType::kQ2_K:
    case GgufType::kQ3_K: type = GgufType::kQ4_0; break;
    case GgufType::kQ4_K: type = GgufType::kQ5_0; break;
    case GgufType::kQ5_K: type = GgufType::kQ5_1; break;
    case GgufType::kQ6_K: type = GgufType::kQ8_0; break;
    default: break;
  }
  return row % GgufTypeOf(type).block_elements == 0 ? type : GgufType::kF16;
}

}  // namespace compress::engine
