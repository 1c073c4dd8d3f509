#include "worker/engine/model/generate.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// A uniform double in [0, 1) from the top 53 bits.
double Uniform(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace

double GenerateResult::prefill_tokens_per_second() const {
  return prefill_seconds > 0 ? static_cast<double>(prompt_tokens) / prefill_seconds : 0.0;
}

double GenerateResult::decode_tokens_per_second() const {
  return decode_seconds > 0 && tokens.size() > 1
             ? static_cast<double>(tokens.size() - 1) / decode_seconds
             : 0.0;
}

absl::StatusOr<int32_t> TokenSampler::Next(const at::Tensor& logits) {
  if (!logits.defined() || logits.dim() != 1 || logits.numel() == 0 ||
      !at::isFloatingType(logits.scalar_type())) {
    return absl::InvalidArgumentError("sampling needs floating-point logits of shape [vocab]");
  }
  ASSIGN_OR_RETURN(const at::Tensor values,
                   CatchTorchErrors("sampling", [&]() -> absl::StatusOr<at::Tensor> {
                     return logits.detach().to(at::kCPU, at::kDouble).contiguous();
                   }));
  const double* l = values.data_ptr<double>();
  const int64_t vocab = values.numel();
  int64_t best = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isnan(l[i]) || l[i] == std::numeric_limits<double>::infinity()) {
      return absl::InternalError(
          absl::StrCat("logits hold ", l[i], " at token ", i, ": the model output is broken"));
    }
    if (l[i] > l[best]) best = i;
  }
  if (temperature_ == 0.0 || l[best] == -std::numeric_limits<double>::infinity()) {
    return static_cast<int32_t>(best);
  }

  // softmax(l / T), unnormalized: the walk below scales by the kept mass.
  std::vector<double> p(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) p[i] = std::exp((l[i] - l[best]) / temperature_);
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  size_t kept = order.size();
  if (top_p_ < 1.0) {
    std::sort(order.begin(), order.end(),
              [&](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    const double total = std::accumulate(p.begin(), p.end(), 0.0);
    double mass = 0.0;
    kept = 0;
    while (kept < order.size() && (kept == 0 || mass < top_p_ * total)) mass += p[order[kept++]];
  }
  double kept_mass = 0.0;
  for (size_t i = 0; i < kept; ++i) kept_mass += p[order[i]];
  const double target = Uniform(rng_) * kept_mass;
  double cumulative = 0.0;
  for (size_t i = 0; i < kept; ++i) {
    cumulative += p[order[i]];
    if (target < cumulative) return order[i];
  }
  return order[kept - 1];  // rounding left target at the very top
}

absl::Status ValidateGenerateOptions(const GenerateOptions& o) {
  if (o.max_new_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens ", o.max_new_tokens, " is negative"));
  }
  if (!std::isfinite(o.temperature) || o.temperature < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature ", o.temperature, " must be 0 (greedy) or positive"));
  }
  if (!(o.top_p > 0 && o.top_p <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p ", o.top_p, " is outside (0, 1]"));
  }
  return absl::OkStatus();
}

absl::StatusOr<GenerateResult> Generate(const LlamaModel& model,
                                        const std::vector<int32_t>& prompt_ids,
                                        const GenerateOptions& options) {
  RETURN_IF_ERROR(ValidateGenerateOptions(options));
  if (prompt_ids.empty()) return absl::InvalidArgumentError("the prompt is empty");
  const int64_t vocab = model.config().vocab_size;
  for (size_t i = 0; i < prompt_ids.size(); ++i) {
    if (prompt_ids[i] < 0 || prompt_ids[i] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token ", i, " is ", prompt_ids[i],
                                                     ", outside the vocabulary [0, ", vocab, ")"));
    }
  }
  GenerateResult result;
  result.prompt_tokens = static_cast<int64_t>(prompt_ids.size());
  if (options.max_new_tokens == 0) return result;

  c10::InferenceMode inference;
  return CatchTorchErrors("generate", [&]() -> absl::StatusOr<GenerateResult> {
    KvCache cache(model.config().num_hidden_layers, result.prompt_tokens + options.max_new_tokens);
    TokenSampler sampler(options.temperature, options.top_p, options.seed);
    // The float32 CPU logits of the last position.
    auto last_logits = [&](const at::Tensor& input) -> absl::StatusOr<at::Tensor> {
      ASSIGN_OR_RETURN(const at::Tensor logits, model.Forward(input, &cache));
      return logits.select(0, 0).select(0, -1).to(at::kCPU, at::kFloat);
    };

    const Clock::time_point start = Clock::now();
    const at::Tensor prompt =
        at::tensor(prompt_ids, at::TensorOptions().dtype(at::kInt)).to(model.device()).unsqueeze(0);
    ASSIGN_OR_RETURN(at::Tensor logits, last_logits(prompt));
    const Clock::time_point prefilled = Clock::now();
    result.prefill_seconds = Seconds(prefilled - start);

    for (int64_t step = 0; step < options.max_new_tokens; ++step) {
      ASSIGN_OR_RETURN(const int32_t token, sampler.Next(logits));
      result.tokens.push_back(token);
      if (options.on_token) RETURN_IF_ERROR(options.on_token(token, logits));
      if (std::find(options.stop_token_ids.begin(), options.stop_token_ids.end(), token) !=
          options.stop_token_ids.end()) {
        result.stopped = true;
        break;
      }
      if (step + 1 == options.max_new_tokens) break;
      const at::Tensor next =
          at::full({1, 1}, token, at::TensorOptions().dtype(at::kLong).device(model.device()));
      ASSIGN_OR_RETURN(logits, last_logits(next));
    }
    result.decode_seconds = Seconds(Clock::now() - prefilled);
    return result;
  });
}

}  // namespace compress::engine
