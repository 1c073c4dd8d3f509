// GGUF tensor data: float rows to and from the exact block layouts llama.cpp
// reads, with the quantizers' searches of llama.cpp's ggml-quants.c.
//
// The layouts are ggml-common.h's structs (block_q4_0, ..., block_q6_K; one
// struct below per format, its size pinned by a static_assert against the type
// table in common/gguf_types.h). llama.cpp dequantizes our bytes with its own
// dequantize_row_*; ours compute the same float32 values, operation for
// operation (float16 d/dmin widened exactly, then the same products in the
// same order), so both readers see bit-identical weights.
//
// Quantizers follow ggml_quantize_chunk, i.e. what llama-quantize runs:
//   no importance:   quantize_row_<type>_ref (Q4_0..Q8_0: round to the
//                    block's absmax or range; Q2_K: make_qkx2_quants with MAD;
//                    Q3_K: make_q3_quants; Q4_K/Q5_K: make_qkx2_quants with
//                    weights av_x + |x|; Q6_K: make_qx_quants weighted by x^2);
//   with importance: quantize_<type>'s impl with quant_weights (Q4_0/Q5_0:
//                    make_qx_quants; Q4_1/Q5_1, Q2_K, Q4_K, Q5_K:
//                    make_qkx3_quants, then make_qp_quants for the super-block
//                    scales; Q3_K: make_qx_quants twice; Q6_K: make_qx_quants
//                    weighted by the importance itself). The weights the
//                    searches use are importance[j] * sqrt(sigma2 + x[j]^2),
//                    sigma2 being the mean square of the row (Q4_0..Q5_1),
//                    of the super-block (Q2_K) or twice that (Q3_K..Q5_K).
//   Q8_0, F32, F16 and BF16 ignore the importance, as llama.cpp does.
// nearest_int is llama.cpp's (round half to even through the float adder);
// Q4_0..Q5_1 without importance truncate x + 0.5 (round half up), Q8_0 uses
// roundf (half away from zero), F16/BF16 round to nearest even.
//
// Each quantizer and dequantizer exists twice: a scalar reference that reads
// like ggml-quants.c, one block (and one sub-block) at a time
// (gguf_quants_reference.cc), and a fast path (gguf_quants.cc) that runs the
// same searches for 8 (AVX2) or 4 (SSE2) sub-blocks at once, one per SIMD
// lane, keeping every float operation of each lane in the reference's order,
// so the bytes are identical (the tests check that byte for byte). Both
// files turn off floating multiply-add contraction, which would change the
// searches' rounding.
//
// Shapes are PyTorch's: the last dimension is the row (ggml's ne[0], the
// dimension blocks run along); the other dimensions are flattened into rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/gguf_types.h"

