#include "worker/engine/recipe/awq_scaling.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

LinearWeights* FindLinear(DecoderBlockWeights& block, absl::string_view name) {
  const BlockLinear* linear = FindBlockLinear(name);
  return linear == nullptr ? nullptr : &(block.*linear->member);
}

at::Tensor* FindNorm(DecoderBlockWeights& block, absl::string_view name) {
  if (name == "input_layernorm") return &block.input_layernorm;
  if (name == "post_attention_layernorm") return &block.post_attention_layernorm;
  return nullptr;
}

}  // namespace

bool AwqInputApplies(const LlamaConfig& config, const AwqScaledInput& input) {
  return absl::string_view(input.producer) != "self_attn.v_proj" ||
         config.num_attention_heads == config.num_key_value_heads;
}

absl::StatusOr<std::vector<std::string>> FoldAwqScales(DecoderBlockWeights& block,
                                                       const AwqScaledInput& input,
                                                       const at::Tensor& scales) {
  at::Tensor* norm = FindNorm(block, input.producer);
  LinearWeights* producer = norm == nullptr ? FindLinear(block, input.producer) : nullptr;
  if (norm == nullptr && producer == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("awq: unknown producer ", input.producer));
  }
  const int64_t channels = norm != nullptr ? norm->size(0) : producer->weight.size(0);
  if (scales.dim() != 1 || scales.size(0) != channels) {
    return absl::InvalidArgumentError(absl::StrCat("awq: ", scales.numel(), " scales for ",
                                                   input.producer, "'s ", channels, " channels"));
  }
  return CatchTorchErrors(
      absl::StrCat("awq scaling of layer ", block.layer, " ", input.producer),
      [&]() -> absl::StatusOr<std::vector<std::string>> {
        std::vector<std::string> changed;
        at::Tensor s = scales.to(at::kFloat);
        if (norm != nullptr) {
          const at::Tensor g = norm->to(at::kFloat);
          const at::Tensor folded = (g / s).to(norm->scalar_type());
          // The factor the stored norm really applies; where rounding leaves
          // nothing to divide (g or its quotient zero, overflow), no scaling.
          const at::Tensor applied = g / folded.to(at::kFloat);
          const at::Tensor usable = at::isfinite(applied) & (applied > 0) &
                                    at::isfinite(folded.to(at::kFloat));
          s = at::where(usable, applied, at::ones_like(s));
          *norm = at::where(usable, folded, *norm);
          changed.push_back(input.producer + std::string(".weight"));
        } else {
          producer->weight = (producer->weight.to(at::kFloat) / s.unsqueeze(1))
                                 .to(producer->weight.scalar_type());
          changed.push_back(input.producer + std::string(".weight"));
          if (producer->bias.defined()) {
            producer->bias = (producer->bias.to(at::kFloat) / s).to(producer->bias.scalar_type());
            changed.push_back(input.producer + std::string(".bias"));
          }
        }
        for (const char* name : input.consumers) {
          LinearWeights* consumer = FindLinear(block, name);
          consumer->weight =
              (consumer->weight.to(at::kFloat) * s).to(consumer->weight.scalar_type());
          changed.push_back(name + std::string(".weight"));
        }
        return changed;
      });
}

}  // namespace compress::engine
