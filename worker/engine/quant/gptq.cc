#include "worker/engine/quant/gptq.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {

namespace {

using at::indexing::Slice;

absl::StatusOr<at::Tensor> InverseCholesky(const at::Tensor& hessian, const GptqOptions& options,
                                           absl::string_view name, GptqResult* result) {
  ASSIGN_OR_RETURN(DampedInverseCholesky factor,
                   DampedInverseCholeskyFactor(hessian, options.dampening,
                                               options.max_dampening_retries,
                                               absl::StrCat("gptq: tensor '", name, "'")));
  result->dampening_used = factor.dampening_used;
  result->retries = factor.retries;
  return factor.upper;
}

}  // namespace

absl::StatusOr<DampedInverseCholesky> DampedInverseCholeskyFactor(const at::Tensor& hessian,
                                                                  double dampening,
                                                                  int max_retries,
                                                                  absl::string_view label) {
  const double mean_diagonal = hessian.diagonal().mean().item<double>();
  for (int attempt = 0; attempt <= max_retries; ++attempt) {
    at::Tensor damped = hessian.clone();
    damped.diagonal().add_(dampening * mean_diagonal);
    auto [lower, info] = at::linalg_cholesky_ex(damped);
    if (info.item<int64_t>() == 0) {
      const at::Tensor inverse = at::cholesky_inverse(lower);
      auto [upper, inverse_info] = at::linalg_cholesky_ex(inverse, /*upper=*/true);
      if (inverse_info.item<int64_t>() == 0 && at::isfinite(upper).all().item<bool>()) {
        return DampedInverseCholesky{upper, dampening, attempt};
      }
    }
    dampening *= 10;
  }
  return absl::FailedPreconditionError(absl::StrCat(
      label, ": the Hessian is not positive definite even with dampening ", dampening / 10,
      " of its mean diagonal"));
}

absl::Status ValidateGptqOptions(const GptqOptions& options) {
  RETURN_IF_ERROR(ValidateRtnOptions(options.grid));
  if (!(options.dampening > 0) || options.dampening > 10) {
    return absl::InvalidArgumentError(
        absl::StrCat("gptq: dampening ", options.dampening, " is outside (0, 10]"));
  }
  if (options.block_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("gptq: block_size ", options.block_size, " is below 1"));
  }
  return absl::OkStatus();
}

