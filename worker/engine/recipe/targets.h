// Which tensors a stage works on: RE2 patterns over tensor names.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/safetensors_header.h"

namespace compress::engine {

// The default targets: the 2-D weights of the decoder blocks' linear layers
// (Llama, Mistral, Qwen2 names).
inline constexpr char kDefaultLinearWeightPattern[] =
    R"(layers\.\d+\..*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight)";

// True for a tensor a weight quantizer can take: 2-D, F32/F16/BF16, non-empty.
bool IsQuantizableWeight(const SafetensorsTensorInfo& tensor);

// The quantizable tensors whose names partially match an include pattern
// (kDefaultLinearWeightPattern when `include` is empty) and no exclude
// pattern, in the order of `tensors`. INVALID_ARGUMENT, naming `stage` and
// the pattern, for a pattern RE2 rejects, an include pattern matching no
// quantizable tensor, an exclude pattern matching no tensor at all, or a
// selection that ends up empty.
absl::StatusOr<std::vector<std::string>> SelectTargets(
    const std::vector<SafetensorsTensorInfo>& tensors, const std::vector<std::string>& include,
    const std::vector<std::string>& exclude, absl::string_view stage);

}  // namespace compress::engine
