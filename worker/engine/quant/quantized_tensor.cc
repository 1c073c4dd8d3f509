#include "worker/engine/quant/quantized_tensor.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace compress::engine {
namespace {

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status Broken(absl::string_view name, absl::string_view what) {
  return absl::InternalError(absl::StrCat("tensor '", name, "': quantizer output ", what));
}

}  // namespace

at::Tensor Dequantize(const QuantizedTensor& q, at::ScalarType dtype) {
  const int64_t out = q.out_features();
  const int64_t in = q.in_features();
  at::Tensor codes = q.codes.to(at::kFloat).view({out, q.groups(), q.group_size});
  at::Tensor zeros = q.zeros.to(at::kFloat).unsqueeze(-1);
  at::Tensor scales = q.scales.to(at::kFloat).unsqueeze(-1);
  return codes.sub_(zeros).mul_(scales).view({out, in}).to(dtype);
}

absl::Status ValidateQuantized(const QuantizedTensor& q, absl::string_view name) {
  if (q.bits < 2 || q.bits > 8) return Broken(name, absl::StrCat("has bits ", q.bits));
  if (!q.codes.defined() || q.codes.dim() != 2 || q.codes.scalar_type() != at::kByte) {
    return Broken(name, "codes are not a 2-D uint8 tensor");
  }
  const int64_t out = q.out_features();
  const int64_t in = q.in_features();
  if (q.group_size <= 0 || in % q.group_size != 0) {
    return Broken(name, absl::StrCat("group size ", q.group_size, " for in_features ", in));
  }
  const std::vector<int64_t> group_shape = {out, q.groups()};
  if (!q.scales.defined() || q.scales.scalar_type() != at::kHalf ||
      q.scales.sizes() != at::IntArrayRef(group_shape)) {
    return Broken(name, absl::StrCat("scales are not float16 ", ShapeString(group_shape)));
  }
  if (!q.zeros.defined() || q.zeros.scalar_type() != at::kByte ||
      q.zeros.sizes() != at::IntArrayRef(group_shape)) {
    return Broken(name, absl::StrCat("zeros are not uint8 ", ShapeString(group_shape)));
  }
  const int qmax = (1 << q.bits) - 1;
  if (q.codes.numel() > 0 && q.codes.max().item<int>() > qmax) {
    return Broken(name, absl::StrCat("has codes above ", qmax));
  }
  if (q.zeros.numel() > 0 && q.zeros.max().item<int>() > qmax) {
    return Broken(name, absl::StrCat("has zero points above ", qmax));
  }
  at::Tensor scales = q.scales.to(at::kFloat);
  if (!at::isfinite(scales).all().item<bool>()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", name, "' ", ShapeString(q.codes.sizes()), ": a group's range needs a scale ",
        "above float16's maximum (65504); the weights are too large for this format"));
  }
  if (scales.numel() > 0 && !(scales.min().item<float>() > 0.0f)) {
    return Broken(name, "has a scale that is not positive");
  }
  return absl::OkStatus();
}

double RelativeError(const at::Tensor& reference, const at::Tensor& approximation) {
  // Sums of squares in float64, a block of about 1 Mi elements at a time:
  // float64 copies of a whole embedding matrix would cost gigabytes.
  const at::Tensor a = reference.reshape({reference.size(0), -1});
  const at::Tensor b = approximation.reshape({approximation.size(0), -1});
  const int64_t rows_per_block =
      std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(a.size(1), 1));
  double reference_squares = 0.0;
  double difference_squares = 0.0;
  for (int64_t row = 0; row < a.size(0); row += rows_per_block) {
    const int64_t rows = std::min(rows_per_block, a.size(0) - row);
    const at::Tensor block = a.narrow(0, row, rows).to(at::kDouble);
    reference_squares += block.square().sum().item<double>();
    difference_squares +=
        (block - b.narrow(0, row, rows).to(at::kDouble)).square_().sum().item<double>();
  }
  if (reference_squares == 0.0) {
    return difference_squares == 0.0 ? 0.0 : std::numeric_limits<double>::infinity();
  }
  return std::sqrt(difference_squares / reference_squares);
}

absl::Status CheckTensor(const at::Tensor& t, at::ScalarType dtype,
                         const std::vector<int64_t>& shape, absl::string_view what,
                         absl::string_view name) {
  if (!t.defined() || t.scalar_type() != dtype || t.sizes() != at::IntArrayRef(shape)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", name, "': ", what, " is ",
        t.defined() ? absl::StrCat(c10::toString(t.scalar_type()), " ", ShapeString(t.sizes()))
                    : std::string("missing"),
        ", expected ", c10::toString(dtype), " ", ShapeString(shape)));
  }
  return absl::OkStatus();
}

}  // namespace compress::engine
