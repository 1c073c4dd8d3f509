#include "worker/engine/eval/eval.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// One window: the model is fed the tokens at positions [begin, end) and the
// predictions at [first_scored, end) are scored (each against the token
// after its position).
struct Window {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t first_scored = 0;
  int64_t length() const { return end - begin; }
};

// The windows over `predictions` positions (see eval.h). Options valid.
std::vector<Window> PlanWindows(int64_t predictions, int64_t context_length, int64_t stride) {
  std::vector<Window> windows;
  int64_t previous_end = 0;
  for (int64_t begin = 0;; begin += stride) {
    const int64_t end = std::min(begin + context_length, predictions);
    windows.push_back(Window{begin, end, std::max(begin, previous_end)});
    previous_end = end;
    if (end == predictions) break;
  }
  return windows;
}

// Consecutive windows of equal length, at most `batch_size` each: one
// forward pass per group, since a batch needs equal lengths (no padding).
std::vector<std::vector<Window>> GroupWindows(const std::vector<Window>& windows,
                                              int64_t batch_size) {
  std::vector<std::vector<Window>> groups;
  for (const Window& w : windows) {
    if (groups.empty() || static_cast<int64_t>(groups.back().size()) == batch_size ||
        groups.back().front().length() != w.length()) {
      groups.emplace_back();
    }
    groups.back().push_back(w);
  }
  return groups;
}

// Checks what Perplexity and CompareToReference share and returns the
// tokens to evaluate (max_tokens applied).
absl::StatusOr<std::vector<int32_t>> CheckedTokens(const std::vector<int32_t>& tokens,
                                                   const PerplexityOptions& options,
                                                   int64_t vocab_size) {
  RETURN_IF_ERROR(ValidatePerplexityOptions(options));
  std::vector<int32_t> used = tokens;
  if (options.max_tokens > 0 && static_cast<int64_t>(used.size()) > options.max_tokens) {
    used.resize(static_cast<size_t>(options.max_tokens));
  }
  if (used.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokens: perplexity needs at least 2 tokens (one prediction), got ", tokens.size()));
  }
  for (size_t i = 0; i < used.size(); ++i) {
    if (used[i] < 0 || used[i] >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokens[", i, "] is ", used[i], ", outside the vocabulary [0, ", vocab_size, ")"));
    }
  }
  return used;
}

// The inputs of a group of windows, [windows, length] int64 on `device`.
at::Tensor GroupInput(const at::Tensor& all_tokens, const std::vector<Window>& group,
                      const at::Device& device) {
  std::vector<at::Tensor> rows;
  rows.reserve(group.size());
  for (const Window& w : group) rows.push_back(all_tokens.slice(0, w.begin, w.end));
  return at::stack(rows).to(device);
}

// The float64 log-probabilities [scored, vocab] at window `w`'s scored
// positions, from the logits [windows, length, vocab] of its group, where it
// is row `index`. Only the scored rows are converted: float64 over the whole
// window would cost 8 bytes per logit.
at::Tensor ScoredLogProbs(const at::Tensor& logits, int64_t index, const Window& w) {
  return at::log_softmax(
      logits.select(0, index).slice(0, w.first_scored - w.begin, w.length()).to(at::kDouble), -1);
}

// The tokens [scored] that window `w`'s scored positions predict.
at::Tensor Targets(const at::Tensor& all_tokens, const Window& w, const at::Device& device) {
  return all_tokens.slice(0, w.first_scored + 1, w.end + 1).to(device);
}

// Sum of -log p(target) over the rows of `log_probs`.
double NllSum(const at::Tensor& log_probs, const at::Tensor& targets) {
  return -log_probs.gather(1, targets.unsqueeze(1)).sum().item<double>();
}

// Fills the derived fields of a result from its sums.
PerplexityResult FinishResult(double nll_sum, int64_t scored, double seconds,
                              const PerplexityOptions& options, int64_t windows) {
  PerplexityResult result;
  result.mean_nll = nll_sum / static_cast<double>(scored);
  result.perplexity = std::exp(result.mean_nll);
  result.tokens_scored = scored;
  result.windows = windows;
  result.context_length = options.context_length;
  result.stride = options.stride;
  result.seconds = seconds;
  result.tokens_per_second = seconds > 0 ? static_cast<double>(scored) / seconds : 0.0;
  return result;
}

