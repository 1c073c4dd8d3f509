// Scalar references of RTN and dequantization: the documented formulas,
// written out one group and one element at a time. Deliberately naive; the
// tests compare the fast ATen paths against these.
#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/engine/quant/quantized_tensor.h"
#include "worker/engine/quant/rtn.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

// The float16 nearest to x from above.
c10::Half RoundUpToHalf(float x) {
  c10::Half h(x);  // round to nearest even
  if (static_cast<float>(h) < x) {
    uint16_t bits;
    std::memcpy(&bits, &h, sizeof(bits));
    ++bits;
    std::memcpy(&h, &bits, sizeof(bits));
  }
  return h;
}

float Clamp(float x, float lo, float hi) { return std::min(std::max(x, lo), hi); }

}  // namespace

absl::StatusOr<QuantizedTensor> QuantizeRtnReference(const at::Tensor& weight,
                                                     const RtnOptions& options,
                                                     absl::string_view name) {
  ASSIGN_OR_RETURN(const int64_t group_size, RtnGroupSize(options, weight.sizes().vec(), name));
  return CatchTorchErrors(
      absl::StrCat("rtn reference: tensor '", name, "'"), [&]() -> absl::StatusOr<QuantizedTensor> {
        const int64_t out = weight.size(0);
        const int64_t in = weight.size(1);
        const int64_t groups = in / group_size;
        const float qmax = static_cast<float>((1 << options.bits) - 1);

        at::Tensor w = weight.to(at::kCPU, at::kFloat).contiguous();
        QuantizedTensor q;
        q.bits = options.bits;
        q.group_size = group_size;
        q.codes = at::empty({out, in}, at::kByte);
        q.scales = at::empty({out, groups}, at::kHalf);
        q.zeros = at::empty({out, groups}, at::kByte);
        const float* w_data = w.data_ptr<float>();
        uint8_t* codes = q.codes.data_ptr<uint8_t>();
        c10::Half* scales = q.scales.data_ptr<c10::Half>();
        uint8_t* zeros = q.zeros.data_ptr<uint8_t>();

        for (int64_t r = 0; r < out; ++r) {
          for (int64_t g = 0; g < groups; ++g) {
            const float* x = w_data + r * in + g * group_size;
            float lo = 0.0f;
            float hi = 0.0f;
            for (int64_t i = 0; i < group_size; ++i) {
              if (!std::isfinite(x[i])) {
                return absl::InvalidArgumentError(
                    absl::StrCat("tensor '", name, "' contains NaN or Inf"));
              }
              lo = std::min(lo, x[i]);
              hi = std::max(hi, x[i]);
            }
            if (options.symmetric) {
              hi = std::max(-lo, hi);
              lo = -hi;
            }
            if (lo == 0.0f && hi == 0.0f) {
              lo = -1.0f;
              hi = 1.0f;
            }
            const c10::Half scale_half = RoundUpToHalf((hi - lo) / qmax);
            const float scale = static_cast<float>(scale_half);
            const float zero = options.symmetric ? static_cast<float>(1 << (options.bits - 1))
                                                 : Clamp(std::nearbyint(-lo / scale), 0.0f, qmax);
            scales[r * groups + g] = scale_half;
            zeros[r * groups + g] = static_cast<uint8_t>(zero);
            for (int64_t i = 0; i < group_size; ++i) {
              const float code = Clamp(std::nearbyint(x[i] / scale) + zero, 0.0f, qmax);
              codes[r * in + g * group_size + i] = static_cast<uint8_t>(code);
            }
          }
        }
        return q;
      });
}

at::Tensor DequantizeReference(const QuantizedTensor& q, at::ScalarType dtype) {
  const int64_t out = q.out_features();
  const int64_t in = q.in_features();
  const int64_t groups = q.groups();
  at::Tensor codes = q.codes.to(at::kCPU).contiguous();
  at::Tensor scales = q.scales.to(at::kCPU).contiguous();
  at::Tensor zeros = q.zeros.to(at::kCPU).contiguous();
  at::Tensor result = at::empty({out, in}, at::kFloat);
  const uint8_t* code_data = codes.data_ptr<uint8_t>();
  const uint8_t* zero_data = zeros.data_ptr<uint8_t>();
  const c10::Half* scale_data = scales.data_ptr<c10::Half>();
  float* dst = result.data_ptr<float>();
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t i = 0; i < in; ++i) {
      const int64_t g = r * groups + i / q.group_size;
      const float code = static_cast<float>(code_data[r * in + i]);
      const float zero = static_cast<float>(zero_data[g]);
      const float scale = static_cast<float>(scale_data[g]);
      dst[r * in + i] = (code - zero) * scale;
    }
  }
  return result.to(dtype);
}

}  // namespace compress::engine
