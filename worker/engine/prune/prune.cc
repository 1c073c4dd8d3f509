#include "worker/engine/prune/prune.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "worker/engine/quant/gptq.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

using at::indexing::Slice;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// How many of `count` weights an unstructured pattern zeroes.
int64_t PrunedCount(double sparsity, int64_t count) {
  return std::clamp<int64_t>(std::llround(sparsity * static_cast<double>(count)), 0, count);
}

// Clears, in each row of `keep` [rows, k] (bool, contiguous), the `pruned`
// entries of lowest `scores` [rows, k]; stable, so that of equal scores the
// lower index goes first.
void PruneLowestPerRow(const at::Tensor& scores, int64_t pruned, at::Tensor& keep) {
  if (pruned <= 0) return;
  const at::Tensor order =
      std::get<1>(scores.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false));
  keep.scatter_(1, order.narrow(1, 0, pruned), false);
}

// The mask keeping the n highest of every m consecutive scores of a row.
at::Tensor SemiStructuredMask(const at::Tensor& scores, int64_t n, int64_t m) {
  const int64_t rows = scores.size(0);
  const int64_t columns = scores.size(1);
  at::Tensor grouped = scores.reshape({rows * (columns / m), m});
  at::Tensor keep = at::ones(grouped.sizes(), scores.options().dtype(at::kBool));
  PruneLowestPerRow(grouped, m - n, keep);
  return keep.view({rows, columns});
}

absl::Status CheckWeight(const at::Tensor& weight, const PruneOptions& options,
                         absl::string_view name) {
  RETURN_IF_ERROR(ValidatePruneOptions(options));
  RETURN_IF_ERROR(CheckPrunable(options, weight.sizes().vec(), name));
  const at::ScalarType t = weight.scalar_type();
  if (t != at::kFloat && t != at::kHalf && t != at::kBFloat16 && t != at::kDouble) {
    return absl::InvalidArgumentError(absl::StrCat(PruneMethodName(options.method), ": tensor '",
                                                   name, "' is not a float tensor"));
  }
  return CatchTorchErrors(name, [&]() -> absl::Status {
    if (!at::isfinite(weight).all().item<bool>()) {
      return absl::InvalidArgumentError(absl::StrCat(PruneMethodName(options.method), ": tensor '",
                                                     name, "' contains NaN or Inf"));
    }
    return absl::OkStatus();
  });
}

PruneResult Finish(const at::Tensor& weight, at::Tensor values, at::Tensor mask) {
  PruneResult result;
  result.pruned = values.to(weight.scalar_type());
  result.mask = std::move(mask);
  result.sparsity = ZeroFraction(result.pruned);
  return result;
}

// GPTQ's damped inverse-Cholesky factor, its dampening recorded in `result`.
absl::StatusOr<at::Tensor> InverseCholesky(const at::Tensor& hessian, const PruneOptions& options,
                                           absl::string_view name, PruneResult* result) {
  ASSIGN_OR_RETURN(DampedInverseCholesky factor,
                   DampedInverseCholeskyFactor(hessian, options.dampening,
                                               options.max_dampening_retries,
                                               absl::StrCat("sparsegpt: tensor '", name, "'")));
  result->dampening_used = factor.dampening_used;
  result->retries = factor.retries;
  return factor.upper;
}

}  // namespace

const char* PruneMethodName(PruneMethod method) {
  switch (method) {
    case PruneMethod::kMagnitude: return "magnitude";
    case PruneMethod::kWanda: return "wanda";
    case PruneMethod::kSparseGpt: return "sparsegpt";
  }
  return "?";
}

