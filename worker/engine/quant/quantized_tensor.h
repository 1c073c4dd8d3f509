// A weight matrix in quantized form, before packing: one integer code per
// weight, one scale and one zero point per group. Every weight quantizer
// (RTN today; GPTQ, AWQ later) produces this, and every packer consumes it.
//
// Conventions (the same for all bit widths b in 2..8, qmax = 2^b - 1):
//   weight  W  [out_features, in_features]  (PyTorch nn.Linear layout)
//   groups     consecutive runs of group_size weights along in_features;
//              group g of row r covers W[r, g*group_size : (g+1)*group_size].
//              Per-output-channel quantization is group_size == in_features.
//   code       q in [0, qmax]
//   value      W[r, i] ~ (q[r, i] - zero[r, g]) * scale[r, g],  g = i / group_size,
//              computed in float32, then rounded once to the output dtype.
//   symmetric  zero == 2^(b-1) for every group (GPTQ's sym convention).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace compress::engine {

struct QuantizedTensor {
  at::Tensor codes;   // uint8 [out, in], each in [0, 2^bits)
  at::Tensor scales;  // float16 [out, groups], finite and > 0 (stored as is)
  at::Tensor zeros;   // uint8 [out, groups], each in [0, 2^bits)
  int bits = 0;
  int64_t group_size = 0;  // in elements along in_features, divides in_features

  int64_t out_features() const { return codes.size(0); }
  int64_t in_features() const { return codes.size(1); }
  int64_t groups() const { return in_features() / group_size; }
};

// Dequantizes with ATen ops on the tensors' device. `dtype` is the output
// dtype (the original weight's).
at::Tensor Dequantize(const QuantizedTensor& q, at::ScalarType dtype);

// The scalar reference of Dequantize, on the CPU, one element at a time.
at::Tensor DequantizeReference(const QuantizedTensor& q, at::ScalarType dtype);

// Checks what a quantizer produced before anything is written: dtypes and
// shapes as documented, codes and zeros in range, scales finite and
// positive. INVALID_ARGUMENT naming `name` (a scale overflowing fp16 means
// the weight's range is too wide for this format) or INTERNAL for a broken
// invariant.
absl::Status ValidateQuantized(const QuantizedTensor& q, absl::string_view name);

// INVALID_ARGUMENT naming the tensor `name` and its part `what` ("qweight")
// unless `t` is defined with exactly `dtype` and `shape`: for packers that
// check what they produce and unpackers that check what they read.
absl::Status CheckTensor(const at::Tensor& t, at::ScalarType dtype,
                         const std::vector<int64_t>& shape, absl::string_view what,
                         absl::string_view name);

// ||a - b||_F / ||a||_F accumulated in float64 (0 when both are zero, +Inf
// when only `reference` is). Both tensors have the same shape (at least 1-D).
double RelativeError(const at::Tensor& reference, const at::Tensor& approximation);

}  // namespace compress::engine
