// A finished decoder block's results, as one safetensors file: what the
// stages made of each of its tensors (values in the stored dtype, the packed
// output's parts, GGUF importance weights) and the block's share of every
// stage's report. Block tasks write one per block as it finishes, so a
// retried task resumes after the last one and the assemble task writes the
// outputs from them exactly as a single run would have.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "compress/v1/compress.pb.h"

namespace compress::engine {

inline constexpr char kBlockCheckpointDir[] = "blocks";

// Under a task's output folder: "blocks/layer-00007.safetensors".
std::string BlockCheckpointName(int64_t layer);

struct CheckpointedTensor {
  std::string name;                   // the checkpoint tensor it replaces
  at::Tensor values;                  // final values; undefined: unchanged
  std::vector<std::pair<std::string, at::Tensor>> packed_parts;  // the packed output's
  at::Tensor importance;              // GGUF importance (sum of x^2 per input); may be undefined
};

// One stage's share of the block: reports of the tensors it changed, in the
// order they were made, and its counters.
struct CheckpointedStage {
  std::vector<compress::v1::TensorReport> tensor_reports;
  double seconds = 0;
  int64_t bytes_in = 0;
  int64_t bytes_out = 0;
};

struct BlockCheckpoint {
  int64_t layer = 0;
  std::vector<CheckpointedTensor> tensors;
  std::vector<CheckpointedStage> stages;  // one per recipe stage, in order
  int64_t units = 0;                      // stage applications done (progress)
};

// Writes atomically (temp name, fsync, rename).
absl::Status WriteBlockCheckpoint(const std::string& path, const BlockCheckpoint& checkpoint);

// Reads a file WriteBlockCheckpoint wrote. INVALID_ARGUMENT naming the file
// when it is not one, is for another layer, or has another number of stages.
absl::StatusOr<BlockCheckpoint> ReadBlockCheckpoint(const std::string& path, int64_t layer,
                                                    size_t stages);

}  // namespace compress::engine
