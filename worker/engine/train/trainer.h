// Causal language-model training of a resident LlamaModel: AdamW (decoupled
// weight decay), linear warm-up then cosine decay, global-norm gradient
// clipping, gradient accumulation, Hugging Face checkpoints. Deterministic
// for a seed on CPU: batches are drawn from a seeded generator and nothing
// else is random.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/engine/model/llama_model.h"

namespace compress::engine {

struct LearningRateSchedule {
  double peak = 3e-3;
  double minimum = 3e-4;      // reached at the last step
  int64_t warmup_steps = 100;  // linear from peak/warmup_steps to peak
  int64_t total_steps = 1000;

  // The rate for optimizer step `step` (0-based).
  double At(int64_t step) const;
};

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double epsilon = 1e-8;
  double weight_decay = 0.1;  // not applied to 1-D tensors (norms, biases)
};

// AdamW over named parameters (leaf tensors updated in place).
class AdamW {
 public:
  AdamW(std::vector<std::pair<std::string, at::Tensor>> parameters, AdamWOptions options);
  // One update with the gradients now in each parameter's .grad().
  void Step(double learning_rate);
  int64_t steps() const { return steps_; }

 private:
  struct Slot {
    std::string name;
    at::Tensor parameter, first_moment, second_moment;
    bool decay;
  };
  std::vector<Slot> slots_;
  AdamWOptions options_;
  int64_t steps_ = 0;
};

// Scales every gradient so that their global L2 norm is at most `max_norm`;
// returns the norm before clipping.
double ClipGradientNorm(const std::vector<std::pair<std::string, at::Tensor>>& parameters,
                        double max_norm);

struct TrainStep {
  int64_t step = 0;             // optimizer steps done
  double loss = 0;              // mean over the step's micro-batches
  double learning_rate = 0;
  double gradient_norm = 0;     // before clipping
  double tokens_per_second = 0;
};

struct TrainOptions {
  LearningRateSchedule schedule;
  AdamWOptions adamw;
  int64_t batch_size = 8;        // sequences per micro-batch
  int64_t sequence_length = 128;
  int64_t accumulation_steps = 1;  // micro-batches per optimizer step
  double max_gradient_norm = 1.0;  // <= 0: no clipping
  uint64_t seed = 0;
  std::string checkpoint_dir;      // empty: no checkpoints
  int64_t checkpoint_every = 0;    // steps; the last step always checkpoints
  std::function<void(const TrainStep&)> on_step;
  std::function<bool()> is_cancelled;  // polled between micro-batches
};

struct TrainResult {
  std::vector<TrainStep> steps;
  std::vector<std::string> checkpoints;  // folders written, in order
};

// Trains on random windows of `tokens` (each sequence_length + 1 long: inputs
// and shifted targets). The model must be resident and loaded outside
// InferenceMode. INVALID_ARGUMENT names a bad option; CANCELLED if stopped.
absl::StatusOr<TrainResult> TrainCausalLm(LlamaModel& model, const std::vector<int32_t>& tokens,
                                          const TrainOptions& options);

}  // namespace compress::engine
