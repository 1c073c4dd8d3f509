// The planner: splits a job into tasks and estimates each task's peak
// memory, from the model's tensor headers and config.json alone (no
// weights are read, no LibTorch).
//
// A job whose stages calibrate (GPTQ, AWQ, Wanda, SparseGPT, GGUF importance) runs as block
// tasks plus one assemble task. With parallel propagation every block sees
// the original model's activations, so contiguous block ranges run on
// different workers at once; with sequential propagation one block task
// runs them in order. Either way every finished block is checkpointed, and
// the assemble task writes the outputs and evaluates. Other jobs are one
// whole task: they stream tensor by tensor and have no blocks to share out.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/safetensors_header.h"
#include "compress/v1/compress.pb.h"

namespace compress::server {

// What the planner knows of a model.
struct ModelShape {
  int64_t layers = 0;             // decoder blocks
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_heads = 0;
  int64_t vocab_size = 0;
  int64_t parameters = 0;
  int64_t total_bytes = 0;        // as stored
  int64_t largest_tensor_bytes = 0;
  int64_t largest_block_bytes = 0;  // one decoder block as stored
  int64_t largest_input_features = 0;  // of any block linear (Hessian side)
};

// From the tensors of every safetensors file and config.json's text (may
// be empty: sizes are then read off the tensor shapes).
absl::StatusOr<ModelShape> ReadModelShape(const std::vector<SafetensorsTensorInfo>& tensors,
                                          const std::string& config_json);

struct PlannerConfig {
  int max_block_tasks = 8;  // block ranges one parallel job is split into
};

struct TaskPlan {
  compress::v1::TaskKind kind = compress::v1::TASK_WHOLE;
  int32_t first_layer = 0;
  int32_t end_layer = 0;
  int64_t memory_bytes = 0;   // estimated peak
  double weight = 1.0;        // its share of the job's progress
};

// Whether the job's stages need calibration statistics (GPTQ, AWQ, Wanda,
// SparseGPT, GGUF importance).
bool JobCalibrates(const compress::v1::JobSpec& spec);

// The tasks, in dispatch order (the assemble task last).
std::vector<TaskPlan> PlanTasks(const compress::v1::JobSpec& spec, const ModelShape& model,
                                const PlannerConfig& config);

}  // namespace compress::server
