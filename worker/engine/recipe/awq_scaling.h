// Where AWQ's per-input-channel scales go in a decoder block (quant/awq.h has
// the search). Each input that linears share is produced by an RMSNorm or by
// a linear; dividing that producer's output channels by s and multiplying
// the consumers' weight columns by s leaves the block's function unchanged.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "worker/engine/model/llama_config.h"
#include "worker/engine/model/llama_model.h"

namespace compress::engine {

struct AwqScaledInput {
  const char* producer;                // "input_layernorm", "self_attn.v_proj", ...
  std::vector<const char*> consumers;  // linears (kBlockLinears names) fed by it
};

// The four inputs, in forward order. v_proj -> o_proj applies only when
// every query head has its own value head (AwqInputApplies).
inline const std::array<AwqScaledInput, 4>& AwqScaledInputs() {
  static const auto* inputs = new std::array<AwqScaledInput, 4>{{
      {"input_layernorm", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}},
      {"self_attn.v_proj", {"self_attn.o_proj"}},
      {"post_attention_layernorm", {"mlp.gate_proj", "mlp.up_proj"}},
      {"mlp.up_proj", {"mlp.down_proj"}},
  }};
  return *inputs;
}

// With grouped-query attention an o_proj input channel of one value head is
// read by several query heads' columns: no per-channel scale of v_proj's
// rows can match per-column scales of o_proj (AutoAWQ skips it too).
bool AwqInputApplies(const LlamaConfig& config, const AwqScaledInput& input);

// Divides the producer's output channels by `scales` (float32 [channels],
// positive) and multiplies the consumers' weight columns by the same. An
// RMSNorm weight is rounded to its dtype; the consumers are then scaled by
// the factor that rounding really applied, so the function is unchanged up
// to the rounding of the consumers' weights. Tensors keep dtype and device.
// Returns the block names (e.g. "self_attn.v_proj.bias") of every tensor changed.
absl::StatusOr<std::vector<std::string>> FoldAwqScales(DecoderBlockWeights& block,
                                                       const AwqScaledInput& input,
                                                       const at::Tensor& scales);

}  // namespace compress::engine
