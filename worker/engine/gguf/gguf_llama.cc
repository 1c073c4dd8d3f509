#include "worker/engine/gguf/gguf_llama.h"

#include <ATen/ATen.h>

#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

// Inside "model.layers.<n>.": the HF suffix and llama.cpp's name for it.
constexpr std::pair<const char*, const char*> kBlockNames[] = {
    {"input_layernorm.weight", "attn_norm.weight"},
    {"self_attn.q_proj.weight", "attn_q.weight"},
    {"self_attn.k_proj.weight", "attn_k.weight"},
    {"self_attn.v_proj.weight", "attn_v.weight"},
    {"self_attn.o_proj.weight", "attn_output.weight"},
    {"self_attn.q_proj.bias", "attn_q.bias"},
    {"self_attn.k_proj.bias", "attn_k.bias"},
    {"self_attn.v_proj.bias", "attn_v.bias"},
    {"self_attn.o_proj.bias", "attn_output.bias"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"mlp.gate_proj.weight", "ffn_gate.weight"},
    {"mlp.up_proj.weight", "ffn_up.weight"},
    {"mlp.down_proj.weight", "ffn_down.weight"},
};

constexpr std::pair<const char*, const char*> kModelNames[] = {
    {"model.embed_tokens.weight", "token_embd.weight"},
    {"model.norm.weight", "output_norm.weight"},
    {"lm_head.weight", "output.weight"},
};

// llama.cpp runs LLM_ARCH_LLAMA with LLAMA_ROPE_TYPE_NORM (adjacent pairs)
// and LLM_ARCH_QWEN2 with LLAMA_ROPE_TYPE_NEOX (halves, as transformers);
// convert_hf_to_gguf.py permutes q/k for the first and not the second.
constexpr GgufArchitecture kArchitectures[] = {
    {LlamaFamily::kLlama, "llama", true},
    {LlamaFamily::kMistral, "llama", true},
    {LlamaFamily::kQwen2, "qwen2", false},
};

}  // namespace

const GgufArchitecture& GgufArchitectureOf(LlamaFamily family) {
  for (const GgufArchitecture& architecture : kArchitectures) {
    if (architecture.family == family) return architecture;
  }
  return kArchitectures[0];  // unreachable: every family has a row
}

std::optional<std::string> GgufTensorName(absl::string_view hf_name) {
  for (const auto& [hf, gguf] : kModelNames) {
    if (hf_name == hf) return std::string(gguf);
  }
  absl::string_view rest = hf_name;
  if (!absl::ConsumePrefix(&rest, "model.layers.")) return std::nullopt;
  const size_t dot = rest.find('.');
  int64_t layer = 0;
  if (dot == absl::string_view::npos || !absl::SimpleAtoi(rest.substr(0, dot), &layer)) {
    return std::nullopt;
  }
  rest.remove_prefix(dot + 1);
  for (const auto& [hf, gguf] : kBlockNames) {
    if (rest == hf) return absl::StrCat("blk.", layer, ".", gguf);
  }
  return std::nullopt;
}

int64_t GgufLayerOf(absl::string_view gguf_name) {
  if (!absl::ConsumePrefix(&gguf_name, "blk.")) return -1;
  int64_t layer = -1;
  const size_t dot = gguf_name.find('.');
  if (dot == absl::string_view::npos || !absl::SimpleAtoi(gguf_name.substr(0, dot), &layer)) {
    return -1;
  }
  return layer;
}

namespace {

// Views `rows` as [heads, a, b, ...] and swaps a and b: with (2, D/2) the
// transformers -> llama.cpp order, with (D/2, 2) its inverse.
absl::StatusOr<at::Tensor> SwapWithinHeads(const at::Tensor& rows, int64_t heads, bool to_gguf,
                                           absl::string_view name) {
  const int64_t n = rows.dim() >= 1 ? rows.size(0) : 0;
  if (heads < 1 || n % heads != 0 || (n / heads) % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': ", n,
                                                   " rows do not split into ", heads,
                                                   " heads of an even size"));
  }
  return CatchTorchErrors(name, [&]() -> absl::StatusOr<at::Tensor> {
    const int64_t half = n / heads / 2;
    std::vector<int64_t> shape = {heads, to_gguf ? 2 : half, to_gguf ? half : 2};
    for (int64_t d = 1; d < rows.dim(); ++d) shape.push_back(rows.size(d));
    return rows.reshape(shape).transpose(1, 2).reshape(rows.sizes()).contiguous();
  });
}

}  // namespace

absl::StatusOr<at::Tensor> PermuteRotaryRowsForGguf(const at::Tensor& rows, int64_t heads,
                                                    absl::string_view name) {
  return SwapWithinHeads(rows, heads, /*to_gguf=*/true, name);
}

absl::StatusOr<at::Tensor> UnpermuteRotaryRowsFromGguf(const at::Tensor& rows, int64_t heads,
                                                       absl::string_view name) {
  return SwapWithinHeads(rows, heads, /*to_gguf=*/false, name);
}

}  // namespace compress::engine
