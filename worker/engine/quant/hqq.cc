// HQQ: the fast path (whole-group ATen ops over a [out, groups, group_size]
// view, on the weight's device) and, apart from it at the end of the file,
// the scalar float64 reference. The math is in hqq.h.
#include "worker/engine/quant/hqq.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

// Elements per block of rows on the CPU: 64 Ki float32 values, 256 KiB, so
// that the ~35 passes of an iteration run over cached data.
constexpr int64_t kCpuBlockElements = int64_t{1} << 16;

// Per group, sum over the last dimension of (w - (q - zero) scale)^2 with
// q = clamp(round(w / scale) + zero, 0, qmax), RTN's formula (so that RTN's
// own scale and zero give RTN's codes). Also returns q.
at::Tensor SquaredError(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                        int qmax, at::Tensor* codes = nullptr) {
  at::Tensor q = w.div(scale).round_().add_(zero).clamp_(0, qmax);
  at::Tensor error = (q - zero).mul_(scale).sub_(w).square_().sum(/*dim=*/-1, /*keepdim=*/true);
  if (codes != nullptr) *codes = std::move(q);
  return error;
}

// HQQ's generalised soft threshold sign(r) max(|r| - |r|^(p-1) / beta, 0),
// written as r max(1 - |r|^(p-2) / beta, 0) to save passes. At r == 0,
// |r|^(p-2) is +Inf and the result 0.
at::Tensor Shrink(const at::Tensor& r, double beta, double p) {
  return r.abs().pow_(p - 2.0).mul_(-1.0 / beta).add_(1.0).clamp_min_(0).mul_(r);
}

// Optimises a block of whole rows. `scales` and `zeros` hold RTN's grid for
// these rows on entry and the chosen grid on return; `codes` receives the codes.
void OptimizeRowBlock(const at::Tensor& rows, const HqqOptions& options, int64_t group_size,
                      at::Tensor codes_out, at::Tensor scales_io, at::Tensor zeros_io) {
  const int64_t n = rows.size(0);
  const int64_t groups = rows.size(1) / group_size;
  const int qmax = (1 << options.grid.bits) - 1;
  const double p = options.lp_norm;
  const at::Tensor w = rows.to(at::kFloat).contiguous().view({n, groups, group_size});

  at::Tensor best_scale = scales_io.to(at::kFloat).view({n, groups, 1});
  at::Tensor best_zero = zeros_io.to(at::kFloat).view({n, groups, 1});
  at::Tensor best_error = SquaredError(w, best_scale, best_zero, qmax);

  at::Tensor s = best_scale.clone();
  at::Tensor z = best_zero.clone();
  double beta = options.beta;
  for (int iteration = 0; iteration < options.iterations; ++iteration) {
    // Half-quadratic step, in units of the current scale.
    const at::Tensor x = w.div(s);
    at::Tensor shifted = x + z;
    const at::Tensor q = shifted.round().clamp_(0, qmax);
    const at::Tensor e = Shrink(shifted.sub_(q), beta, p);  // shifted - q = x - (q - z)
    const at::Tensor t = x - e;
    if (options.grid.symmetric) {
      const at::Tensor d = q - z;
      const at::Tensor a = (t * d).sum(-1, true).div_(d.square().sum(-1, true));
      s = at::where(a.gt(0).logical_and_(at::isfinite(a)), s * a, s);
    } else {
      // Least squares of t ~ a q + c, i.e. t ~ a (q - z') with z' = mean(q) - mean(t) / a.
      const at::Tensor q_mean = q.mean(-1, true);
      const at::Tensor t_mean = t.mean(-1, true);
      const at::Tensor centred = q - q_mean;
      const at::Tensor a = (centred * t).sum(-1, true).div_(centred.square().sum(-1, true));
      const at::Tensor fitted = a.gt(0).logical_and_(at::isfinite(a));
      // Otherwise HQQ's update with s fixed: z' = mean(q - t).
      z = at::where(fitted, q_mean - t_mean / a, q_mean - t_mean).clamp_(0, qmax);
      s = at::where(fitted, s * a, s);
    }
    beta *= options.beta_growth;

    // The iterate as a candidate of the stored format: integer zero, scale
    // refit by least squares with the zero fixed, rounded to float16.
    const at::Tensor zero = options.grid.symmetric ? z : z.round();
    const at::Tensor d = w.div(s).round_().add_(zero).clamp_(0, qmax).sub_(zero);
    const at::Tensor numerator = (w * d).sum(-1, true);
    const at::Tensor denominator = d.square_().sum(-1, true);
    const at::Tensor refit =
        at::where(numerator.gt(0).logical_and_(denominator.gt(0)), numerator / denominator, s);
    const at::Tensor scale = refit.to(at::kHalf).to(at::kFloat);
    at::Tensor error = SquaredError(w, scale, zero, qmax);
    error.masked_fill_(scale.gt(0).logical_and_(at::isfinite(scale)).logical_not_(),
                       std::numeric_limits<float>::infinity());
    const at::Tensor better = error.lt(best_error);
    best_error = at::where(better, error, best_error);
    best_scale = at::where(better, scale, best_scale);
    best_zero = at::where(better, zero, best_zero);
  }

  at::Tensor codes;
  SquaredError(w, best_scale, best_zero, qmax, &codes);
  // float -> int16 -> uint8, as in rtn.cc (faster than float -> uint8).
  codes_out.copy_(codes.view({n, groups * group_size}).to(at::kShort));
  scales_io.copy_(best_scale.view({n, groups}));
  zeros_io.copy_(best_zero.view({n, groups}).to(at::kShort));
}

}  // namespace

