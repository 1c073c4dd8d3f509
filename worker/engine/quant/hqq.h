// HQQ, Half-Quadratic Quantization (Badri & Shaji, 2023): no calibration
// data; each group's scale and zero point are optimised so that the
// dequantized weight is close to the original under a sparsity-promoting
// error norm, which lets a few large errors (outliers, clipped values) stand
// instead of dragging the whole grid towards them.
//
// Here the result is the RTN format of quantized_tensor.h: the zero point is
// an INTEGER in [0, qmax] (the GPTQ int32 packing stores it so), the scale a
// float16: this is HQQ with the zero point constrained to the integer grid.
//
// For a group x (b bits, qmax = 2^b - 1, p = lp_norm), HQQ minimises
//     sum_i |x_i - s (q_i - z)|^p,   q_i = clamp(round(x_i / s + z), 0, qmax)
// by half-quadratic splitting: with an auxiliary error e and a penalty beta,
//     min  ||e||_p^p + beta/2 ||x/s - (q - z) - e||^2
// alternates (1) e = shrink(x/s - (q - z)), the generalised soft threshold
//     shrink(r) = sign(r) max(|r| - |r|^(p-1) / beta, 0),
// and (2) a least-squares fit of the grid to the target t = x/s - e, codes
// fixed; then beta *= beta_growth. The residual is measured in units of the
// current scale (x/s - (q - z), not x - s(q - z) as HQQ's code does), so beta
// means the same for every weight magnitude: in weight units, HQQ's default
// threshold |r| > (1/beta)^(1/(2-p)) ~ 0.17 exceeds every rounding error of
// a typical LLM weight (|w| ~ 0.02), and shrink returns 0 everywhere. As a
// consequence the result is scale-equivariant: weight * 2^k gives the same
// codes and zeros and the scales * 2^k. The shrinkage is what moves the
// grid: it lets the clipped weights' large residuals go, so the scale can
// shrink. Without it (beta -> Inf, plain alternating least squares) the
// iteration stays near RTN's range (W4 g128 on Gaussian weights: relative
// error 0.1004 RTN, 0.0989 least squares, 0.0962 HQQ; 0.0947 the best of a
// brute-force search over 101 clipping ratios).
//
// Each iteration:
//   x = w / s;  q = clamp(round(x + z), 0, qmax);  r = x - (q - z)
//   e = shrink(r, beta);  t = x - e                    (t ~ (s'/s) (q - z'))
//   asymmetric: (a, c) = least squares of t ~ a q + c; s' = a s,
//               z' = clamp(-c / a, 0, qmax); when q is constant over the
//               group (or a <= 0) HQQ's own update, s' = s, z' = mean(q - t)
//   symmetric:  z = 2^(b-1) fixed, s' = s sum(t (q - z)) / sum((q - z)^2)
//   beta *= beta_growth
// and every iterate is made a candidate of the stored format:
//   zc = round(z') (symmetric: 2^(b-1));  qc = clamp(round(w / s') + zc, 0, qmax)
//   sc = sum(w (qc - zc)) / sum((qc - zc)^2)      (least squares, zc fixed)
//   scale = sc rounded to the NEAREST float16 (unlike RTN's rounding up: the
//           refit scale is allowed to clip), and the codes recomputed with it
//           exactly as RTN does: clamp(round(w / scale) + zc, 0, qmax).
// Per group, the result is the best by squared error sum_i (w_i - (q_i -
// zc) scale)^2 of RTN's (scale, zero) (worker/engine/quant/rtn.h, the
// starting point) and the candidates of every iteration, so it is never worse
// than RTN on it; ties keep the earlier candidate, and iterations == 0 gives
// RTN's result code for code. Squared error, not the lp norm, picks the
// result because it is what the layer's output error is (for inputs with
// identity covariance) and what RelativeError reports; the lp norm steers the
// iterations. All arithmetic is float32 on the weight's device: about 40
// elementwise passes over the weight per iteration (a 4096 x 4096 weight
// takes ~4 s with the default 20 iterations on 2 CPU cores).
#pragma once

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/engine/quant/quantized_tensor.h"
#include "worker/engine/quant/rtn.h"

namespace compress::engine {

struct HqqOptions {
  RtnOptions grid;            // bits 2..8, symmetric, group_size (0/-1 per channel) as in rtn.h
  int iterations = 20;        // half-quadratic iterations; 0 gives exactly RTN's result
  double lp_norm = 0.7;       // p in (0, 1] of the sparsity-promoting error norm
  double beta = 10.0;         // initial penalty (> 0), multiplied by beta_growth each iteration
  double beta_growth = 1.01;  // >= 1
};

// INVALID_ARGUMENT naming the field: the grid's (as ValidateRtnOptions),
// iterations < 0, lp_norm outside (0, 1], beta not finite and > 0,
// beta_growth not finite and >= 1.
absl::Status ValidateHqqOptions(const HqqOptions& options);

// The fast path: ATen ops over a [out, groups, group_size] view of the
// weight, on its device. `weight` is a 2-D F32, F16 or BF16 tensor; NaN or
// Inf in it, or a group size that does not divide in_features, is
// INVALID_ARGUMENT naming the tensor and its shape. The result has passed
// ValidateQuantized.
absl::StatusOr<QuantizedTensor> QuantizeHqq(const at::Tensor& weight, const HqqOptions& options,
                                            absl::string_view name);

// The scalar reference: the iteration above one group at a time, in float64
// with plain loops on the CPU (the start from QuantizeRtnReference, the
// float16 rounding of each candidate's scale as in the fast path). Kept apart
// from QuantizeHqq, which the tests check against it.
absl::StatusOr<QuantizedTensor> QuantizeHqqReference(const at::Tensor& weight,
                                                     const HqqOptions& options,
                                                     absl::string_view name);

}  // namespace compress::engine
