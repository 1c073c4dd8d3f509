#include "worker/engine/quant/awq.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "worker/engine/quant/quantized_tensor.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

bool AllFinite(const at::Tensor& t) { return at::isfinite(t).all().item<bool>(); }

// RTN's round trip of `weight` (float32) on the stage's grid.
absl::StatusOr<at::Tensor> RtnRoundTrip(const at::Tensor& weight, const RtnOptions& grid,
                                        absl::string_view name) {
  ASSIGN_OR_RETURN(const QuantizedTensor q, QuantizeRtn(weight, grid, name));
  return Dequantize(q, at::kFloat);
}

// Per output row and group: dw_g H_gg dw_g^T for d [out, in], the group's
// diagonal block of H only. Returns [out, groups].
at::Tensor GroupOutputErrors(const at::Tensor& d, const at::Tensor& hessian_blocks,
                             int64_t group_size) {
  const int64_t out = d.size(0);
  const int64_t groups = d.size(1) / group_size;
  const at::Tensor dg = d.reshape({out, groups, group_size}).permute({1, 0, 2});  // [G, out, gs]
  return (at::bmm(dg, hessian_blocks) * dg).sum(-1).t();                         // [out, G]
}

}  // namespace

absl::Status ValidateAwqOptions(const AwqOptions& options) {
  RETURN_IF_ERROR(ValidateRtnOptions(options.grid));
  if (options.grid_points < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("awq: grid_points ", options.grid_points, " is below 1"));
  }
  if (!(options.max_shrink >= 0 && options.max_shrink < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("awq: max_shrink ", options.max_shrink, " is outside [0, 1)"));
  }
  return absl::OkStatus();
}

double OutputSquaredError(const at::Tensor& reference, const at::Tensor& approximation,
                          const at::Tensor& hessian) {
  const at::Tensor d = reference.to(at::kDouble) - approximation.to(at::kDouble);
  return (d.mm(hessian.to(at::kDouble)) * d).sum().item<double>();
}

AwqErrorFunction LinearOutputError(const std::vector<at::Tensor>& weights,
                                   const at::Tensor& hessian) {
  std::vector<at::Tensor> w32;
  for (const at::Tensor& w : weights) w32.push_back(w.to(at::kFloat));
  const at::Tensor h = hessian.to(at::kFloat);
  return [w32, h](const std::vector<at::Tensor>& candidates) -> absl::StatusOr<double> {
    if (candidates.size() != w32.size()) {
      return absl::InvalidArgumentError("awq: one candidate per weight expected");
    }
    return CatchTorchErrors("awq output error", [&]() -> absl::StatusOr<double> {
      double total = 0;
      for (size_t i = 0; i < w32.size(); ++i) {
        const at::Tensor d = w32[i] - candidates[i];
        total += (d.mm(h) * d).sum().item<double>();
      }
      return total;
    });
  };
}