namespace compress::engine {

// A float16 (ggml_half) or bfloat16 (ggml_bf16_t) as stored: its bits,
// little-endian like every multi-byte field below.
using GgufHalf = uint16_t;
using GgufBf16 = uint16_t;

// QK_K (elements per super-block) and K_SCALE_SIZE (bytes of packed 6-bit
// scales and mins of Q4_K/Q5_K; Q3_K's 6-bit scales take as many).
inline constexpr int kGgufQK_K = 256;
inline constexpr int kGgufKScaleSize = 12;

// ---------------------------------------------------------------------------
// The block formats, ggml-common.h's structs field for field. x_j is element j
// of the block (j = 0 .. kElements-1); "low/high nibble" are bits 0-3 / 4-7.
// ---------------------------------------------------------------------------

// block_q8_0: x_j = qs[j] * d.
struct BlockQ8_0 {
  static constexpr int kElements = 32;
  GgufHalf d;
  int8_t qs[32];
};

// block_q4_0: x_j = (q_j - 8) * d, q_j in the low nibble of qs[j] for
// j < 16 and in the high nibble of qs[j - 16] for j >= 16.
struct BlockQ4_0 {
  static constexpr int kElements = 32;
  GgufHalf d;
  uint8_t qs[16];
};

// block_q4_1: x_j = q_j * d + m, nibbles as Q4_0.
struct BlockQ4_1 {
  static constexpr int kElements = 32;
  GgufHalf d;
  GgufHalf m;
  uint8_t qs[16];
};

// block_q5_0: x_j = (q_j - 16) * d; the low 4 bits of q_j as Q4_0's nibbles,
// bit 4 in bit j of the little-endian uint32 qh.
struct BlockQ5_0 {
  static constexpr int kElements = 32;
  GgufHalf d;
  uint8_t qh[4];
  uint8_t qs[16];
};

// block_q5_1: x_j = q_j * d + m, q_j as Q5_0.
struct BlockQ5_1 {
  static constexpr int kElements = 32;
  GgufHalf d;
  GgufHalf m;
  uint8_t qh[4];
  uint8_t qs[16];
};

// block_q2_K: 16 sub-blocks of 16. x_j = d * (sc & 15) * q_j - dmin * (sc >> 4)
// with sc = scales[j / 16]; q_j (2 bits) is bits 2s..2s+1 of qs[32h + l] for
// j = 128h + 32s + l (h < 2, s < 4, l < 32).
struct BlockQ2_K {
  static constexpr int kElements = kGgufQK_K;
  uint8_t scales[16];
  uint8_t qs[64];
  GgufHalf d;
  GgufHalf dmin;
};

// block_q3_K: 16 sub-blocks of 16. x_j = d * (S - 32) * (q_j - (hbit ? 0 : 4))
// with q_j's 2 low bits placed as Q2_K's, hbit = bit j/32 of hmask[j % 32],
// and the 6-bit S of sub-block i: low 4 bits in the low nibble of scales[i]
// (i < 8) or the high nibble of scales[i - 8] (i >= 8), high 2 bits at bits
// 2*(i/4) of scales[8 + i % 4].
struct BlockQ3_K {
  static constexpr int kElements = kGgufQK_K;
  uint8_t hmask[32];
  uint8_t qs[64];
  uint8_t scales[kGgufKScaleSize];
  GgufHalf d;
};

// block_q4_K: 8 sub-blocks of 32. x_j = d * sc * q_j - dmin * m for sub-block
// i = j / 32, (sc, m) 6-bit each as get_scale_min_k4 unpacks them: i < 4:
// sc = scales[i] & 63, m = scales[i + 4] & 63; i >= 4: sc = (scales[i + 4] &
// 15) | (scales[i - 4] >> 6) << 4, m = (scales[i + 4] >> 4) | (scales[i] >> 6)
// << 4. q_j: low nibble of qs[32c + l] for j = 64c + l, high nibble for
// j = 64c + 32 + l (c < 4, l < 32).
struct BlockQ4_K {
  static constexpr int kElements = kGgufQK_K;
  GgufHalf d;
  GgufHalf dmin;
  uint8_t scales[kGgufKScaleSize];
  uint8_t qs[128];
};

// block_q5_K: as Q4_K, plus bit 4 of q_j: bit 2c of qh[l] for j = 64c + l,
// bit 2c + 1 of qh[l] for j = 64c + 32 + l.
struct BlockQ5_K {
  static constexpr int kElements = kGgufQK_K;
  GgufHalf d;
  GgufHalf dmin;
  uint8_t scales[kGgufKScaleSize];
  uint8_t qh[32];
  uint8_t qs[128];
};

// block_q6_K: 16 sub-blocks of 16. x_j = d * scales[j / 16] * (q_j - 32);
// for j = 128h + 32s + l (h < 2, s < 4, l < 32), the low 4 bits of q_j are
// the low (s < 2) or high (s >= 2) nibble of ql[64h + 32(s % 2) + l] and the
// high 2 bits are bits 2s..2s+1 of qh[32h + l].
struct BlockQ6_K {
  static constexpr int kElements = kGgufQK_K;
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  GgufHalf d;
};

// A row of kGgufTypes, usable in constant expressions (GgufTypeOf is not).
constexpr GgufTypeInfo GgufTypeInfoOf(GgufType type) {
  for (const GgufTypeInfo& info : kGgufTypes) {
    if (info.type == type) return info;
  }
  return GgufTypeInfo{type, "?", 0, 0};
}

// Every struct is exactly the block the type table declares.
#define COMPRESS_GGUF_CHECK_BLOCK(Block, type_id)                                        \
  static_assert(sizeof(Block) == GgufTypeInfoOf(GgufType::type_id).block_bytes &&        \
                    Block::kElements == GgufTypeInfoOf(GgufType::type_id).block_elements, \
                #Block " does not match its row in kGgufTypes")
COMPRESS_GGUF_CHECK_BLOCK(BlockQ8_0, kQ8_0);
COMPRESS_GGUF_CHECK_BLOCK(BlockQ4_0, kQ4_0);
COMPRESS_GGUF_CHECK_BLOCK(BlockQ4_1, kQ4_1);
COMPRESS_GGUF_CHECK_BLOCK(BlockQ5_0, kQ5_0);
COMPRESS_GGUF_CHECK_BLOCK(BlockQ5_1, kQ5_1);
COMPRESS_GGUF_CHECK_BLOCK(BlockQ2_K, kQ2_K);
COMPRESS_GGUF_CHECK_BLOCK(BlockQ3_K, kQ3_K);
COMPRESS_GGUF_CHECK_BLOCK(BlockQ4_K, kQ4_K);
COMPRESS_GGUF_CHECK_BLOCK(BlockQ5_K, kQ5_K);
COMPRESS_GGUF_CHECK_BLOCK(BlockQ6_K, kQ6_K);
#undef COMPRESS_GGUF_CHECK_BLOCK
static_assert(sizeof(float) == GgufTypeInfoOf(GgufType::kF32).block_bytes, "F32");
static_assert(sizeof(GgufHalf) == GgufTypeInfoOf(GgufType::kF16).block_bytes, "F16");
static_assert(sizeof(GgufBf16) == GgufTypeInfoOf(GgufType::kBF16).block_bytes, "BF16");

// ---------------------------------------------------------------------------
// The quantizer table: one row per type, geometry from the block struct (and
// so from kGgufTypes, which the asserts above pin).
// ---------------------------------------------------------------------------

// Quantizes the n floats at x (finite; n a multiple of the type's
// block_elements) into n / block_elements blocks at out. importance is null
// or n non-negative finite weights, one per element of the row (an imatrix
// row: the weight of input column j). No alignment is required of any pointer.
using GgufQuantizeRowFn = void (*)(const float* x, int64_t n, const float* importance,
                                   uint8_t* out);
// The n floats that n / block_elements blocks at `in` hold.
using GgufDequantizeRowFn = void (*)(const uint8_t* in, int64_t n, float* out);

struct GgufQuantizer {
  GgufType type;
  int64_t block_elements;  // the block struct's kElements (1 for F32/F16/BF16)
  int64_t block_bytes;     // sizeof the block struct
  bool uses_importance;    // llama.cpp's quantize_<type> reads quant_weights
  GgufQuantizeRowFn quantize_row;      // fast path
  GgufDequantizeRowFn dequantize_row;  // fast path
  GgufQuantizeRowFn quantize_row_reference;
  GgufDequantizeRowFn dequantize_row_reference;
};

// All rows, one per type of kGgufTypes.
absl::Span<const GgufQuantizer> GgufQuantizers();
// The row of `type`, or nullptr for a type without one.
const GgufQuantizer* FindGgufQuantizer(GgufType type);

// ---------------------------------------------------------------------------
// Tensors.
// ---------------------------------------------------------------------------

// Where a tensor of `shape` lives in `type`: rows of row_elements values
// (shape's last dimension), row_bytes each, bytes in all.
struct GgufTensorLayout {
  int64_t rows = 0;
  int64_t row_elements = 0;
  int64_t row_bytes = 0;
  int64_t bytes = 0;
};

// INVALID_ARGUMENT naming the tensor, shape and type for a type without a
// quantizer, an empty or 0-d shape, a negative dimension, a row length that is
// not a multiple of the block size, or a size past 2^62 bytes.
absl::StatusOr<GgufTensorLayout> GgufLayoutOf(GgufType type, const std::vector<int64_t>& shape,
                                              absl::string_view name);

// Quantizes `weight` (F32, F16 or BF16, any device, at least 1-D) into the
// GGUF data of `type`, rows in parallel on the CPU (at::parallel_for).
// `importance` is undefined or a 1-D tensor of row_elements finite,
// non-negative weights. Before returning, checks that the bytes are
// layout.bytes long and that they dequantize to finite values (a float16
// scale overflows on weights past about 65504 times the code range; F16
// overflows past 65504). INVALID_ARGUMENT naming the tensor, its shape and the
// type for every bad input: see GgufLayoutOf, another dtype, NaN or Inf (with
// the row), a bad importance vector, an overflowing result.
absl::StatusOr<std::string> QuantizeGgufTensor(const at::Tensor& weight, GgufType type,
                                               const at::Tensor& importance,
                                               absl::string_view name);

// The float32 CPU tensor of `shape` that `bytes` (GGUF data of `type`) hold,
// rows in parallel. INVALID_ARGUMENT as GgufLayoutOf, or when bytes is not
// exactly layout.bytes long.
absl::StatusOr<at::Tensor> DequantizeGgufTensor(absl::string_view bytes, GgufType type,
                                                const std::vector<int64_t>& shape,
                                                absl::string_view name);

// The same two through the scalar reference rows, one row at a time, with the
// same argument checks (gguf_quants_reference.cc).
absl::StatusOr<std::string> QuantizeGgufTensorReference(const at::Tensor& weight, GgufType type,
                                                        const at::Tensor& importance,
                                                        absl::string_view name);
absl::StatusOr<at::Tensor> DequantizeGgufTensorReference(absl::string_view bytes, GgufType type,
                                                         const std::vector<int64_t>& shape,
                                                         absl::string_view name);

// ---------------------------------------------------------------------------
// The scalar references, one pair per type (gguf_quants_reference.cc), named
// after llama.cpp's functions they follow. Signatures as GgufQuantizeRowFn /
// GgufDequantizeRowFn.
// ---------------------------------------------------------------------------
void QuantizeRowF32Reference(const float* x, int64_t n, const float* importance, uint8_t* out);
void QuantizeRowF16Reference(const float* x, int64_t n, const float* importance, uint8_t* out);
void QuantizeRowBF16Reference(const float* x, int64_t n, const float* importance, uint8_t* out);
void QuantizeRowQ8_0Reference(const float* x, int64_t n, const float* importance, uint8_t* out);
void QuantizeRowQ4_0Reference(const float* x, int64_t n, const float* importance, uint8_t* out);
void QuantizeRowQ4_1Reference(const float* x, int64_t n, const float* importance, uint8_t* out);
void QuantizeRowQ5_0Reference(const float* x, int64_t n, const float* importance, uint8_t* out);
void QuantizeRowQ5_1Reference(const float* x, int64_t n, const float* importance, uint8_t* out);
void QuantizeRowQ2_KReference(const float* x, int64_t n, const float* importance, uint8_t* out);
void QuantizeRowQ3_KReference(const float* x, int64_t n, const float* importance, uint8_t* out);
void QuantizeRowQ4_KReference(const float* x, int64_t n, const float* importance, uint8_t* out);
void QuantizeRowQ5_KReference(const float* x, int64_t n, const float* importance, uint8_t* out);
void QuantizeRowQ6_KReference(const float* x, int64_t n, const float* importance, uint8_t* out);

void DequantizeRowF32Reference(const uint8_t* in, int64_t n, float* out);
void DequantizeRowF16Reference(const uint8_t* in, int64_t n, float* out);
void DequantizeRowBF16Reference(const uint8_t* in, int64_t n, float* out);
void DequantizeRowQ8_0Reference(const uint8_t* in, int64_t n, float* out);
void DequantizeRowQ4_0Reference(const uint8_t* in, int64_t n, float* out);
void DequantizeRowQ4_1Reference(const uint8_t* in, int64_t n, float* out);
void DequantizeRowQ5_0Reference(const uint8_t* in, int64_t n, float* out);
void DequantizeRowQ5_1Reference(const uint8_t* in, int64_t n, float* out);
void DequantizeRowQ2_KReference(const uint8_t* in, int64_t n, float* out);
void DequantizeRowQ3_KReference(const uint8_t* in, int64_t n, float* out);
void DequantizeRowQ4_KReference(const uint8_t* in, int64_t n, float* out);
void DequantizeRowQ5_KReference(const uint8_t* in, int64_t n, float* out);
void DequantizeRowQ6_KReference(const uint8_t* in, int64_t n, float* out);

}  // namespace compress::engine
