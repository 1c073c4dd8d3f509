// Which tensors a stage works on: RE2 patterns over tensor names.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/safetensors_header.h"
#include "compress/v1/compress.pb.h"

namespace compress {

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

// What a quantizing or pruning stage selects with and the grid it needs,
// from the stage's message; `field` names it ("stages[2].gptq"). A stage
// without targets (evaluate, sleep) has field empty.
struct StageSelection {
  std::string field;
  std::vector<std::string> include;
  std::vector<std::string> exclude;
  int64_t group_size = 0;  // 0 or -1: per output channel, or no grid
  bool quantizes = false;  // its result is a quantized (packed) weight
  bool prunes = false;     // a prune stage
  int64_t prune_m = 0;     // N:M pruning: m, which must divide the inputs
};
StageSelection SelectionOf(const compress::v1::Stage& stage, int index);

// Checks every stage of `spec` against the model's tensors before any work:
// each include pattern matches a quantizable tensor, each exclude pattern a
// tensor, something is left to work on, every group size (and N:M
// pruning's m) divides the input size of every tensor the stage selects,
// and no stage prunes a tensor an earlier stage quantized. INVALID_ARGUMENT
// naming the field, the tensor and its shape.
absl::Status CheckStagesAgainstTensors(const compress::v1::JobSpec& spec,
                                       const std::vector<SafetensorsTensorInfo>& tensors);

}  // namespace compress