absl::Status CancelledAfter(int64_t done, int64_t total) {
  return absl::CancelledError(
      absl::StrCat("evaluation cancelled after ", done, " of ", total, " windows"));
}

absl::Status NanError(absl::string_view model, int64_t window) {
  return absl::InternalError(absl::StrCat("the ", model, " model's logits in window ", window,
                                          " hold NaN: the model output is broken"));
}

}  // namespace

absl::Status ValidatePerplexityOptions(const PerplexityOptions& options) {
  if (options.context_length < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("context_length must be at least 1, got ", options.context_length));
  }
  if (options.stride < 1 || options.stride > options.context_length) {
    return absl::InvalidArgumentError(
        absl::StrCat("stride must be in [1, context_length = ", options.context_length, "], got ",
                     options.stride));
  }
  if (options.max_tokens != 0 && options.max_tokens < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be 0 (no limit) or at least 2, got ", options.max_tokens));
  }
  if (options.batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch_size must be at least 1, got ", options.batch_size));
  }
  return absl::OkStatus();
}

absl::StatusOr<PerplexityResult> Perplexity(const LlamaModel& model,
                                            const std::vector<int32_t>& tokens,
                                            const PerplexityOptions& options) {
  ASSIGN_OR_RETURN(const std::vector<int32_t> used,
                   CheckedTokens(tokens, options, model.config().vocab_size));
  const int64_t predictions = static_cast<int64_t>(used.size()) - 1;
  const std::vector<Window> windows =
      PlanWindows(predictions, options.context_length, options.stride);
  const std::vector<std::vector<Window>> groups = GroupWindows(windows, options.batch_size);

  c10::InferenceMode inference;
  return CatchTorchErrors("perplexity", [&]() -> absl::StatusOr<PerplexityResult> {
    const Clock::time_point start = Clock::now();
    const at::Tensor all_tokens =
        at::tensor(used, at::TensorOptions().dtype(at::kInt)).to(at::kLong);
    double nll_sum = 0;
    int64_t scored = 0;
    int64_t done = 0;
    for (const std::vector<Window>& group : groups) {
      if (options.is_cancelled && options.is_cancelled()) {
        return CancelledAfter(done, static_cast<int64_t>(windows.size()));
      }
      ASSIGN_OR_RETURN(const at::Tensor logits,
                       model.Forward(GroupInput(all_tokens, group, model.device())));
      for (size_t i = 0; i < group.size(); ++i) {
        const Window& w = group[i];
        const double nll = NllSum(ScoredLogProbs(logits, static_cast<int64_t>(i), w),
                                  Targets(all_tokens, w, model.device()));
        if (std::isnan(nll)) return NanError("evaluated", done);
        nll_sum += nll;
        scored += w.end - w.first_scored;
        ++done;
      }
    }
    return FinishResult(nll_sum, scored, Seconds(Clock::now() - start), options,
                        static_cast<int64_t>(windows.size()));
  });
}

