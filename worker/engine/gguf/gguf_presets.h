// llama-quantize's preset mixes ("Q4_K_M", ...): which GGUF type each tensor
// of a Llama-family model gets. The policy only; the types' encoders are in
// gguf_quants.h and the file format in common/gguf_file.h.
//
// The rules are llama.cpp's (src/llama-quant.cpp, llama_tensor_get_type) for
// dense Llama-architecture models: 1-D tensors (norms) stay F32; float
// presets (F32, F16, BF16) give every matrix their type; the output
// matrix (or the token embedding when it is tied to the output) gets Q6_K
// unless the preset is Q8_0; attn_v and ffn_down get more bits in the layers
// where use_more_bits holds (the first and last eighth, and every third
// layer in between) for Q4_K_M and Q5_K_M, and per the rows below for
// Q3_K_M and Q2_K. A type whose block does not divide a tensor's row falls
// back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0 (where
// llama.cpp uses IQ4_NL, a type this project does not write), and F16 when
// even 32 does not divide the row.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "common/gguf_types.h"

namespace compress::engine {

// What the policy needs to know of one tensor (GGUF names: "blk.3.attn_v.weight").
struct GgufTensorRole {
  std::string name;
  std::vector<int64_t> shape;  // PyTorch order: [out, in] for a matrix
  int64_t layer = -1;          // blk.<layer>., -1 outside the blocks
  int64_t num_layers = 0;
  int64_t gqa = 1;             // query heads per key/value head
  bool tied_output = false;    // no output.weight: token_embd serves as the output
};

// The type `tensor` gets in `preset`.
GgufType GgufTypeForTensor(const GgufPreset& preset, const GgufTensorRole& tensor);

}  // namespace compress::engine
