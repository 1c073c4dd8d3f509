// A Llama-family checkpoint as llama.cpp's "llama" and "qwen2"
// architectures read it: which architecture, tensor names and the query/key
// row order. (The metadata that goes with them is built by the GGUF output
// writer.)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/engine/model/llama_config.h"

namespace compress::engine {

// llama.cpp's architecture for a family: its general.architecture, which
// is also the prefix of its hyper-parameter keys ("qwen2.block_count"), and
// whether its rope rotates adjacent pairs, so that the checkpoint's q/k
// rows are reordered (PermuteRotaryRowsForGguf), or the two halves of each
// head as transformers does (NEOX style: the rows stay as they are).
struct GgufArchitecture {
  LlamaFamily family;
  const char* name;
  bool reorders_rotary_rows;
};

// Llama and Mistral: "llama", rows reordered. Qwen2: "qwen2", rows kept.
const GgufArchitecture& GgufArchitectureOf(LlamaFamily family);

// Hugging Face name -> GGUF name ("model.layers.3.self_attn.q_proj.weight" ->
// "blk.3.attn_q.weight"), the same in both architectures; nullopt for a
// tensor llama.cpp's loaders have no name for (rotary caches and the like, which it recomputes).
std::optional<std::string> GgufTensorName(absl::string_view hf_name);

// The block index of a GGUF name ("blk.3.attn_q.weight" -> 3), -1 outside.
int64_t GgufLayerOf(absl::string_view gguf_name);

// transformers rotates the two halves of each head's query/key vector
// against each other; llama.cpp's Llama rope rotates adjacent pairs. The
// checkpoint's q_proj/k_proj rows (and biases) are reordered so that row
// h*D + 2i + j holds what was row h*D + j*D/2 + i (D = head_dim): the model
// computes the same attention under llama.cpp's convention. `heads` is the
// number of heads the rows hold (attention heads for q, key/value heads for
// k). INVALID_ARGUMENT naming `name` when the rows do not split into heads
// of an even size.
absl::StatusOr<at::Tensor> PermuteRotaryRowsForGguf(const at::Tensor& rows, int64_t heads,
                                                    absl::string_view name);
// The inverse: llama.cpp's row order back to the checkpoint's.
absl::StatusOr<at::Tensor> UnpermuteRotaryRowsFromGguf(const at::Tensor& rows, int64_t heads,
                                                       absl::string_view name);

}  // namespace compress::engine
