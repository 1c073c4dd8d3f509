// Packing quantized weights into int32 tensors for a checkpoint.
//
// One layout for every bit width b (2..8): a little-endian bit stream along
// the input dimension. For output channel j, the codes q[j, 0], q[j, 1], ...
// are concatenated, code i occupying stream bits [i*b, i*b + b) with its
// least significant bit first; stream bit k is bit (k % 32) of the int32 at
// row k / 32 of column j. The tail of the last word is zero.
//
// For b = 2, 4, 8 this is exactly GPTQ's qweight layout (32/b codes per
// word, low bits first); for b = 3 it is GPTQ's 3-bit packing too (32 codes
// in three words, the codes that straddle a word split low bits first).
// The tensors written per quantized linear layer `<prefix>.weight`:
//
//   <prefix>.qweight  int32   [ceil(in*b/32), out]   codes, stream along in
//   <prefix>.qzeros   int32   [groups, ceil(out*b/32)] zero points, stream along out
//   <prefix>.scales   float16 [groups, out]
//   <prefix>.g_idx    int32   [in]                   g_idx[i] = i / group_size
//
// groups = in / group_size (1 for per channel, written as group_size -1).
// qzeros stores (zero - zero_offset) mod 2^b, zero_offset from the format
// row: GPTQ's v1 checkpoints (what quant_method "gptq" loaders read) store
// zero - 1. An asymmetric group whose zero is 0 is stored as 2^b - 1; our
// unpacker restores it exactly, but loaders that add 1 without masking
// (exllama) read 2^b for it: a known limitation of the v1 format.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/safetensors_header.h"
#include "worker/engine/quant/quantized_tensor.h"

namespace compress::engine {

// 32 consecutive codes of one output channel fill exactly `kBits` 32-bit
// words: one block of the stream. In qweight the words of a block are
// consecutive rows of one column.
template <int kBits>
struct BitStreamBlock {
  static constexpr int kCodes = 32;
  uint32_t words[kBits];
};
static_assert(sizeof(BitStreamBlock<2>) == 8, "2-bit block: 32 codes in 8 bytes");
static_assert(sizeof(BitStreamBlock<3>) == 12, "3-bit block: 32 codes in 12 bytes");
static_assert(sizeof(BitStreamBlock<4>) == 16, "4-bit block: 32 codes in 16 bytes");
static_assert(sizeof(BitStreamBlock<5>) == 20, "5-bit block: 32 codes in 20 bytes");
static_assert(sizeof(BitStreamBlock<6>) == 24, "6-bit block: 32 codes in 24 bytes");
static_assert(sizeof(BitStreamBlock<7>) == 28, "7-bit block: 32 codes in 28 bytes");
static_assert(sizeof(BitStreamBlock<8>) == 32, "8-bit block: 32 codes in 32 bytes");

// One row per packed format. Adding a format means adding a row here.
struct PackedFormat {
  const char* name;
  int bits;
  int block_codes;           // codes per block (BitStreamBlock::kCodes)
  int block_bytes;           // sizeof(BitStreamBlock<bits>)
  const char* quant_method;  // quantization_config.quant_method
  int zero_offset;           // qzeros stores zero - zero_offset (mod 2^bits)
};

inline constexpr PackedFormat kPackedFormats[] = {
    {"gptq_int2", 2, 32, sizeof(BitStreamBlock<2>), "gptq", 1},
    {"gptq_int3", 3, 32, sizeof(BitStreamBlock<3>), "gptq", 1},
    {"gptq_int4", 4, 32, sizeof(BitStreamBlock<4>), "gptq", 1},
    {"bitstream_int5", 5, 32, sizeof(BitStreamBlock<5>), "compress_rtn", 0},
    {"bitstream_int6", 6, 32, sizeof(BitStreamBlock<6>), "compress_rtn", 0},
    {"bitstream_int7", 7, 32, sizeof(BitStreamBlock<7>), "compress_rtn", 0},
    {"gptq_int8", 8, 32, sizeof(BitStreamBlock<8>), "gptq", 1},
};

// The row for `bits`, or nullptr outside 2..8.
const PackedFormat* FindPackedFormat(int bits);

// Rows of the int32 stream holding n codes of `bits` bits: ceil(n*bits/32).
inline int64_t PackedRows(int64_t n, int bits) { return (n * bits + 31) / 32; }

// Packs codes [n, m] (any integer dtype, values in [0, 2^bits)) along dim 0
// into int32 [PackedRows(n, bits), m]. ATen ops on the codes' device.
at::Tensor PackBitStream(const at::Tensor& codes, int bits);
// The inverse: int32 [PackedRows(n, bits), m] -> uint8 [n, m].
at::Tensor UnpackBitStream(const at::Tensor& packed, int bits, int64_t n);

// Scalar references of the two, bit by bit on the CPU.
at::Tensor PackBitStreamReference(const at::Tensor& codes, int bits);
at::Tensor UnpackBitStreamReference(const at::Tensor& packed, int bits, int64_t n);

struct PackedLinear {
  at::Tensor qweight;  // int32 [PackedRows(in, bits), out]
  at::Tensor qzeros;   // int32 [groups, PackedRows(out, bits)]
  at::Tensor scales;   // float16 [groups, out]
  at::Tensor g_idx;    // int32 [in]
};

inline constexpr char kQweightSuffix[] = ".qweight";
inline constexpr char kQzerosSuffix[] = ".qzeros";
inline constexpr char kScalesSuffix[] = ".scales";
inline constexpr char kGidxSuffix[] = ".g_idx";

// The four tensors' names, dtypes and shapes, in the order they are written,
// for a [out, in] weight whose name without ".weight" is `prefix`.
std::vector<SafetensorsTensorSpec> PackedLinearSpecs(const std::string& prefix,
                                                     int64_t out_features, int64_t in_features,
                                                     int bits, int64_t group_size);
// Their total bytes: what the packed checkpoint spends on this weight.
int64_t PackedLinearBytes(int64_t out_features, int64_t in_features, int bits, int64_t group_size);

// Packs a validated QuantizedTensor (moved to the CPU) and checks every
// output's dtype, shape and byte size. INVALID_ARGUMENT naming `name`.
absl::StatusOr<PackedLinear> PackLinear(const QuantizedTensor& q, absl::string_view name);
// The exact inverse of PackLinear; checks shapes and that g_idx is the
// contiguous grouping this layout describes.
absl::StatusOr<QuantizedTensor> UnpackLinear(const PackedLinear& packed, int bits,
                                             absl::string_view name);

}  // namespace compress::engine
