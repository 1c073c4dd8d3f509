// RTN, the fast path: whole-tensor ATen ops over a [out, groups, group_size]
// view, so the work vectorizes (and runs on the weight's device).
#include "worker/engine/quant/rtn.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

// Elements per block of rows on the CPU: 256 Ki float32 values, 1 MiB.
constexpr int64_t kCpuBlockElements = int64_t{1} << 18;

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// float32 scales -> the float16 at or above each (RNE, then one ulp up where
// that rounded down). Bumping the bit pattern by one is "next float16 up" for
// every non-negative finite value, from 0 to the largest subnormal and normal.
at::Tensor RoundUpToHalf(const at::Tensor& scales) {
  at::Tensor half = scales.to(at::kHalf);
  at::Tensor rounded_down = half.to(at::kFloat) < scales;
  half.view(at::kShort).add_(rounded_down.to(at::kShort));
  return half;
}

// Quantizes a block of whole rows into the matching slices of the outputs.
// Returns false (leaving the outputs unspecified) if a row holds NaN or Inf.
bool QuantizeRowBlock(const at::Tensor& rows, const RtnOptions& options, int64_t group_size,
                      at::Tensor codes_out, at::Tensor scales_out, at::Tensor zeros_out) {
  const int64_t n = rows.size(0);
  const int64_t groups = rows.size(1) / group_size;
  const int qmax = (1 << options.bits) - 1;
  at::Tensor grouped = rows.to(at::kFloat).contiguous().view({n, groups, group_size});

  // amin and amax separately: LibTorch 1.13's aminmax over a dimension is
  // several times slower than the two. Both propagate NaN and Inf, so
  // checking the small per-group results saves a pass over the weights.
  at::Tensor lo = grouped.amin(/*dim=*/-1, /*keepdim=*/true);
  at::Tensor hi = grouped.amax(/*dim=*/-1, /*keepdim=*/true);
  if (!at::isfinite(lo).logical_and_(at::isfinite(hi)).all().item<bool>()) return false;
  lo.clamp_max_(0);
  hi.clamp_min_(0);
  if (options.symmetric) {
    hi = at::maximum(lo.neg(), hi);
    lo = hi.neg();
  }
  at::Tensor all_zero = (lo == 0).logical_and_(hi == 0);
  lo.masked_fill_(all_zero, -1.0);
  hi.masked_fill_(all_zero, 1.0);

  // Tensor-by-tensor division (not by a Scalar): a Scalar divisor may be
  // turned into a multiplication by its reciprocal, which rounds differently
  // from the reference.
  at::Tensor scale16 = RoundUpToHalf((hi - lo).div_(at::full_like(hi, static_cast<double>(qmax))));
  at::Tensor scale = scale16.to(at::kFloat);
  at::Tensor zero;
  if (options.symmetric) {
    zero = at::full_like(scale, static_cast<double>(1 << (options.bits - 1)));
  } else {
    zero = lo.neg().div_(scale).round_().clamp_(0, qmax);
  }
  at::Tensor codes = grouped.div(scale).round_().add_(zero).clamp_(0, qmax);

  // float -> int16 -> uint8 (exact for these integers) runs several times
  // faster on the CPU than LibTorch's scalar float -> uint8 conversion.
  codes_out.copy_(codes.view({n, groups * group_size}).to(at::kShort));
  scales_out.copy_(scale16.view({n, groups}));
  zeros_out.copy_(zero.view({n, groups}));
  return true;
}

}  // namespace

absl::Status ValidateRtnOptions(const RtnOptions& options) {
  if (options.bits < 2 || options.bits > 8) {
    return absl::InvalidArgumentError(absl::StrCat("rtn: bits ", options.bits, " is outside 2..8"));
  }
  if (options.group_size < -1) {
    return absl::InvalidArgumentError(absl::StrCat("rtn: group_size ", options.group_size,
                                                   " is negative (use 0 or -1 for per channel)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> RtnGroupSize(const RtnOptions& options, const std::vector<int64_t>& shape,
                                     absl::string_view name) {
  RETURN_IF_ERROR(ValidateRtnOptions(options));
  if (shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' ", ShapeString(shape),
                                                   ": RTN needs a 2-D [out, in] weight"));
  }
  const int64_t in = shape[1];
  if (shape[0] == 0 || in == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "' ", ShapeString(shape), ": RTN needs a non-empty weight"));
  }
  if (options.group_size <= 0) return in;
  if (in % options.group_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' ", ShapeString(shape),
                                                   ": group_size ", options.group_size,
                                                   " does not divide in_features ", in));
  }
  return options.group_size;
}

absl::StatusOr<QuantizedTensor> QuantizeRtn(const at::Tensor& weight, const RtnOptions& options,
                                            absl::string_view name) {
  ASSIGN_OR_RETURN(const int64_t group_size, RtnGroupSize(options, weight.sizes().vec(), name));
  return CatchTorchErrors(
      absl::StrCat("rtn: tensor '", name, "'"), [&]() -> absl::StatusOr<QuantizedTensor> {
        if (!weight.is_floating_point()) {
          return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': RTN needs a ",
                                                         "floating-point weight, not ",
                                                         c10::toString(weight.scalar_type())));
        }
        const int64_t out = weight.size(0);
        const int64_t in = weight.size(1);
        const int64_t groups = in / group_size;
        QuantizedTensor q;
        q.bits = options.bits;
        q.group_size = group_size;
        q.codes = at::empty({out, in}, weight.options().dtype(at::kByte));
        q.scales = at::empty({out, groups}, weight.options().dtype(at::kHalf));
        q.zeros = at::empty({out, groups}, weight.options().dtype(at::kByte));

        // On the CPU, blocks of rows small enough to stay in cache: each ATen op
        // below is a pass over its input, and passes over cached data are cheap.
        // Blocks are independent, so they also spread over LibTorch's threads.
        // A GPU takes the whole matrix at once.
        const int64_t rows_per_block =
            weight.is_cpu() ? std::max<int64_t>(1, kCpuBlockElements / in) : out;
        std::atomic<bool> finite{true};
        auto quantize_rows = [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; row += rows_per_block) {
            const int64_t rows = std::min(rows_per_block, end - row);
            if (!QuantizeRowBlock(weight.narrow(0, row, rows), options, group_size,
                                  q.codes.narrow(0, row, rows), q.scales.narrow(0, row, rows),
                                  q.zeros.narrow(0, row, rows))) {
              finite = false;
            }
          }
        };
        if (weight.is_cpu()) {
          at::parallel_for(0, out, rows_per_block, quantize_rows);
        } else {
          quantize_rows(0, out);
        }
        if (!finite) {
          return absl::InvalidArgumentError(absl::StrCat(
              "tensor '", name, "' ", ShapeString(weight.sizes()), " contains NaN or Inf"));
        }
        return q;
      });
}

}  // namespace compress::engine