absl::StatusOr<AwqScales> SearchAwqScales(const std::vector<at::Tensor>& weights,
                                          const at::Tensor& mean_abs_input,
                                          const AwqOptions& options, absl::string_view name,
                                          const AwqErrorFunction& error) {
  RETURN_IF_ERROR(ValidateAwqOptions(options));
  if (weights.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("awq: ", name, ": no weights to scale"));
  }
  const int64_t in = weights.front().dim() == 2 ? weights.front().size(1) : -1;
  for (const at::Tensor& w : weights) {
    if (w.dim() != 2 || w.size(1) != in) {
      return absl::InvalidArgumentError(absl::StrCat("awq: ", name, ": weight ",
                                                     ShapeString(w.sizes()),
                                                     " does not share the input of the first (",
                                                     in, " inputs)"));
    }
  }
  if (mean_abs_input.dim() != 1 || mean_abs_input.size(0) != in) {
    return absl::InvalidArgumentError(absl::StrCat("awq: ", name, ": activation means ",
                                                   ShapeString(mean_abs_input.sizes()),
                                                   " do not fit ", in, " inputs"));
  }
  ASSIGN_OR_RETURN(
      const at::Tensor stacked, CatchTorchErrors(absl::StrCat("awq ", name), [&]() -> absl::StatusOr<at::Tensor> {
        std::vector<at::Tensor> w32;
        for (const at::Tensor& w : weights) w32.push_back(w.to(at::kFloat));
        return at::cat(w32, 0);
      }));
  ASSIGN_OR_RETURN(const int64_t group_size,
                   RtnGroupSize(options.grid, stacked.sizes().vec(), name));
  const at::Tensor x_mean = mean_abs_input.to(at::kFloat);
  if (!AllFinite(x_mean)) {
    return absl::InvalidArgumentError(
        absl::StrCat("awq: ", name, ": the calibration statistics are not finite"));
  }
  if (!AllFinite(stacked)) {
    return absl::InvalidArgumentError(absl::StrCat("awq: ", name, ": weights are not finite"));
  }
  // mean_w: |W| relative to its group's max, averaged over the rows.
  const at::Tensor grouped = stacked.abs().reshape({-1, group_size});
  const at::Tensor w_mean =
      (grouped / grouped.amax({1}, true).clamp_min(1e-12)).reshape(stacked.sizes()).mean(0);

  auto error_at = [&](const at::Tensor& s) -> absl::StatusOr<double> {
    std::vector<at::Tensor> candidates;
    for (const at::Tensor& w : weights) {
      ASSIGN_OR_RETURN(const at::Tensor q, RtnRoundTrip(w.to(at::kFloat) * s, options.grid, name));
      candidates.push_back(q / s);
    }
    return error(candidates);
  };
  AwqScales best;
  best.scales = at::ones({in}, x_mean.options());
  ASSIGN_OR_RETURN(best.unscaled_error, error_at(best.scales));
  best.error = best.unscaled_error;
  for (int i = 0; i < options.grid_points; ++i) {
    const double a = static_cast<double>(i) / options.grid_points;
    at::Tensor s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp_min(1e-4);
    s = s / (s.max() * s.min()).sqrt();
    if (!AllFinite(s)) continue;
    ASSIGN_OR_RETURN(const double candidate_error, error_at(s));
    if (candidate_error < best.error) {
      best.error = candidate_error;
      best.exponent = a;
      best.scales = s;
    }
  }
  return best;
}

absl::StatusOr<at::Tensor> SearchAwqClip(const at::Tensor& weight, const at::Tensor& hessian,
                                         const AwqOptions& options, absl::string_view name) {
  RETURN_IF_ERROR(ValidateAwqOptions(options));
  if (weight.dim() != 2 || hessian.dim() != 2 || hessian.size(0) != weight.size(1) ||
      hessian.size(1) != weight.size(1)) {
    return absl::InvalidArgumentError(absl::StrCat("awq clip: tensor '", name, "' ",
                                                   ShapeString(weight.sizes()), " and X^T X ",
                                                   ShapeString(hessian.sizes()), " do not fit"));
  }
  ASSIGN_OR_RETURN(const int64_t group_size,
                   RtnGroupSize(options.grid, weight.sizes().vec(), name));
  return CatchTorchErrors(absl::StrCat("awq clip ", name), [&]() -> absl::StatusOr<at::Tensor> {
    const at::Tensor w = weight.to(at::kFloat);
    const int64_t out = w.size(0);
    const int64_t groups = w.size(1) / group_size;
    const at::Tensor h = hessian.to(at::kFloat);
    std::vector<at::Tensor> blocks;
    for (int64_t g = 0; g < groups; ++g) {
      blocks.push_back(h.narrow(0, g * group_size, group_size).narrow(1, g * group_size, group_size));
    }
    const at::Tensor hessian_blocks = at::stack(blocks);  // [G, gs, gs]
    const at::Tensor max_abs =
        w.abs().reshape({out, groups, group_size}).amax({2}, true);  // [out, G, 1]
    at::Tensor best_error = at::full({out, groups}, std::numeric_limits<float>::infinity(),
                                     w.options());
    at::Tensor best_limit = max_abs.clone();
    const int steps = static_cast<int>(options.max_shrink * options.grid_points);
    for (int i = 0; i < std::max(steps, 1); ++i) {
      const at::Tensor limit = max_abs * (1.0 - static_cast<double>(i) / options.grid_points);
      const at::Tensor clamped =
          at::max(at::min(w.reshape({out, groups, group_size}), limit), -limit).reshape_as(w);
      ASSIGN_OR_RETURN(const at::Tensor q, RtnRoundTrip(clamped, options.grid, name));
      const at::Tensor error = GroupOutputErrors(w - q, hessian_blocks, group_size);
      const at::Tensor better = error < best_error;
      best_error = at::where(better, error, best_error);
      best_limit = at::where(better.unsqueeze(-1), limit, best_limit);
    }
    return at::max(at::min(w.reshape({out, groups, group_size}), best_limit), -best_limit)
        .reshape_as(w);
  });
}

}  // namespace compress::engine
