// Scalar references of the bit-stream packing: the layout in packing.h,
// one bit at a time.
#include <ATen/ATen.h>

#include <cstring>

#include "worker/engine/quant/packing.h"

namespace compress::engine {

at::Tensor PackBitStreamReference(const at::Tensor& codes, int bits) {
  TORCH_CHECK(codes.dim() == 2, "PackBitStreamReference: codes must be 2-D");
  at::Tensor c = codes.to(at::kCPU, at::kLong).contiguous();
  const int64_t n = c.size(0);
  const int64_t m = c.size(1);
  const int64_t rows = PackedRows(n, bits);
  std::vector<uint32_t> words(static_cast<size_t>(rows * m), 0);
  const int64_t* data = c.data_ptr<int64_t>();
  for (int64_t j = 0; j < m; ++j) {
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t code = static_cast<uint64_t>(data[i * m + j]);
      for (int t = 0; t < bits; ++t) {
        if (((code >> t) & 1u) == 0) continue;
        const int64_t stream_bit = i * bits + t;
        words[(stream_bit / 32) * m + j] |= uint32_t{1} << (stream_bit % 32);
      }
    }
  }
  at::Tensor packed = at::empty({rows, m}, at::kInt);
  if (!words.empty()) std::memcpy(packed.data_ptr(), words.data(), words.size() * sizeof(uint32_t));
  return packed;
}

at::Tensor UnpackBitStreamReference(const at::Tensor& packed, int bits, int64_t n) {
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == PackedRows(n, bits),
              "UnpackBitStreamReference: wrong packed shape");
  at::Tensor p = packed.to(at::kCPU, at::kInt).contiguous();
  const int64_t m = p.size(1);
  std::vector<uint32_t> words(static_cast<size_t>(p.numel()));
  if (!words.empty()) std::memcpy(words.data(), p.data_ptr(), words.size() * sizeof(uint32_t));
  at::Tensor codes = at::empty({n, m}, at::kByte);
  uint8_t* out = codes.data_ptr<uint8_t>();
  for (int64_t j = 0; j < m; ++j) {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t code = 0;
      for (int t = 0; t < bits; ++t) {
        const int64_t stream_bit = i * bits + t;
        const uint32_t bit = (words[(stream_bit / 32) * m + j] >> (stream_bit % 32)) & 1u;
        code |= bit << t;
      }
      out[i * m + j] = static_cast<uint8_t>(code);
    }
  }
  return codes;
}

}  // namespace compress::engine
