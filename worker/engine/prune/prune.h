// Weight pruning: set a chosen share of a linear's weights to exactly zero.
//
// Every method scores each weight W [out, in] and keeps the highest scores:
//   magnitude  |W_ij|
//   Wanda      |W_ij| * ||X_j||_2 (Sun et al., 2023, "A Simple and Effective
//              Pruning Approach for LLMs"): the weight times the norm of its
//              input over the calibration tokens, so that a small weight on a
//              loud input outranks a larger one on a quiet input.
//   SparseGPT  W_ij^2 / [H_F^-1]_jj (Frantar & Alistarh, 2023): the OBS cost
//              of removing the weight, with H = X^T X + dampening and F the
//              columns not yet processed. Columns are processed in order as in
//              GPTQ (worker/engine/quant/gptq.h): with U the upper Cholesky
//              factor of H^-1, [H_F^-1]_jj = U_jj^2 when column j is reached,
//              and the error of column i (its pruned weights) is spread over
//              the later columns,
//              W[:, j] -= (w_i - p_i) / U[i, i] * U[i, j], j > i, so the kept
//              weights compensate; updates are lazy per block of block_size
//              columns (the same result, computed with matrix products).
//
// Sparsity patterns, and what scores compete with each other:
//   N:M (n > 0)   in every run of m consecutive inputs of a row, the n best
//                 are kept (2:4, 4:8). SparseGPT picks each run's mask when
//                 it reaches the run's first column, from the weights as
//                 updated by then.
//   unstructured  round(sparsity * count) weights of each set are zeroed:
//                 magnitude: the whole tensor (the baseline of both papers;
//                 layers then keep different shares per row); Wanda: each
//                 output row (the paper's choice: comparing across rows is
//                 what hurts magnitude on LLMs); SparseGPT: each block of
//                 block_size columns, all rows together (its adaptive mask
//                 selection), from the weights as updated when the block starts.
// Ties lose in input order: of equal scores, the lower index is pruned first.
// The scores are compared in float32.
//
// The brute-force references are in tests/engine/prune_test.cc.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/engine/quant/quantized_tensor.h"

namespace compress::engine {

enum class PruneMethod { kMagnitude, kWanda, kSparseGpt };

const char* PruneMethodName(PruneMethod method);  // "magnitude", "wanda", "sparsegpt"

struct PruneOptions {
  PruneMethod method = PruneMethod::kMagnitude;
  // Unstructured (n == 0): the fraction of weights zeroed, in (0, 1).
  double sparsity = 0.5;
  // N:M: keep n of every m consecutive inputs of a row (0 < n < m); m
  // divides the weight's inputs. n == m == 0: unstructured.
  int64_t n = 0;
  int64_t m = 0;
  // SparseGPT: fraction of the mean of diag(H) added to it; columns per mask
  // selection and lazy update (rounded up to a multiple of m for N:M). A
  // failed Cholesky retries with 10x the dampening, at most this many times.
  double dampening = 0.01;
  int64_t block_size = 128;
  int max_dampening_retries = 4;

  bool semi_structured() const { return m > 0; }
};

struct PruneResult {
  at::Tensor pruned;    // the weight's shape, dtype and device; zero where !mask
  at::Tensor mask;      // bool [out, in]: true where the weight is kept
  double sparsity = 0;  // fraction of `pruned` that is exactly zero
  // SparseGPT only.
  double dampening_used = 0;  // as a fraction of mean diag(H)
  int retries = 0;            // Cholesky failures before it succeeded
  int64_t dead_columns = 0;   // inputs always zero (their weights are zeroed)
};

// INVALID_ARGUMENT for sparsity outside (0, 1) when unstructured, n or m
// out of order (0 < n < m), or SparseGPT's dampening outside (0, 10] or
// block_size < 1.
absl::Status ValidatePruneOptions(const PruneOptions& options);

// INVALID_ARGUMENT naming the tensor and its shape unless a weight of
// `shape` can be pruned with `options`: 2-D, non-empty, m dividing its inputs.
absl::Status CheckPrunable(const PruneOptions& options, const std::vector<int64_t>& shape,
                           absl::string_view name);

// The mask that keeps the highest `scores` [out, in] (float32) under the
// pattern of `options`; unstructured sets are whole rows when `per_row`,
// else the whole tensor.
absl::StatusOr<at::Tensor> SelectPruneMask(const at::Tensor& scores, const PruneOptions& options,
                                           bool per_row, absl::string_view name);

// `weight` [out, in] F32/F16/BF16. INVALID_ARGUMENT naming the tensor for
// NaN/Inf, a bad shape, or statistics that do not match its inputs.
absl::StatusOr<PruneResult> PruneMagnitude(const at::Tensor& weight, const PruneOptions& options,
                                           absl::string_view name);

// `input_sum_square` [in]: sum of x_j^2 over the calibration tokens
// (LinearInputStatistics::sum_square; any positive scale gives the same mask).
absl::StatusOr<PruneResult> PruneWanda(const at::Tensor& weight, const at::Tensor& input_sum_square,
                                       const PruneOptions& options, absl::string_view name);

// `hessian` [in, in]: sum of x^T x over the calibration tokens (F32 or F64).
// Works in float32 on the weight's device, the Cholesky in the Hessian's
// dtype. FAILED_PRECONDITION when it still fails after every retry.
absl::StatusOr<PruneResult> PruneSparseGpt(const at::Tensor& weight, const at::Tensor& hessian,
                                           const PruneOptions& options, absl::string_view name);

// The one entry point the runner calls: dispatches on options.method.
// `input_sum_square` is used by Wanda, `hessian` by SparseGPT.
absl::StatusOr<PruneResult> Prune(const at::Tensor& weight, const at::Tensor& input_sum_square,
                                  const at::Tensor& hessian, const PruneOptions& options,
                                  absl::string_view name);

// Fraction of the elements of `t` that are exactly zero.
double ZeroFraction(const at::Tensor& t);

// For a quantizer that runs after pruning: the code of every pruned weight
// (`mask` false) becomes its group's zero point, so that it dequantizes to
// exactly 0 and the packed and dequantized forms agree. RTN and HQQ already
// quantize an exact 0 so; this makes it a guarantee. INVALID_ARGUMENT naming
// the tensor when the mask's shape is not the codes'.
absl::Status KeepPrunedZeros(const at::Tensor& mask, QuantizedTensor* q, absl::string_view name);

}  // namespace compress::engine
