// AWQ (Lin et al., 2023, "Activation-aware Weight Quantization"): the input
// channels that carry large activations matter most to a linear's output, so
// their weights are scaled up before quantization (smaller relative rounding
// error) and the input is scaled down by the same factor, which the
// preceding RMSNorm or linear absorbs: the model's function is unchanged.
//
// For the linears W_l [out_l, in] fed by one input x, the scales are, as
// AutoAWQ's duo scaling:
//   s(a) = mean|x|^a / (mean_w^(1-a) + 1e-4), clamped to >= 1e-4, then divided
//          by sqrt(max s * min s)
// where mean|x| is per input channel over the calibration tokens and mean_w
// is the mean over the rows of |W| / (its group's max |W|), all of a group's
// linears stacked. The exponent a runs over 0, 1/n, ..., (n-1)/n and s = 1
// (no scaling) is a candidate too; the chosen s minimises an error the
// caller measures for the weights RTN(W_l diag(s)) diag(s)^-1: the job
// runner measures the decoder block's output on calibration samples (as
// AutoAWQ measures the module that holds the linears);
// LinearOutputError below is the linears' own output error computed from
// X^T X, sum_l tr(dW_l H dW_l^T).
// Clipping (optional, AutoAWQ's auto_clip): per output row and group, the
// range is shrunk to max|w| * (1 - i/n) for i < max_shrink * n; the ratio
// with the least output error of that group, dw_g H_gg dw_g^T, is kept and
// the weight clamped to it.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/engine/quant/rtn.h"

namespace compress::engine {

struct AwqOptions {
  RtnOptions grid;        // the quantizer's grid (the search quantizes with RTN)
  int grid_points = 20;   // exponents 0, 1/n, ..., (n-1)/n
  double max_shrink = 0.5;  // clipping: ratios 1, 1 - 1/n, ... above 1 - max_shrink
};

// INVALID_ARGUMENT naming the field: bad grid, grid_points < 1, max_shrink
// outside [0, 1).
absl::Status ValidateAwqOptions(const AwqOptions& options);

struct AwqScales {
  at::Tensor scales;        // float32 [in], > 0: weights' columns *= s, the input /= s
  double exponent = -1;     // the chosen a; -1 when no scaling won
  double error = 0;         // the output error at the chosen scales
  double unscaled_error = 0;  // plain RTN's output error (s = 1)
};

// What a scale candidate costs: given the linears' weights as the candidate
// leaves them (RTN(W diag(s)) diag(s)^-1, float32, in the order of
// `weights`), the error to minimise.
using AwqErrorFunction =
    std::function<absl::StatusOr<double>(const std::vector<at::Tensor>& candidate_weights)>;

// Searches the scales for the linears `weights` ([out_l, in] each, any float
// dtype) that share one input with per-channel mean |x| `mean_abs_input`
// [in]. INVALID_ARGUMENT naming `name` for mismatched shapes, non-finite
// values, or a group size that does not divide in; what `error` returns.
absl::StatusOr<AwqScales> SearchAwqScales(const std::vector<at::Tensor>& weights,
                                          const at::Tensor& mean_abs_input,
                                          const AwqOptions& options, absl::string_view name,
                                          const AwqErrorFunction& error);

// sum_l tr((W_l - C_l) H (W_l - C_l)^T) for the candidates C_l: the linears'
// squared output error on inputs with X^T X `hessian` [in, in].
AwqErrorFunction LinearOutputError(const std::vector<at::Tensor>& weights,
                                   const at::Tensor& hessian);

// The weight (float32) clamped per row and group to the range whose RTN
// quantization has the least output error on inputs with X^T X `hessian`.
absl::StatusOr<at::Tensor> SearchAwqClip(const at::Tensor& weight, const at::Tensor& hessian,
                                         const AwqOptions& options, absl::string_view name);

// sum over rows of dW H dW^T for dW = reference - approximation ([out, in]),
// in float64: a linear's squared output error on the inputs of `hessian`.
double OutputSquaredError(const at::Tensor& reference, const at::Tensor& approximation,
                          const at::Tensor& hessian);

}  // namespace compress::engine