absl::StatusOr<DivergenceResult> CompareToReference(const LlamaModel& reference,
                                                    const LlamaModel& candidate,
                                                    const std::vector<int32_t>& tokens,
                                                    const PerplexityOptions& options) {
  const int64_t vocab_size = reference.config().vocab_size;
  if (candidate.config().vocab_size != vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("vocab_size differs: the reference has ", vocab_size, ", the candidate ",
                     candidate.config().vocab_size, "; KL needs the same vocabulary"));
  }
  ASSIGN_OR_RETURN(const std::vector<int32_t> used, CheckedTokens(tokens, options, vocab_size));
  const int64_t predictions = static_cast<int64_t>(used.size()) - 1;
  const std::vector<Window> windows =
      PlanWindows(predictions, options.context_length, options.stride);
  const std::vector<std::vector<Window>> groups = GroupWindows(windows, options.batch_size);

  c10::InferenceMode inference;
  return CatchTorchErrors("divergence", [&]() -> absl::StatusOr<DivergenceResult> {
    const at::Device& device = reference.device();
    const at::Tensor all_tokens =
        at::tensor(used, at::TensorOptions().dtype(at::kInt)).to(at::kLong);
    Clock::duration reference_time{0};
    Clock::duration candidate_time{0};
    double reference_nll = 0;
    double candidate_nll = 0;
    double kl_sum = 0;
    double kl_max = 0;
    int64_t top1_matches = 0;
    int64_t scored = 0;
    int64_t done = 0;
    for (const std::vector<Window>& group : groups) {
      if (options.is_cancelled && options.is_cancelled()) {
        return CancelledAfter(done, static_cast<int64_t>(windows.size()));
      }
      Clock::time_point t0 = Clock::now();
      ASSIGN_OR_RETURN(const at::Tensor reference_logits,
                       reference.Forward(GroupInput(all_tokens, group, device)));
      Clock::time_point t1 = Clock::now();
      ASSIGN_OR_RETURN(at::Tensor candidate_logits,
                       candidate.Forward(GroupInput(all_tokens, group, candidate.device())));
      candidate_logits = candidate_logits.to(device);
      candidate_time += Clock::now() - t1;
      reference_time += t1 - t0;

      for (size_t i = 0; i < group.size(); ++i) {
        const Window& w = group[i];
        const int64_t index = static_cast<int64_t>(i);
        const at::Tensor targets = Targets(all_tokens, w, device);

        t0 = Clock::now();
        const at::Tensor log_p = ScoredLogProbs(reference_logits, index, w);
        const double reference_window_nll = NllSum(log_p, targets);
        t1 = Clock::now();
        const at::Tensor log_q = ScoredLogProbs(candidate_logits, index, w);
        const double candidate_window_nll = NllSum(log_q, targets);
        const Clock::time_point t2 = Clock::now();
        reference_time += t1 - t0;
        candidate_time += t2 - t1;
        if (std::isnan(reference_window_nll)) return NanError("reference", done);
        if (std::isnan(candidate_window_nll)) return NanError("candidate", done);
        reference_nll += reference_window_nll;
        candidate_nll += candidate_window_nll;

        // p log(p/q), with 0 log 0 = 0: where the reference gives a token
        // probability 0 (log_p = -inf) the term would otherwise be NaN.
        const at::Tensor p = log_p.exp();
        at::Tensor terms = p * (log_p - log_q);
        terms.masked_fill_(p == 0, 0.0);
        const at::Tensor kl = terms.sum(-1);  // [scored]
        kl_sum += kl.sum().item<double>();
        kl_max = std::max(kl_max, kl.max().item<double>());
        top1_matches += log_p.argmax(-1).eq(log_q.argmax(-1)).sum().item<int64_t>();
        scored += w.end - w.first_scored;
        ++done;
      }
    }
    DivergenceResult result;
    result.mean_kl = kl_sum / static_cast<double>(scored);
    result.max_kl = kl_max;
    result.top1_agreement = static_cast<double>(top1_matches) / static_cast<double>(scored);
    const int64_t window_count = static_cast<int64_t>(windows.size());
    result.reference =
        FinishResult(reference_nll, scored, Seconds(reference_time), options, window_count);
    result.candidate =
        FinishResult(candidate_nll, scored, Seconds(candidate_time), options, window_count);
    return result;
  });
}

absl::StatusOr<SampleResult> SampleText(const LlamaModel& model, const Tokenizer& tokenizer,
                                        const std::string& prompt, GenerateOptions options) {
  const std::vector<int32_t> prompt_ids = tokenizer.Encode(prompt, /*add_bos=*/true);
  if (prompt_ids.empty()) {
    return absl::InvalidArgumentError(
        "prompt: encodes to no token (empty, and the tokenizer has no BOS)");
  }
  if (options.stop_token_ids.empty() && tokenizer.eos_id().has_value()) {
    options.stop_token_ids.push_back(*tokenizer.eos_id());
  }
  ASSIGN_OR_RETURN(const GenerateResult generated, Generate(model, prompt_ids, options));
  SampleResult result;
  result.prompt = prompt;
  result.completion = tokenizer.Decode(generated.tokens, /*skip_special=*/true);
  result.tokens = generated.tokens;
  result.stopped = generated.stopped;
  result.tokens_per_second = generated.decode_tokens_per_second();
  return result;
}

}  // namespace compress::engine