absl::Status ValidateHqqOptions(const HqqOptions& options) {
  RETURN_IF_ERROR(ValidateRtnOptions(options.grid));
  if (options.iterations < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("hqq: iterations ", options.iterations, " is negative"));
  }
  if (!(options.lp_norm > 0.0 && options.lp_norm <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("hqq: lp_norm ", options.lp_norm, " is outside (0, 1]"));
  }
  if (!(options.beta > 0.0 && std::isfinite(options.beta))) {
    return absl::InvalidArgumentError(
        absl::StrCat("hqq: beta ", options.beta, " is not a finite positive number"));
  }
  if (!(options.beta_growth >= 1.0 && std::isfinite(options.beta_growth))) {
    return absl::InvalidArgumentError(
        absl::StrCat("hqq: beta_growth ", options.beta_growth, " is not finite and >= 1"));
  }
  return absl::OkStatus();
}

absl::StatusOr<QuantizedTensor> QuantizeHqq(const at::Tensor& weight, const HqqOptions& options,
                                            absl::string_view name) {
  RETURN_IF_ERROR(ValidateHqqOptions(options));
  // RTN checks the weight (2-D, floating point, finite, group size) and is
  // the starting point.
  ASSIGN_OR_RETURN(QuantizedTensor q, QuantizeRtn(weight, options.grid, name));
  if (options.iterations == 0) return q;
  RETURN_IF_ERROR(CatchTorchErrors(absl::StrCat("hqq: tensor '", name, "'"), [&]() {
    const int64_t out = weight.size(0);
    const int64_t in = weight.size(1);
    const int64_t rows_per_block =
        weight.is_cpu() ? std::max<int64_t>(1, kCpuBlockElements / in) : out;
    // As in rtn.cc: on the CPU, blocks of rows that stay in cache, spread
    // over LibTorch's threads (rows are independent); a GPU takes them all.
    auto optimize_rows = [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; row += rows_per_block) {
        const int64_t rows = std::min(rows_per_block, end - row);
        OptimizeRowBlock(weight.narrow(0, row, rows), options, q.group_size,
                         q.codes.narrow(0, row, rows), q.scales.narrow(0, row, rows),
                         q.zeros.narrow(0, row, rows));
      }
    };
    if (weight.is_cpu()) {
      at::parallel_for(0, out, rows_per_block, optimize_rows);
    } else {
      optimize_rows(0, out);
    }
    return absl::OkStatus();
  }));
  RETURN_IF_ERROR(ValidateQuantized(q, name));
  return q;
}

// ---------------------------------------------------------------------------
// The scalar reference: hqq.h's formulas one group and one element at a
// time, in float64. Deliberately naive and sharing no code with the fast path.

namespace {

double Clamp(double x, double lo, double hi) { return std::min(std::max(x, lo), hi); }

double ReferenceShrink(double r, double beta, double p) {
  const double magnitude = std::abs(r);
  if (magnitude == 0.0) return 0.0;
  const double shrunk = magnitude - std::pow(magnitude, p - 1.0) / beta;
  return shrunk > 0.0 ? std::copysign(shrunk, r) : 0.0;
}

double ReferenceSquaredError(const std::vector<double>& x, double scale, double zero, double qmax) {
  double sum = 0.0;
  for (double v : x) {
    const double q = Clamp(std::nearbyint(v / scale) + zero, 0.0, qmax);
    const double error = v - (q - zero) * scale;
    sum += error * error;
  }
  return sum;
}

}  // namespace

