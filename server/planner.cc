#include "server/planner.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/recipe.h"

namespace compress::server {
namespace {

constexpr int64_t kMiB = int64_t{1} << 20;
// LibTorch, the process, the mapped pages in flight.
constexpr int64_t kRuntimeBytes = 512 * kMiB;
// Calibration samples per forward pass (the engine's samples_per_pass).
constexpr int64_t kSamplesPerPass = 8;
// The engine keeps an evaluated model resident (two F32 copies) up to this.
constexpr int64_t kResidentEvaluationBytes = int64_t{4} << 30;
constexpr int64_t kEvaluationContext = 256;
// Of the job's progress: block tasks share this, the assemble task the rest.
constexpr double kBlocksShare = 0.8;

// "model.layers.<n>.…" -> n, else -1.
int64_t LayerOf(absl::string_view name) {
  if (!absl::ConsumePrefix(&name, "model.layers.")) return -1;
  int64_t layer = 0;
  const size_t dot = name.find('.');
  if (dot == absl::string_view::npos || !absl::SimpleAtoi(name.substr(0, dot), &layer)) return -1;
  return layer;
}

int64_t ConfigInt(const nlohmann::json& config, const char* key, int64_t fallback) {
  auto it = config.find(key);
  if (it == config.end() || !it->is_number_integer()) return fallback;
  return it->get<int64_t>();
}

// Peak of one block task: the block (stored and an F32 working copy), the
// calibration activations (twice in parallel mode), every block linear's
// X^T X, one pass's attention scores and MLP activations, and GPTQ's
// working copies of the widest linear.
int64_t BlockTaskBytes(const compress::v1::JobSpec& spec, const ModelShape& m) {
  const auto& calibration = spec.calibration();
  const int64_t samples =
      calibration.num_samples() > 0 ? calibration.num_samples() : kDefaultCalibrationSamples;
  const int64_t sequence = calibration.sequence_length() > 0 ? calibration.sequence_length()
                                                             : kDefaultCalibrationSequenceLength;
  const bool parallel = calibration.propagation() == compress::v1::PROPAGATION_PARALLEL;
  const int64_t activations = samples * sequence * m.hidden_size * 4 * (parallel ? 2 : 1);
  const int64_t hessians =
      4 * (4 * m.hidden_size * m.hidden_size + m.intermediate_size * m.intermediate_size);
  const int64_t pass = std::min(samples, kSamplesPerPass);
  const int64_t attention = pass * std::max<int64_t>(m.num_heads, 1) * sequence * sequence * 4;
  const int64_t mlp = pass * sequence * m.intermediate_size * 4 * 3;
  const int64_t widest = m.largest_input_features * std::max(m.hidden_size, m.intermediate_size) * 4;
  return kRuntimeBytes + 3 * m.largest_block_bytes + activations + hessians + attention + mlp +
         3 * widest;
}

// Peak of a task that streams tensors one at a time and writes the outputs:
// the largest tensor and its quantized copies, plus evaluation if asked.
int64_t StreamingTaskBytes(const compress::v1::JobSpec& spec, const ModelShape& m) {
  int64_t bytes = kRuntimeBytes + 4 * m.largest_tensor_bytes;
  const bool evaluates = std::any_of(spec.stages().begin(), spec.stages().end(),
                                     [](const compress::v1::Stage& s) { return s.has_evaluate(); });
  if (evaluates) {
    const int64_t models = 2 * 4 * m.parameters;
    const int64_t weights = models <= kResidentEvaluationBytes ? models : 4 * m.largest_block_bytes;
    const int64_t logits = 2 * kEvaluationContext * m.vocab_size * 4;
    bytes = std::max(bytes, kRuntimeBytes + weights + logits + 4 * m.largest_tensor_bytes);
  }
  return bytes;
}

}  // namespace

absl::StatusOr<ModelShape> ReadModelShape(const std::vector<SafetensorsTensorInfo>& tensors,
                                          const std::string& config_json) {
  ModelShape m;
  std::map<int64_t, int64_t> block_bytes;
  for (const SafetensorsTensorInfo& t : tensors) {
    const int64_t bytes = static_cast<int64_t>(t.NumBytes());
    m.parameters += t.NumElements();
    m.total_bytes += bytes;
    m.largest_tensor_bytes = std::max(m.largest_tensor_bytes, bytes);
    const int64_t layer = LayerOf(t.name);
    if (layer < 0) {
      if (t.name == "model.embed_tokens.weight" && t.shape.size() == 2) {
        m.vocab_size = t.shape[0];
        m.hidden_size = t.shape[1];
      }
      continue;
    }
    block_bytes[layer] += bytes;
    m.layers = std::max(m.layers, layer + 1);
    if (absl::EndsWith(t.name, "_proj.weight") && t.shape.size() == 2) {
      m.largest_input_features = std::max(m.largest_input_features, t.shape[1]);
      if (absl::EndsWith(t.name, "mlp.up_proj.weight")) m.intermediate_size = t.shape[0];
    }
  }
  for (const auto& [layer, bytes] : block_bytes) m.largest_block_bytes = std::max(m.largest_block_bytes, bytes);
  if (!config_json.empty()) {
    nlohmann::json config = nlohmann::json::parse(config_json, nullptr, /*allow_exceptions=*/false);
    if (config.is_discarded() || !config.is_object()) {
      return absl::InvalidArgumentError("config.json: not a JSON object");
    }
    m.layers = std::max(m.layers, ConfigInt(config, "num_hidden_layers", m.layers));
    m.hidden_size = ConfigInt(config, "hidden_size", m.hidden_size);
    m.intermediate_size = ConfigInt(config, "intermediate_size", m.intermediate_size);
    m.num_heads = ConfigInt(config, "num_attention_heads", m.num_heads);
    m.vocab_size = ConfigInt(config, "vocab_size", m.vocab_size);
  }
  if (m.num_heads <= 0) m.num_heads = std::max<int64_t>(1, m.hidden_size / 128);
  return m;
}

bool JobCalibrates(const compress::v1::JobSpec& spec) {
  for (const compress::v1::Stage& stage : spec.stages()) {
    if (stage.has_gptq() || stage.has_awq()) return true;
    if (stage.has_prune() && stage.prune().method() != compress::v1::MAGNITUDE) return true;
  }
  for (const compress::v1::GgufOutput& gguf : spec.gguf()) {
    if (gguf.importance()) return true;
  }
  return false;
}

std::vector<TaskPlan> PlanTasks(const compress::v1::JobSpec& spec, const ModelShape& model,
                                const PlannerConfig& config) {
  TaskPlan streaming;
  streaming.memory_bytes = StreamingTaskBytes(spec, model);
  if (!JobCalibrates(spec) || model.layers <= 0) return {streaming};

  std::vector<TaskPlan> tasks;
  const bool parallel = spec.calibration().propagation() == compress::v1::PROPAGATION_PARALLEL;
  const int64_t ranges =
      parallel ? std::clamp<int64_t>(config.max_block_tasks, 1, model.layers) : 1;
  const int64_t block_bytes = BlockTaskBytes(spec, model);
  for (int64_t r = 0; r < ranges; ++r) {
    TaskPlan task;
    task.kind = compress::v1::TASK_BLOCKS;
    // Contiguous, sizes differing by at most one block.
    task.first_layer = static_cast<int32_t>(r * model.layers / ranges);
    task.end_layer = static_cast<int32_t>((r + 1) * model.layers / ranges);
    task.memory_bytes = block_bytes;
    task.weight = kBlocksShare * static_cast<double>(task.end_layer - task.first_layer) /
                  static_cast<double>(model.layers);
    tasks.push_back(task);
  }
  TaskPlan assemble = streaming;
  assemble.kind = compress::v1::TASK_ASSEMBLE;
  assemble.weight = 1.0 - kBlocksShare;
  tasks.push_back(assemble);
  return tasks;
}

}  // namespace compress::server
