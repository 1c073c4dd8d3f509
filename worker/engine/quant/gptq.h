// GPTQ (Frantar et al., 2022): quantizes a weight column by column and
// spreads each column's rounding error over the columns not yet quantized,
// weighted by the inverse Hessian of the layer's inputs, so that the layer's
// output on the calibration inputs, not its weights, stays close.
//
// With H = X^T X (+ dampening) over the calibration inputs X [tokens, in]
// and U the upper Cholesky factor of H^-1, column i (in processing order)
// is quantized to q_i with the RTN quantizer's grid (worker/engine/quant/rtn.h)
// and the rest is updated: W[:, j] -= (w_i - q_i) / U[i, i] * U[i, j] for
// j > i. Updates are applied lazily in blocks of block_size columns (the same
// result, computed with matrix products). Each group's scale and zero come
// from the group's columns as updated when the group starts; with act_order
// the columns are processed by decreasing H[i, i], and static_groups fixes
// every group's scale and zero from the original weight first, so that
// groups stay contiguous in the checkpoint (g_idx is i / group_size).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/engine/quant/quantized_tensor.h"
#include "worker/engine/quant/rtn.h"

namespace compress::engine {

struct GptqOptions {
  RtnOptions grid;              // bits, symmetric, group_size of the result
  double dampening = 0.01;      // fraction of the mean of diag(H) added to it
  int64_t block_size = 128;     // columns per lazy update
  bool act_order = false;       // columns by decreasing H[i, i] (desc_act)
  // With act_order: scales and zeros from the original weight's groups
  // (required for a checkpoint whose g_idx is trivial). Always on here.
  bool static_groups = true;
  // A failed Cholesky retries with 10x the dampening, at most this many times.
  int max_dampening_retries = 4;
};

struct GptqResult {
  QuantizedTensor quantized;
  double dampening_used = 0;  // as a fraction of mean diag(H)
  int retries = 0;            // Cholesky failures before it succeeded
  int64_t dead_columns = 0;   // inputs that were always zero (their weights are zeroed)
};

// The upper Cholesky factor of (H + dampening * mean(diag H) * I)^-1, the
// dampening raised tenfold up to max_retries times while the factorization
// fails (GPTQ's and SparseGPT's step). FAILED_PRECONDITION names `label`.
struct DampedInverseCholesky {
  at::Tensor upper;
  double dampening_used = 0;
  int retries = 0;
};
absl::StatusOr<DampedInverseCholesky> DampedInverseCholeskyFactor(const at::Tensor& hessian,
                                                                  double dampening,
                                                                  int max_retries,
                                                                  absl::string_view label);

// INVALID_ARGUMENT for bad options (bits, dampening <= 0, block_size < 1).
absl::Status ValidateGptqOptions(const GptqOptions& options);

// `weight` [out, in] (F32/F16/BF16), `hessian` [in, in] (F32 or F64, sum of
// x^T x over the calibration tokens; the scale does not matter). Works in
// float32 on the weight's device; the Hessian's Cholesky in its own dtype.
// INVALID_ARGUMENT naming the tensor for mismatched shapes, NaN/Inf in the
// weight or the Hessian, or a group size that does not divide in;
// FAILED_PRECONDITION when the Cholesky still fails after every retry.
//
// `keep` (bool [out, in], optional): a pruning mask (worker/engine/prune/),
// false where the weight was pruned. Those weights stay exactly 0: the
// weight is masked first, each column's pruned entries are quantized to 0
// (their code is the group's zero point, which every grid holds) whatever
// the earlier columns' updates put there, and the difference is
// compensated on the later columns like a rounding error (SparseGPT's joint
// prune-and-quantize step with the mask fixed); dynamic groups take their
// range from the kept weights only.
absl::StatusOr<GptqResult> QuantizeGptq(const at::Tensor& weight, const at::Tensor& hessian,
                                        const GptqOptions& options, absl::string_view name,
                                        const at::Tensor& keep = at::Tensor());

// tr((W - Q) H (W - Q)^T) / tr(W H W^T): the layer's relative squared output
// error on the calibration inputs whose X^T X is `hessian` (float64).
double RelativeOutputError(const at::Tensor& weight, const at::Tensor& approximation,
                           const at::Tensor& hessian);

}  // namespace compress::engine