absl::StatusOr<QuantizedTensor> QuantizeHqqReference(const at::Tensor& weight,
                                                     const HqqOptions& options,
                                                     absl::string_view name) {
  RETURN_IF_ERROR(ValidateHqqOptions(options));
  ASSIGN_OR_RETURN(QuantizedTensor q, QuantizeRtnReference(weight, options.grid, name));
  RETURN_IF_ERROR(CatchTorchErrors(absl::StrCat("hqq reference: tensor '", name, "'"), [&]() {
    const int64_t out = q.out_features();
    const int64_t in = q.in_features();
    const int64_t group_size = q.group_size;
    const int64_t groups = q.groups();
    const double qmax = (1 << options.grid.bits) - 1;
    const double p = options.lp_norm;
    const at::Tensor w = weight.to(at::kCPU, at::kFloat).contiguous();
    const float* w_data = w.data_ptr<float>();
    uint8_t* codes = q.codes.data_ptr<uint8_t>();
    c10::Half* scales = q.scales.data_ptr<c10::Half>();
    uint8_t* zeros = q.zeros.data_ptr<uint8_t>();

    std::vector<double> x(group_size), codes_now(group_size), target(group_size);
    for (int64_t r = 0; r < out; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t i = 0; i < group_size; ++i) x[i] = w_data[r * in + g * group_size + i];
        double best_scale = static_cast<float>(scales[r * groups + g]);
        double best_zero = zeros[r * groups + g];
        double best_error = ReferenceSquaredError(x, best_scale, best_zero, qmax);
        double s = best_scale;
        double z = best_zero;
        double beta = options.beta;
        for (int iteration = 0; iteration < options.iterations; ++iteration) {
          for (int64_t i = 0; i < group_size; ++i) {
            const double code = Clamp(std::nearbyint(x[i] / s + z), 0.0, qmax);
            const double residual = x[i] / s - (code - z);
            codes_now[i] = code;
            target[i] = x[i] / s - ReferenceShrink(residual, beta, p);
          }
          if (options.grid.symmetric) {
            double numerator = 0.0, denominator = 0.0;
            for (int64_t i = 0; i < group_size; ++i) {
              numerator += target[i] * (codes_now[i] - z);
              denominator += (codes_now[i] - z) * (codes_now[i] - z);
            }
            const double a = numerator / denominator;
            if (a > 0.0 && std::isfinite(a)) s *= a;
          } else {
            double code_mean = 0.0, target_mean = 0.0;
            for (int64_t i = 0; i < group_size; ++i) {
              code_mean += codes_now[i];
              target_mean += target[i];
            }
            code_mean /= group_size;
            target_mean /= group_size;
            double covariance = 0.0, variance = 0.0;
            for (int64_t i = 0; i < group_size; ++i) {
              covariance += (codes_now[i] - code_mean) * target[i];
              variance += (codes_now[i] - code_mean) * (codes_now[i] - code_mean);
            }
            const double a = covariance / variance;
            if (a > 0.0 && std::isfinite(a)) {
              z = code_mean - target_mean / a;
              s *= a;
            } else {
              z = code_mean - target_mean;  // HQQ: mean(q - t), s fixed
            }
            z = Clamp(z, 0.0, qmax);
          }
          beta *= options.beta_growth;

          const double zero = options.grid.symmetric ? z : std::nearbyint(z);
          double numerator = 0.0, denominator = 0.0;
          for (int64_t i = 0; i < group_size; ++i) {
            const double d = Clamp(std::nearbyint(x[i] / s) + zero, 0.0, qmax) - zero;
            numerator += x[i] * d;
            denominator += d * d;
          }
          const double refit = numerator > 0.0 && denominator > 0.0 ? numerator / denominator : s;
          const double scale = static_cast<float>(c10::Half(static_cast<float>(refit)));
          if (!(scale > 0.0 && std::isfinite(scale))) continue;
          const double error = ReferenceSquaredError(x, scale, zero, qmax);
          if (error < best_error) {
            best_error = error;
            best_scale = scale;
            best_zero = zero;
          }
        }
        scales[r * groups + g] = c10::Half(static_cast<float>(best_scale));
        zeros[r * groups + g] = static_cast<uint8_t>(best_zero);
        for (int64_t i = 0; i < group_size; ++i) {
          codes[r * in + g * group_size + i] =
              static_cast<uint8_t>(Clamp(std::nearbyint(x[i] / best_scale) + best_zero, 0.0, qmax));
        }
      }
    }
    return absl::OkStatus();
  }));
  RETURN_IF_ERROR(ValidateQuantized(q, name));
  return q;
}

}  // namespace compress::engine