absl::StatusOr<GptqResult> QuantizeGptq(const at::Tensor& weight, const at::Tensor& hessian,
                                        const GptqOptions& options, absl::string_view name,
                                        const at::Tensor& keep) {
  RETURN_IF_ERROR(ValidateGptqOptions(options));
  ASSIGN_OR_RETURN(const int64_t group_size,
                   RtnGroupSize(options.grid, weight.sizes().vec(), name));
  const int64_t rows = weight.size(0);
  const int64_t columns = weight.size(1);
  if (hessian.dim() != 2 || hessian.size(0) != columns || hessian.size(1) != columns) {
    return absl::InvalidArgumentError(absl::StrCat("gptq: tensor '", name, "' has ", columns,
                                                   " inputs but its Hessian is ",
                                                   hessian.sizes().vec().size() == 2
                                                       ? absl::StrCat("[", hessian.size(0), ", ",
                                                                      hessian.size(1), "]")
                                                       : "not 2-D"));
  }
  const bool masked = keep.defined();
  if (masked && (keep.scalar_type() != at::kBool || keep.sizes() != weight.sizes())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gptq: tensor '", name, "': the pruning mask is not bool [", rows, ", ", columns, "]"));
  }
  return CatchTorchErrors(absl::StrCat("gptq: tensor '", name, "'"), [&]()
                                                                         -> absl::StatusOr<GptqResult> {
    at::Tensor w = weight.to(at::kFloat).clone();
    at::Tensor h = hessian.clone();
    if (!at::isfinite(w).all().item<bool>() || !at::isfinite(h).all().item<bool>()) {
      return absl::InvalidArgumentError(
          absl::StrCat("gptq: tensor '", name, "' or its Hessian contains NaN or Inf"));
    }
    // Pruned weights start at 0 (they should already be).
    if (masked) w.mul_(keep.to(w.device()));
    GptqResult result;
    // An input that was always zero carries no information: its weights
    // cannot change the output, so they are zeroed and H[i, i] set to 1.
    const at::Tensor dead = h.diagonal() == 0;
    result.dead_columns = dead.sum().item<int64_t>();
    if (result.dead_columns > 0) {
      h.diagonal().masked_fill_(dead, 1);
      w.index_put_({Slice(), dead}, 0);
    }

    QuantizedTensor& q = result.quantized;
    q.bits = options.grid.bits;
    q.group_size = group_size;
    q.codes = at::empty({rows, columns}, w.options().dtype(at::kByte));
    const bool static_groups = group_size == columns || options.act_order;
    if (static_groups) {
      // Every group's grid from the (original) weight, before any update.
      RtnOptions grid = options.grid;
      grid.group_size = group_size;
      ASSIGN_OR_RETURN(QuantizedTensor initial, QuantizeRtn(w, grid, name));
      q.scales = initial.scales;
      q.zeros = initial.zeros;
    } else {
      q.scales = at::empty({rows, columns / group_size}, w.options().dtype(at::kHalf));
      q.zeros = at::empty({rows, columns / group_size}, w.options().dtype(at::kByte));
    }

    at::Tensor order = at::arange(columns, w.options().dtype(at::kLong));
    if (options.act_order) {
      order = std::get<1>(h.diagonal().sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
      w = w.index_select(1, order);
      h = h.index_select(0, order).index_select(1, order);
    }
    ASSIGN_OR_RETURN(const at::Tensor upper_factor, InverseCholesky(h, options, name, &result));
    const at::Tensor upper = upper_factor.to(at::kFloat);
    const std::vector<int64_t> original_column(order.data_ptr<int64_t>(),
                                               order.data_ptr<int64_t>() + columns);
    // The mask in processing order, as rows like the weights below.
    at::Tensor keep_t;
    if (masked) keep_t = keep.to(w.device()).index_select(1, order).t().contiguous();

    // Dynamic groups must not straddle a lazy block: round it up to whole groups.
    const int64_t block =
        static_groups ? options.block_size
                      : (options.block_size + group_size - 1) / group_size * group_size;
    const double qmax = static_cast<double>((1 << options.grid.bits) - 1);
    // Columns are processed as contiguous rows of transposed copies: each
    // step below is then a pass over contiguous memory.
    const int64_t groups = columns / group_size;
    at::Tensor scales_t = at::empty({groups, rows}, w.options());  // [groups, rows] float32
    at::Tensor zeros_t = at::empty({groups, rows}, w.options());
    if (static_groups) {
      scales_t.copy_(q.scales.t());
      zeros_t.copy_(q.zeros.t());
    }
    at::Tensor codes_t = at::empty({columns, rows}, w.options());  // by original column
    for (int64_t begin = 0; begin < columns; begin += block) {
      const int64_t end = std::min(begin + block, columns);
      const int64_t count = end - begin;
      at::Tensor w1t = w.narrow(1, begin, count).t().contiguous();  // [count, rows]
      at::Tensor errors_t = at::empty({count, rows}, w.options());
      const at::Tensor u1 = upper.narrow(0, begin, count).narrow(1, begin, count).contiguous();
      const auto u1_values = u1.accessor<float, 2>();
      for (int64_t i = 0; i < count; ++i) {
        const int64_t column = original_column[static_cast<size_t>(begin + i)];
        const int64_t group = column / group_size;
        if (!static_groups && (begin + i) % group_size == 0) {
          RtnOptions grid = options.grid;
          grid.group_size = group_size;
          at::Tensor group_columns = w1t.narrow(0, i, group_size);
          if (masked) group_columns = group_columns.mul(keep_t.narrow(0, begin + i, group_size));
          ASSIGN_OR_RETURN(QuantizedTensor params,
                           QuantizeRtn(group_columns.t().contiguous(), grid, name));
          q.scales.narrow(1, group, 1).copy_(params.scales);
          q.zeros.narrow(1, group, 1).copy_(params.zeros);
          scales_t.select(0, group).copy_(params.scales.select(1, 0));
          zeros_t.select(0, group).copy_(params.zeros.select(1, 0));
        }
        const at::Tensor scale = scales_t.select(0, group);
        const at::Tensor zero = zeros_t.select(0, group);
        const at::Tensor x = w1t.select(0, i);
        // RTN's rounding exactly (rtn.h): codes from x / scale, values (q - zero) * scale.
        at::Tensor codes = x.div(scale).round_().add_(zero).clamp_(0, qmax);
        if (masked) codes = at::where(keep_t.select(0, begin + i), codes, zero);
        codes_t.select(0, column).copy_(codes);
        at::Tensor error = errors_t.select(0, i);
        at::sub_out(error, x, codes.sub_(zero).mul_(scale)).div_(u1_values[i][i]);
        if (i + 1 < count) {
          w1t.narrow(0, i + 1, count - i - 1)
              .addr_(u1.select(0, i).narrow(0, i + 1, count - i - 1), error, 1, -1);
        }
      }
      if (end < columns) {
        w.narrow(1, end, columns - end)
            .addmm_(errors_t.t(), upper.narrow(0, begin, count).narrow(1, end, columns - end), 1,
                    -1);
      }
    }
    // float -> int16 -> uint8: exact for these integers, and faster on the
    // CPU than the direct conversion.
    q.codes.copy_(codes_t.t().to(at::kShort));
    return result;
  });
}

double RelativeOutputError(const at::Tensor& weight, const at::Tensor& approximation,
                           const at::Tensor& hessian) {
  const at::Tensor w = weight.to(at::kDouble);
  const at::Tensor h = hessian.to(at::kDouble);
  const at::Tensor d = w - approximation.to(at::kDouble);
  const double error = (d.mm(h) * d).sum().item<double>();
  const double reference = (w.mm(h) * w).sum().item<double>();
  return reference == 0 ? (error == 0 ? 0.0 : INFINITY) : error / reference;
}

}  // namespace compress::engine
