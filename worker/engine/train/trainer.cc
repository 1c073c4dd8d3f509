#include "worker/engine/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {

double LearningRateSchedule::At(int64_t step) const {
  if (warmup_steps > 0 && step < warmup_steps) {
    return peak * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  }
  const int64_t decay_steps = std::max<int64_t>(1, total_steps - warmup_steps - 1);
  const double progress =
      std::clamp(static_cast<double>(step - warmup_steps) / static_cast<double>(decay_steps), 0.0, 1.0);
  return minimum + 0.5 * (peak - minimum) * (1.0 + std::cos(M_PI * progress));
}

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> parameters, AdamWOptions options)
    : options_(options) {
  for (auto& [name, parameter] : parameters) {
    slots_.push_back({name, parameter, at::zeros_like(parameter), at::zeros_like(parameter),
                      parameter.dim() >= 2});
  }
}

void AdamW::Step(double learning_rate) {
  at::NoGradGuard no_grad;
  ++steps_;
  const double bias1 = 1.0 - std::pow(options_.beta1, static_cast<double>(steps_));
  const double bias2 = 1.0 - std::pow(options_.beta2, static_cast<double>(steps_));
  for (Slot& slot : slots_) {
    const at::Tensor& grad = slot.parameter.grad();
    if (!grad.defined()) continue;
    // Decoupled weight decay (Loshchilov & Hutter): shrink, then the Adam step.
    if (slot.decay && options_.weight_decay > 0) {
      slot.parameter.mul_(1.0 - learning_rate * options_.weight_decay);
    }
    slot.first_moment.mul_(options_.beta1).add_(grad, 1.0 - options_.beta1);
    slot.second_moment.mul_(options_.beta2).addcmul_(grad, grad, 1.0 - options_.beta2);
    at::Tensor denominator = (slot.second_moment / bias2).sqrt_().add_(options_.epsilon);
    slot.parameter.addcdiv_(slot.first_moment, denominator, -learning_rate / bias1);
  }
}

double ClipGradientNorm(const std::vector<std::pair<std::string, at::Tensor>>& parameters,
                        double max_norm) {
  at::NoGradGuard no_grad;
  double squared = 0;
  for (const auto& [name, parameter] : parameters) {
    if (parameter.grad().defined()) {
      squared += parameter.grad().to(at::kDouble).pow(2).sum().item<double>();
    }
  }
  const double norm = std::sqrt(squared);
  if (max_norm > 0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    for (const auto& [name, parameter] : parameters) {
      if (parameter.grad().defined()) parameter.grad().mul_(scale);
    }
  }
  return norm;
}

namespace {

absl::Status ValidateTrainOptions(const LlamaModel& model, const std::vector<int32_t>& tokens,
                                  const TrainOptions& o) {
  if (!model.resident()) return absl::InvalidArgumentError("model: must be loaded resident to train");
  if (o.batch_size < 1) return absl::InvalidArgumentError("batch_size: must be at least 1");
  if (o.sequence_length < 1) return absl::InvalidArgumentError("sequence_length: must be at least 1");
  if (o.accumulation_steps < 1) {
    return absl::InvalidArgumentError("accumulation_steps: must be at least 1");
  }
  if (o.schedule.total_steps < 1) return absl::InvalidArgumentError("schedule.total_steps: must be at least 1");
  if (!(o.schedule.peak > 0) || o.schedule.minimum < 0 || o.schedule.minimum > o.schedule.peak) {
    return absl::InvalidArgumentError("schedule: need 0 <= minimum <= peak and peak > 0");
  }
  if (static_cast<int64_t>(tokens.size()) < o.sequence_length + 1) {
    return absl::InvalidArgumentError(absl::StrCat("tokens: ", tokens.size(),
                                                   " is fewer than sequence_length + 1 = ",
                                                   o.sequence_length + 1));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TrainResult> TrainCausalLm(LlamaModel& model, const std::vector<int32_t>& tokens,
                                          const TrainOptions& options) {
  if (absl::Status valid = ValidateTrainOptions(model, tokens, options); !valid.ok()) return valid;
  return CatchTorchErrors("training", [&]() -> absl::StatusOr<TrainResult> {
    std::vector<std::pair<std::string, at::Tensor>> parameters = model.NamedParameters();
    for (auto& [name, parameter] : parameters) parameter.set_requires_grad(true);
    AdamW optimizer(parameters, options.adamw);
    const at::Tensor corpus =
        at::from_blob(const_cast<int32_t*>(tokens.data()), {static_cast<int64_t>(tokens.size())},
                      at::kInt)
            .to(at::kLong);
    at::Generator generator = at::detail::createCPUGenerator(options.seed);
    const int64_t window = options.sequence_length + 1;
    const int64_t starts = static_cast<int64_t>(tokens.size()) - window + 1;
    const int64_t vocab = model.config().vocab_size;

    TrainResult result;
    for (int64_t step = 0; step < options.schedule.total_steps; ++step) {
      auto began = std::chrono::steady_clock::now();
      for (auto& [name, parameter] : parameters) parameter.mutable_grad() = at::Tensor();
      double loss_sum = 0;
      for (int64_t micro = 0; micro < options.accumulation_steps; ++micro) {
        if (options.is_cancelled && options.is_cancelled()) {
          return absl::CancelledError(absl::StrCat("training cancelled at step ", step));
        }
        at::Tensor offsets = at::randint(starts, {options.batch_size, 1}, generator, at::kLong);
        at::Tensor index = offsets + at::arange(window, at::kLong).unsqueeze(0);
        at::Tensor batch = corpus.index_select(0, index.reshape({-1}))
                               .reshape({options.batch_size, window})
                               .to(model.device());
        at::Tensor inputs = batch.narrow(1, 0, options.sequence_length);
        at::Tensor targets = batch.narrow(1, 1, options.sequence_length);
        absl::StatusOr<at::Tensor> logits = model.Forward(inputs);
        if (!logits.ok()) return logits.status();
        at::Tensor loss = at::cross_entropy_loss(logits->to(at::kFloat).reshape({-1, vocab}),
                                                 targets.reshape({-1}));
        // Mean over micro-batches: each contributes 1/accumulation of the gradient.
        (loss / static_cast<double>(options.accumulation_steps)).backward();
        loss_sum += loss.item<double>();
      }
      TrainStep info;
      info.step = step + 1;
      info.loss = loss_sum / static_cast<double>(options.accumulation_steps);
      info.learning_rate = options.schedule.At(step);
      info.gradient_norm = ClipGradientNorm(parameters, options.max_gradient_norm);
      optimizer.Step(info.learning_rate);
      double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
      info.tokens_per_second = static_cast<double>(options.batch_size * options.accumulation_steps *
                                                   options.sequence_length) /
                               std::max(seconds, 1e-9);
      result.steps.push_back(info);
      if (options.on_step) options.on_step(info);

      const bool last = step + 1 == options.schedule.total_steps;
      const bool due = options.checkpoint_every > 0 && info.step % options.checkpoint_every == 0;
      if (!options.checkpoint_dir.empty() && (last || due)) {
        std::string dir = (std::filesystem::path(options.checkpoint_dir) /
                           absl::StrFormat("step-%06d", info.step))
                              .string();
        if (absl::Status saved = model.SaveHuggingFace(dir); !saved.ok()) return saved;
        result.checkpoints.push_back(dir);
      }
    }
    for (auto& [name, parameter] : parameters) {
      parameter.mutable_grad() = at::Tensor();
      parameter.set_requires_grad(false);
    }
    return result;
  });
}

}  // namespace compress::engine