absl::Status ValidatePruneOptions(const PruneOptions& options) {
  const char* method = PruneMethodName(options.method);
  if (options.n != 0 || options.m != 0) {
    if (!(options.n > 0 && options.n < options.m)) {
      return absl::InvalidArgumentError(
          absl::StrCat(method, ": pattern ", options.n, ":", options.m,
                       " is invalid (want N:M with 0 < N < M, e.g. 2:4)"));
    }
  } else if (!(options.sparsity > 0 && options.sparsity < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat(method, ": sparsity ", options.sparsity, " is outside (0, 1)"));
  }
  if (options.method == PruneMethod::kSparseGpt) {
    if (!(options.dampening > 0) || options.dampening > 10) {
      return absl::InvalidArgumentError(
          absl::StrCat(method, ": dampening ", options.dampening, " is outside (0, 10]"));
    }
    if (options.block_size < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(method, ": block_size ", options.block_size, " is below 1"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckPrunable(const PruneOptions& options, const std::vector<int64_t>& shape,
                           absl::string_view name) {
  const char* method = PruneMethodName(options.method);
  if (shape.size() != 2 || shape[0] == 0 || shape[1] == 0) {
    return absl::InvalidArgumentError(absl::StrCat(method, ": tensor '", name, "' ",
                                                   ShapeString(shape),
                                                   " is not a non-empty 2-D weight"));
  }
  if (options.semi_structured() && shape[1] % options.m != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        method, ": pattern ", options.n, ":", options.m, ": M = ", options.m,
        " does not divide the ", shape[1], " inputs of tensor '", name, "' ", ShapeString(shape)));
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> SelectPruneMask(const at::Tensor& scores, const PruneOptions& options,
                                           bool per_row, absl::string_view name) {
  RETURN_IF_ERROR(ValidatePruneOptions(options));
  RETURN_IF_ERROR(CheckPrunable(options, scores.sizes().vec(), name));
  return CatchTorchErrors(name, [&]() -> absl::StatusOr<at::Tensor> {
    const at::Tensor s = scores.to(at::kFloat).contiguous();
    if (options.semi_structured()) return SemiStructuredMask(s, options.n, options.m);
    const at::Tensor sets = per_row ? s : s.view({1, s.numel()});
    at::Tensor keep = at::ones(sets.sizes(), s.options().dtype(at::kBool));
    PruneLowestPerRow(sets, PrunedCount(options.sparsity, sets.size(1)), keep);
    return keep.view(s.sizes());
  });
}

absl::StatusOr<PruneResult> PruneMagnitude(const at::Tensor& weight, const PruneOptions& options,
                                           absl::string_view name) {
  RETURN_IF_ERROR(CheckWeight(weight, options, name));
  return CatchTorchErrors(name, [&]() -> absl::StatusOr<PruneResult> {
    ASSIGN_OR_RETURN(at::Tensor mask,
                     SelectPruneMask(weight.to(at::kFloat).abs(), options, /*per_row=*/false, name));
    at::Tensor values = weight.masked_fill(mask.logical_not(), 0);
    return Finish(weight, std::move(values), std::move(mask));
  });
}

absl::StatusOr<PruneResult> PruneWanda(const at::Tensor& weight, const at::Tensor& input_sum_square,
                                       const PruneOptions& options, absl::string_view name) {
  RETURN_IF_ERROR(CheckWeight(weight, options, name));
  if (!input_sum_square.defined() || input_sum_square.dim() != 1 ||
      input_sum_square.size(0) != weight.size(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "wanda: tensor '", name, "' has ", weight.size(1),
        " inputs but its input statistics have ",
        input_sum_square.defined() ? absl::StrCat(input_sum_square.numel()) : "no", " entries"));
  }
  return CatchTorchErrors(name, [&]() -> absl::StatusOr<PruneResult> {
    const at::Tensor norms = input_sum_square.to(weight.device(), at::kDouble).sqrt().to(at::kFloat);
    if (!at::isfinite(norms).all().item<bool>()) {
      return absl::InvalidArgumentError(
          absl::StrCat("wanda: tensor '", name, "': its input statistics contain NaN or Inf"));
    }
    const at::Tensor scores = weight.to(at::kFloat).abs().mul_(norms.unsqueeze(0));
    ASSIGN_OR_RETURN(at::Tensor mask, SelectPruneMask(scores, options, /*per_row=*/true, name));
    at::Tensor values = weight.masked_fill(mask.logical_not(), 0);
    return Finish(weight, std::move(values), std::move(mask));
  });
}

absl::StatusOr<PruneResult> PruneSparseGpt(const at::Tensor& weight, const at::Tensor& hessian,
                                           const PruneOptions& options, absl::string_view name) {
  RETURN_IF_ERROR(CheckWeight(weight, options, name));
  const int64_t rows = weight.size(0);
  const int64_t columns = weight.size(1);
  if (!hessian.defined() || hessian.dim() != 2 || hessian.size(0) != columns ||
      hessian.size(1) != columns) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sparsegpt: tensor '", name, "' has ", columns, " inputs but its Hessian is ",
        hessian.defined() ? ShapeString(hessian.sizes().vec()) : "missing"));
  }
  return CatchTorchErrors(absl::StrCat("sparsegpt: tensor '", name, "'"),
                          [&]() -> absl::StatusOr<PruneResult> {
    at::Tensor w = weight.to(at::kFloat).clone();
    at::Tensor h = hessian.to(weight.device()).clone();
    if (!at::isfinite(h).all().item<bool>()) {
      return absl::InvalidArgumentError(
          absl::StrCat("sparsegpt: tensor '", name, "': its Hessian contains NaN or Inf"));
    }
    PruneResult result;
    // An input that was always zero cannot change the output: its weights
    // are zeroed and H[i, i] set to 1 (as GPTQ does).
    const at::Tensor dead = h.diagonal() == 0;
    result.dead_columns = dead.sum().item<int64_t>();
    if (result.dead_columns > 0) {
      h.diagonal().masked_fill_(dead, 1);
      w.index_put_({Slice(), dead}, 0);
    }
    ASSIGN_OR_RETURN(const at::Tensor upper_factor, InverseCholesky(h, options, name, &result));
    const at::Tensor upper = upper_factor.to(at::kFloat);

    const int64_t m = options.m;
    int64_t block = options.block_size;
    if (options.semi_structured()) block = (block + m - 1) / m * m;
    // Columns as contiguous rows of transposed copies, as in GPTQ.
    at::Tensor values_t = at::empty({columns, rows}, w.options());
    at::Tensor keep_t = at::ones({columns, rows}, w.options().dtype(at::kBool));
    for (int64_t begin = 0; begin < columns; begin += block) {
      const int64_t end = std::min(begin + block, columns);
      const int64_t count = end - begin;
      at::Tensor w1t = w.narrow(1, begin, count).t().contiguous();  // [count, rows]
      at::Tensor errors_t = at::empty({count, rows}, w.options());
      at::Tensor keep1 = keep_t.narrow(0, begin, count);
      const at::Tensor u1 = upper.narrow(0, begin, count).narrow(1, begin, count).contiguous();
      const auto u1_values = u1.accessor<float, 2>();
      // The OBS cost of removing each weight, w^2 / [H_F^-1]_jj, where F is
      // the set of columns not yet processed: [H_F^-1]_jj = U_jj^2.
      const at::Tensor inverse_diagonal = u1.diagonal().square().unsqueeze(1);  // [count, 1]
      if (!options.semi_structured()) {
        const at::Tensor scores = w1t.square().div_(inverse_diagonal);
        at::Tensor flat = keep1.view({1, count * rows});
        PruneLowestPerRow(scores.view({1, count * rows}), PrunedCount(options.sparsity, count * rows),
                          flat);
      }
      for (int64_t i = 0; i < count; ++i) {
        if (options.semi_structured() && i % m == 0) {
          // This run's mask, from the weights as updated so far; per row.
          const at::Tensor scores =
              w1t.narrow(0, i, m).square().div_(inverse_diagonal.narrow(0, i, m));
          keep1.narrow(0, i, m).copy_(SemiStructuredMask(scores.t().contiguous(), options.n, m).t());
        }
        const at::Tensor x = w1t.select(0, i);
        at::Tensor value = values_t.select(0, begin + i);
        at::mul_out(value, x, keep1.select(0, i));
        at::Tensor error = errors_t.select(0, i);
        at::sub_out(error, x, value).div_(u1_values[i][i]);
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
    const at::Tensor values = values_t.t();
    if (!at::isfinite(values).all().item<bool>()) {
      return absl::InternalError(
          absl::StrCat("sparsegpt: tensor '", name, "': the updated weights are not finite"));
    }
    PruneResult finished = Finish(weight, values, keep_t.t().contiguous());
    finished.dampening_used = result.dampening_used;
    finished.retries = result.retries;
    finished.dead_columns = result.dead_columns;
    return finished;
  });
}

absl::StatusOr<PruneResult> Prune(const at::Tensor& weight, const at::Tensor& input_sum_square,
                                  const at::Tensor& hessian, const PruneOptions& options,
                                  absl::string_view name) {
  switch (options.method) {
    case PruneMethod::kMagnitude: return PruneMagnitude(weight, options, name);
    case PruneMethod::kWanda: return PruneWanda(weight, input_sum_square, options, name);
    case PruneMethod::kSparseGpt: return PruneSparseGpt(weight, hessian, options, name);
  }
  return absl::InvalidArgumentError("unknown pruning method");
}

double ZeroFraction(const at::Tensor& t) {
  if (t.numel() == 0) return 0.0;
  return static_cast<double>((t == 0).sum().item<int64_t>()) / static_cast<double>(t.numel());
}

absl::Status KeepPrunedZeros(const at::Tensor& mask, QuantizedTensor* q, absl::string_view name) {
  if (!mask.defined() || mask.sizes() != q->codes.sizes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", name, "': the pruning mask is ",
        mask.defined() ? ShapeString(mask.sizes().vec()) : "missing", ", its codes ",
        ShapeString(q->codes.sizes().vec())));
  }
  return CatchTorchErrors(name, [&]() -> absl::Status {
    const at::Tensor zero_points =
        q->zeros.repeat_interleave(q->group_size, /*dim=*/1).to(q->codes.device());
    q->codes = at::where(mask.to(q->codes.device()), q->codes, zero_points);
    return absl::OkStatus();
  });
}

}  // namespace compress::engine
