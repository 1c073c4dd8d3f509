// Model evaluation: perplexity over a token stream, divergence of a
// compressed model from its reference, and text samples.
//
// Windows. A causal LM makes one prediction per input position: the logits
// at position i score token i + 1. A stream of n tokens thus has n - 1
// predictions, at positions [0, n - 1). Perplexity follows the sliding
// window with stride of Hugging Face's perplexity guide, counted in
// predictions: window k feeds the model the tokens at positions
// [k * stride, min(k * stride + context_length, n - 1)) and scores only the
// predictions the previous window did not (the first window scores all of
// its own), so each prediction is made once, from at least
// context_length - stride + 1 tokens of context where the stream allows.
// The last window is the first whose end reaches n - 1 (it may be shorter).
//
// Why predictions and not tokens: HF's loop feeds windows of
// context_length tokens and loses the first token of every window to the
// label shift, so with stride == context_length it scores n - windows tokens,
// not n - 1. Counting predictions, the model still sees at most
// context_length tokens per window, every stride in [1, context_length]
// scores exactly n - 1 tokens, and no logit is computed in vain (HF's loop
// discards each window's last one). Each scored token sees one token more
// context than in HF's loop with the same settings.
//
// Numerics: logits come out of the model in its compute dtype; every
// log-softmax, NLL and KL is computed from them in float64 and summed in
// float64.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/engine/model/generate.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/tokenizer/tokenizer.h"

namespace compress::engine {

struct PerplexityOptions {
  // Tokens the model sees per window (and predictions it makes), >= 1.
  int64_t context_length = 512;
  // Positions between window starts, in [1, context_length]. Smaller gives
  // each prediction more context and costs context_length / stride more
  // compute.
  int64_t stride = 512;
  // 0: evaluate every token. Otherwise only the first max_tokens (>= 2).
  int64_t max_tokens = 0;
  // Windows of equal length run in one forward pass of up to this many
  // sequences, >= 1. Only full windows batch; the last, shorter one runs
  // alone.
  int64_t batch_size = 4;
  // Optional: polled before every forward pass; true stops the evaluation
  // with CANCELLED.
  std::function<bool()> is_cancelled;
};

struct PerplexityResult {
  double perplexity = 0;      // exp(mean_nll)
  double mean_nll = 0;        // nats per scored token
  int64_t tokens_scored = 0;  // always (evaluated tokens) - 1
  int64_t windows = 0;
  int64_t context_length = 0;
  int64_t stride = 0;
  double seconds = 0;            // forward passes and scoring
  double tokens_per_second = 0;  // tokens_scored / seconds
};

// The measures llama.cpp's perplexity tool reports with --kl-divergence,
// over the same windows as Perplexity.
struct DivergenceResult {
  // KL(reference || candidate) = sum_v p(v) (log p(v) - log q(v)) over the
  // full vocabulary, in nats, per scored position: its mean and maximum.
  double mean_kl = 0;
  double max_kl = 0;
  // Fraction of scored positions where both models' most likely token is
  // the same.
  double top1_agreement = 0;
  // Each model's perplexity on the same windows; seconds are that model's
  // forward passes and scoring, the KL's time shared by neither.
  PerplexityResult reference;
  PerplexityResult candidate;
};

// INVALID_ARGUMENT naming the field: context_length < 1, stride outside
// [1, context_length], max_tokens not 0 and < 2, batch_size < 1.
absl::Status ValidatePerplexityOptions(const PerplexityOptions& options);

// The perplexity of `model` on `tokens` (see Windows above), under
// c10::InferenceMode. INVALID_ARGUMENT naming the field for invalid options,
// fewer than 2 tokens (after max_tokens) or an id outside the model's
// vocabulary; CANCELLED when options.is_cancelled says so; INTERNAL if the
// model's output holds NaN.
absl::StatusOr<PerplexityResult> Perplexity(const LlamaModel& model,
                                            const std::vector<int32_t>& tokens,
                                            const PerplexityOptions& options);

// How far `candidate` (e.g. a quantized model) is from `reference` on
// `tokens`: both run on the same windows, the candidate's logits compared on
// the reference's device. INVALID_ARGUMENT when the vocabulary sizes differ,
// and as Perplexity.
absl::StatusOr<DivergenceResult> CompareToReference(const LlamaModel& reference,
                                                    const LlamaModel& candidate,
                                                    const std::vector<int32_t>& tokens,
                                                    const PerplexityOptions& options);

struct SampleResult {
  std::string prompt;
  std::string completion;        // the new tokens decoded, special tokens skipped
  std::vector<int32_t> tokens;   // the new tokens, prompt excluded
  bool stopped = false;          // ended on a stop token
  double tokens_per_second = 0;  // decode speed (GenerateResult's)
};

// Encodes `prompt` (with the tokenizer's BOS, if it has one), generates and
// decodes. When options.stop_token_ids is empty the tokenizer's EOS, if any,
// stops generation. INVALID_ARGUMENT naming "prompt" when it encodes to no
// token; otherwise Generate's errors.
absl::StatusOr<SampleResult> SampleText(const LlamaModel& model, const Tokenizer& tokenizer,
                                        const std::string& prompt, GenerateOptions options);

}  // namespace compress::engine
