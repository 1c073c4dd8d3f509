// Round-to-nearest (RTN) weight-only quantization: no calibration data, each
// group's scale from its own range.
//
// For a group with values x (b bits, qmax = 2^b - 1), following GPTQ's
// quantizer (the range always includes 0, so 0 stays exactly representable):
//   lo = min(min x, 0), hi = max(max x, 0)
//   symmetric:  hi = max(-lo, hi), lo = -hi            (unlike GPTQ, also when
//               x >= 0: GPTQ then keeps lo = 0 and clips half the codes)
//   all zero:   lo = -1, hi = 1                       (any scale works)
//   scale = (hi - lo) / qmax, rounded UP to the next float16: the stored
//           scale is the one the codes are computed with, and rounding up
//           keeps [lo, hi] inside the grid, so |x - dequant(x)| <= scale / 2.
//   zero  = symmetric ? 2^(b-1) : clamp(round(-lo / scale), 0, qmax)
//   q     = clamp(round(x / scale) + zero, 0, qmax)
// All arithmetic is float32; round() is round-half-to-even (nearbyint, as
// torch.round). The symmetric scale is 2 max|x| / (2^b - 1), i.e.
// max|x| / ((2^b - 1) / 2).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/engine/quant/quantized_tensor.h"

namespace compress::engine {

struct RtnOptions {
  int bits = 4;            // 2..8
  bool symmetric = false;  // false: asymmetric, zero point from the range
  // 0 or -1: one group per output channel. Otherwise the number of weights
  // per group along in_features, which it must divide.
  int64_t group_size = 0;
};

// INVALID_ARGUMENT for bits outside 2..8 or a group size below -1.
absl::Status ValidateRtnOptions(const RtnOptions& options);

// The group size RTN uses on a weight of `shape` ([out, in]): in for per
// channel, else options.group_size. INVALID_ARGUMENT naming the tensor and
// shape when the weight is not 2-D or the group size does not divide in.
absl::StatusOr<int64_t> RtnGroupSize(const RtnOptions& options, const std::vector<int64_t>& shape,
                                     absl::string_view name);

// The fast path: ATen ops on the weight's device. `weight` is a 2-D F32, F16
// or BF16 tensor; NaN or Inf in it is INVALID_ARGUMENT naming the tensor.
absl::StatusOr<QuantizedTensor> QuantizeRtn(const at::Tensor& weight, const RtnOptions& options,
                                            absl::string_view name);

// The scalar reference: the formulas above, one group and one element at a
// time on the CPU. Kept simple and apart from QuantizeRtn, which tests check
// against it code for code.
absl::StatusOr<QuantizedTensor> QuantizeRtnReference(const at::Tensor& weight,
                                                     const RtnOptions& options,
                                                     absl::string_view name);

}  // namespace compress::engine
