// Autoregressive generation with a KV cache: one forward pass over the
// prompt (prefill), then one token at a time, each attending to the cache.
//
// Sampling is deterministic for a seed, and independent of LibTorch's global
// generator, its version and the device: logits are moved to the CPU as
// float64, and the choice uses a std::mt19937_64 seeded with `seed` (a
// sequence the C++ standard fixes) and this file's own uniform conversion and
// inverse-CDF walk, not std::uniform_real_distribution or at::multinomial,
// whose algorithms vary between implementations. So a seed gives the same
// tokens for the same logits everywhere (logits themselves may differ in the
// last bits between devices and thread counts).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/engine/model/llama_model.h"

namespace compress::engine {

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  // 0: greedy (argmax; the lowest id wins a tie). Otherwise softmax(logits /
  // temperature) is sampled.
  double temperature = 0.0;
  // Nucleus sampling, in (0, 1]: keep the most probable tokens (ties by
  // lower id) until their probability reaches top_p, at least one.
  double top_p = 1.0;
  uint64_t seed = 0;
  // Generation stops after emitting one of these (it is kept in the output).
  std::vector<int32_t> stop_token_ids;
  // Optional: called after each new token with the float32 CPU logits
  // [vocab] it was chosen from. A non-OK status stops generation and is
  // returned (streaming, cancellation).
  std::function<absl::Status(int32_t token, const at::Tensor& logits)> on_token;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // the new tokens, prompt excluded
  bool stopped = false;         // ended on a stop token
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0;  // the prompt's forward pass
  double decode_seconds = 0;   // every step after it, sampling included

  double prefill_tokens_per_second() const;
  // New tokens after the first (each costs one decode step) per decode second.
  double decode_tokens_per_second() const;
};

// Chooses tokens from logits, per GenerateOptions' temperature and top_p.
class TokenSampler {
 public:
  TokenSampler(double temperature, double top_p, uint64_t seed)
      : temperature_(temperature), top_p_(top_p), rng_(seed) {}

  // `logits`: [vocab] on any device, any floating dtype. INVALID_ARGUMENT for
  // another shape; INTERNAL if it holds NaN or +Inf (a broken model).
  absl::StatusOr<int32_t> Next(const at::Tensor& logits);

 private:
  double temperature_;
  double top_p_;
  std::mt19937_64 rng_;
};

// INVALID_ARGUMENT for max_new_tokens < 0, temperature < 0 or not finite,
// top_p outside (0, 1].
absl::Status ValidateGenerateOptions(const GenerateOptions& options);

// Generates up to options.max_new_tokens after `prompt_ids` (one sequence)
// under c10::InferenceMode. INVALID_ARGUMENT for an empty prompt or an id
// outside [0, vocab_size). A model that is not resident works, reloading
// every block at every step (slow).
absl::StatusOr<GenerateResult> Generate(const LlamaModel& model,
                                        const std::vector<int32_t>& prompt_ids,
                                        const GenerateOptions& options);

}  // namespace compress::engine
