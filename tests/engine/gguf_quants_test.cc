// GGUF quantizers: the block layouts decoded from hand-built bytes, blocks
// quantized by hand, the fast path against the scalar reference byte for
// byte, error bounds and their ordering, importance weights, F16/BF16
// rounding, locality, and bad inputs named.
#include "worker/engine/gguf/gguf_quants.h"

#include <ATen/ATen.h>
#include <c10/util/Half.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/engine/test_util.h"

namespace compress::engine {
namespace {

using testing::ExpectInvalidArgument;

// ggml-common.h's sizes, written out.
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ2_K) == 84);
static_assert(sizeof(BlockQ3_K) == 110);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ5_K) == 176);
static_assert(sizeof(BlockQ6_K) == 210);

constexpr GgufType kQuantizedTypes[] = {
    GgufType::kQ8_0, GgufType::kQ4_0, GgufType::kQ4_1, GgufType::kQ5_0, GgufType::kQ5_1,
    GgufType::kQ2_K, GgufType::kQ3_K, GgufType::kQ4_K, GgufType::kQ5_K, GgufType::kQ6_K};

const GgufQuantizer& Quantizer(GgufType type) {
  const GgufQuantizer* q = FindGgufQuantizer(type);
  if (q == nullptr) std::abort();
  return *q;
}

std::string Name(GgufType type) { return GgufTypeOf(type).name; }

int64_t RowBytes(GgufType type, int64_t n) {
  const GgufQuantizer& q = Quantizer(type);
  return n / q.block_elements * q.block_bytes;
}

std::vector<uint8_t> Quantize(GgufType type, const std::vector<float>& x,
                              const float* importance = nullptr, bool reference = false) {
  const GgufQuantizer& q = Quantizer(type);
  std::vector<uint8_t> out(RowBytes(type, x.size()));
  (reference ? q.quantize_row_reference : q.quantize_row)(x.data(), x.size(), importance,
                                                          out.data());
  return out;
}

std::vector<float> Dequantize(GgufType type, const std::vector<uint8_t>& bytes, int64_t n,
                              bool reference = false) {
  const GgufQuantizer& q = Quantizer(type);
  std::vector<float> out(n);
  (reference ? q.dequantize_row_reference : q.dequantize_row)(bytes.data(), n, out.data());
  return out;
}

template <typename Block>
Block AsBlock(const std::vector<uint8_t>& bytes, int index = 0) {
  Block block;
  std::memcpy(&block, bytes.data() + index * sizeof(Block), sizeof(Block));
  return block;
}

template <typename Block>
std::vector<uint8_t> BytesOf(const Block& block) {
  std::vector<uint8_t> bytes(sizeof(Block));
  std::memcpy(bytes.data(), &block, sizeof(Block));
  return bytes;
}

GgufHalf Half(float x) { return c10::detail::fp16_ieee_from_fp32_value(x); }
float FromHalf(GgufHalf h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

uint32_t Bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// Equal bit patterns, or both NaN (random bytes can make NaN scales, whose
// payload the two paths may propagate differently).
bool SameFloat(float a, float b) {
  return Bits(a) == Bits(b) || (std::isnan(a) && std::isnan(b));
}

std::vector<float> Gaussian(std::mt19937& rng, int64_t n, float sigma = 1.0f) {
  std::normal_distribution<float> normal(0.0f, sigma);
  std::vector<float> x(n);
  for (float& v : x) v = normal(rng);
  return x;
}

// ---------------------------------------------------------------------------
// The table.
// ---------------------------------------------------------------------------

TEST(GgufQuants, TableAgreesWithTheTypeTable) {
  EXPECT_EQ(GgufQuantizers().size(), std::size(kGgufTypes));
  std::set<uint32_t> seen;
  for (const GgufQuantizer& q : GgufQuantizers()) {
    EXPECT_TRUE(seen.insert(static_cast<uint32_t>(q.type)).second) << Name(q.type);
  }
  for (const GgufTypeInfo& info : kGgufTypes) {
    SCOPED_TRACE(info.name);
    const GgufQuantizer* q = FindGgufQuantizer(info.type);
    ASSERT_NE(q, nullptr);
    EXPECT_EQ(q->block_elements, info.block_elements);
    EXPECT_EQ(q->block_bytes, info.block_bytes);
    EXPECT_NE(q->quantize_row, nullptr);
    EXPECT_NE(q->dequantize_row, nullptr);
    EXPECT_NE(q->quantize_row_reference, nullptr);
    EXPECT_NE(q->dequantize_row_reference, nullptr);
    // llama.cpp's quantize_q8_0 and the float conversions ignore quant_weights.
    const bool uses = info.type != GgufType::kF32 && info.type != GgufType::kF16 &&
                      info.type != GgufType::kBF16 && info.type != GgufType::kQ8_0;
    EXPECT_EQ(q->uses_importance, uses);
  }
  EXPECT_EQ(FindGgufQuantizer(static_cast<GgufType>(99)), nullptr);
}

TEST(GgufQuants, LayoutOfATensor) {
  absl::StatusOr<GgufTensorLayout> layout = GgufLayoutOf(GgufType::kQ4_K, {4096, 4096}, "w");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->rows, 4096);
  EXPECT_EQ(layout->row_elements, 4096);
  EXPECT_EQ(layout->row_bytes, 16 * 144);
  EXPECT_EQ(layout->bytes, 4096 * 16 * 144);
  layout = GgufLayoutOf(GgufType::kQ8_0, {2, 3, 64}, "w");  // rows flatten
  ASSERT_TRUE(layout.ok());
  EXPECT_EQ(layout->rows, 6);
  EXPECT_EQ(layout->bytes, 6 * 2 * 34);
  layout = GgufLayoutOf(GgufType::kF16, {5}, "w");
  ASSERT_TRUE(layout.ok());
  EXPECT_EQ(layout->rows, 1);
  EXPECT_EQ(layout->bytes, 10);
}

// ---------------------------------------------------------------------------
// Hand-computed blocks of the legacy types: quantized by hand from
// llama.cpp's formulas, and decoded back.
// ---------------------------------------------------------------------------

TEST(GgufQuants, Q8_0HandComputedBlock) {
  // amax = 127, so d = 127 / 127 = 1 (float16 0x3C00) and codes are
  // roundf(x): half away from zero, 2.5 -> 3 and -2.5 -> -3.
  std::vector<float> x = {127, -127, 0.5f, -0.5f, 2.5f, -2.5f, 1.49f, 100.7f};
  for (int j = 8; j < 32; ++j) x.push_back(j - 20);  // integers -12 .. 11
  const std::vector<uint8_t> bytes = Quantize(GgufType::kQ8_0, x);
  std::vector<uint8_t> expected = {0x00, 0x3C, 0x7F, 0x81, 0x01, 0xFF, 0x03, 0xFD, 0x01, 0x65};
  for (int j = 8; j < 32; ++j) expected.push_back(static_cast<uint8_t>(j - 20));
  EXPECT_EQ(bytes, expected);
  const std::vector<float> y = Dequantize(GgufType::kQ8_0, bytes, 32);
  const std::vector<float> want = {127, -127, 1, -1, 3, -3, 1, 101};
  for (int j = 0; j < 8; ++j) EXPECT_EQ(y[j], want[j]) << j;
  for (int j = 8; j < 32; ++j) EXPECT_EQ(y[j], j - 20);
}

TEST(GgufQuants, Q4_0HandComputedBlocks) {
  // Block 1: the value of largest magnitude is -8, so d = -8 / -8 = 1 and a
  // code is min(15, (int)(x + 8.5)): round half up. x[j] = j - 8 for j < 16
  // gives code j (low nibble of qs[j]); the high nibbles hold
  // x[16..20] = 7.9 -> 15 (clamped), -0.5 -> 8, 0.5 -> 9, 1.49 -> 9,
  // -7.6 -> 0, and x[21..31] = 0 -> 8.
  std::vector<float> x(32, 0.0f);
  for (int j = 0; j < 16; ++j) x[j] = j - 8;
  x[16] = 7.9f;
  x[17] = -0.5f;
  x[18] = 0.5f;
  x[19] = 1.49f;
  x[20] = -7.6f;
  // Block 2: the largest magnitude is +8, so d = 8 / -8 = -1 (0xBC00); x = 8 - j
  // scales to j - 8 and gets code j; the high half (x = 8) gets code 0.
  for (int j = 0; j < 32; ++j) x.push_back(j < 16 ? 8.0f - j : 8.0f);
  const std::vector<uint8_t> bytes = Quantize(GgufType::kQ4_0, x);
  const std::vector<uint8_t> expected = {
      0x00, 0x3C, 0xF0, 0x81, 0x92, 0x93, 0x04, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8B,
      0x8C, 0x8D, 0x8E, 0x8F,  // block 1
      0x00, 0xBC, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B,
      0x0C, 0x0D, 0x0E, 0x0F};  // block 2
  EXPECT_EQ(bytes, expected);
  const std::vector<float> y = Dequantize(GgufType::kQ4_0, bytes, 64);
  for (int j = 0; j < 16; ++j) EXPECT_EQ(y[j], j - 8);  // (code - 8) * 1
  EXPECT_EQ(y[16], 7.0f);
  EXPECT_EQ(y[17], 0.0f);
  EXPECT_EQ(y[18], 1.0f);
  EXPECT_EQ(y[20], -8.0f);
  for (int j = 32; j < 64; ++j) EXPECT_EQ(y[j], x[j]);  // exact: (code - 8) * -1
}

TEST(GgufQuants, Q4_1HandComputedBlock) {
  // min = -1 (x[0]), max = 14 (x[15]): d = 15 / 15 = 1, m = -1 (0xBC00);
  // codes min(15, (int)(x - min + 0.5)). x[j] = j - 1 gives j;
  // x[16 + j] = 13.5 - j gives 15 - j (the tie 14.5 - j rounds up), and
  // x[31] = -1 gives 0 = 15 - 15 too.
  std::vector<float> x(32);
  for (int j = 0; j < 16; ++j) {
    x[j] = j - 1;
    x[16 + j] = j < 15 ? 13.5f - j : -1.0f;
  }
  const std::vector<uint8_t> bytes = Quantize(GgufType::kQ4_1, x);
  std::vector<uint8_t> expected = {0x00, 0x3C, 0x00, 0xBC};
  for (int j = 0; j < 16; ++j) expected.push_back(static_cast<uint8_t>(j | ((15 - j) << 4)));
  EXPECT_EQ(bytes, expected);
  const std::vector<float> y = Dequantize(GgufType::kQ4_1, bytes, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], j - 1);        // code * 1 - 1
    EXPECT_EQ(y[16 + j], 14 - j);  // half a step above the input (but x[31])
  }
}

TEST(GgufQuants, Q5_0HandComputedBlock) {
  // x[j] = j - 16: the largest magnitude is -16, d = 1, codes (int)(x + 16.5)
  // = j. Low nibbles: qs[j] = j | (j + 16) << 4 = 0x00, 0x11, ..., 0xFF.
  // Bit 4 is set exactly for j >= 16: qh = 0xFFFF0000, little-endian.
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = j - 16;
  const std::vector<uint8_t> bytes = Quantize(GgufType::kQ5_0, x);
  std::vector<uint8_t> expected = {0x00, 0x3C, 0x00, 0x00, 0xFF, 0xFF};
  for (int j = 0; j < 16; ++j) expected.push_back(static_cast<uint8_t>(j * 0x11));
  EXPECT_EQ(bytes, expected);
  const std::vector<float> y = Dequantize(GgufType::kQ5_0, bytes, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], x[j]);
}

TEST(GgufQuants, Q5_1HandComputedBlock) {
  // x[j] = 31 - j: min 0, max 31, d = 31 / 31 = 1, m = 0; codes 31 - j.
  // For j < 16 the codes are 31 - j >= 16 (bit 4 set: qh = 0x0000FFFF), and
  // both nibbles of qs[j] are 15 - j.
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = 31 - j;
  const std::vector<uint8_t> bytes = Quantize(GgufType::kQ5_1, x);
  std::vector<uint8_t> expected = {0x00, 0x3C, 0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00};
  for (int j = 0; j < 16; ++j) expected.push_back(static_cast<uint8_t>((15 - j) * 0x11));
  EXPECT_EQ(bytes, expected);
  const std::vector<float> y = Dequantize(GgufType::kQ5_1, bytes, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], x[j]);
}

// ---------------------------------------------------------------------------
// k-quants: hand-built bytes decoded (the layout, independent of the
// quantizer), then properties of quantized blocks checked by hand.
// ---------------------------------------------------------------------------

// Q4_K/Q5_K's 12 scale bytes used below, and the (scale, min) pairs they hold
// as get_scale_min_k4 unpacks them: sub-blocks 0-3 take the low 6 bits of
// bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take a nibble of bytes
// 8-11 plus the top 2 bits of bytes 0-3 (scales) or 4-7 (mins). E.g.
// sub-block 5: scale = (0x43 & 15) | (0x82 >> 6) << 4 = 3 + 32 = 35,
// min = (0x43 >> 4) | (0x46 >> 6) << 4 = 4 + 16 = 20.
constexpr uint8_t kK4Scales[12] = {0x41, 0x82, 0xC3, 0x04, 0x05, 0x46,
                                   0x87, 0xC8, 0x21, 0x43, 0x65, 0x87};
constexpr int kK4Sc[8] = {1, 2, 3, 4, 17, 35, 53, 7};
constexpr int kK4Min[8] = {5, 6, 7, 8, 2, 20, 38, 56};

TEST(GgufQuants, Q4_KDecodesHandBuiltBytes) {
  BlockQ4_K block;
  block.d = Half(1.0f);
  block.dmin = Half(0.5f);
  std::memcpy(block.scales, kK4Scales, 12);
  // qs[32c + l]: low nibble -> element 64c + l (sub-block 2c), high nibble ->
  // element 64c + 32 + l (sub-block 2c + 1).
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) block.qs[32 * c + l] = static_cast<uint8_t>((l % 16) | ((15 - l % 16) << 4));
  }
  for (bool reference : {false, true}) {
    const std::vector<float> y = Dequantize(GgufType::kQ4_K, BytesOf(block), 256, reference);
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < 32; ++l) {
        EXPECT_EQ(y[64 * c + l], kK4Sc[2 * c] * (l % 16) - 0.5f * kK4Min[2 * c]);
        EXPECT_EQ(y[64 * c + 32 + l], kK4Sc[2 * c + 1] * (15 - l % 16) - 0.5f * kK4Min[2 * c + 1]);
      }
    }
  }
}

TEST(GgufQuants, Q5_KDecodesHandBuiltBytes) {
  BlockQ5_K block;
  block.d = Half(1.0f);
  block.dmin = Half(0.5f);
  std::memcpy(block.scales, kK4Scales, 12);
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) block.qs[32 * c + l] = static_cast<uint8_t>((l % 16) | ((15 - l % 16) << 4));
  }
  // Bit 4 of element 32j + l is bit j of qh[l].
  for (int l = 0; l < 32; ++l) block.qh[l] = static_cast<uint8_t>(l * 37 + 11);
  const std::vector<float> y = Dequantize(GgufType::kQ5_K, BytesOf(block), 256);
  for (int j = 0; j < 8; ++j) {
    for (int l = 0; l < 32; ++l) {
      const int low = j % 2 == 0 ? l % 16 : 15 - l % 16;
      const int q = low + 16 * ((block.qh[l] >> j) & 1);
      EXPECT_EQ(y[32 * j + l], kK4Sc[j] * q - 0.5f * kK4Min[j]) << j << " " << l;
    }
  }
  EXPECT_EQ(Dequantize(GgufType::kQ5_K, BytesOf(block), 256, true), y);
}

TEST(GgufQuants, Q6_KDecodesHandBuiltBytes) {
  // d = 0.25, scales s + 1 with alternating signs, every code 0 (q = -32)
  // except a few placed by hand:
  //   ql[0] = 0x5A, qh[0] = 0b11'10'01'00: element 0 = 0xA | 0 << 4 = 10,
  //     element 64 = 0x5 | 2 << 4 = 37 (ql[0]'s high nibble, qh bits 4-5),
  //   ql[32] = 0x3C: element 32 = 0xC | 1 << 4 = 28 (qh bits 2-3),
  //     element 96 = 0x3 | 3 << 4 = 51 (qh bits 6-7),
  //   ql[64] = 0x01, qh[32] = 0x03: element 128 = 1 | 3 << 4 = 49.
  BlockQ6_K block;
  std::memset(&block, 0, sizeof(block));
  block.d = Half(0.25f);
  for (int s = 0; s < 16; ++s) block.scales[s] = static_cast<int8_t>(s % 2 == 0 ? s + 1 : -(s + 1));
  block.ql[0] = 0x5A;
  block.qh[0] = 0xE4;
  block.ql[32] = 0x3C;
  block.ql[64] = 0x01;
  block.qh[32] = 0x03;
  std::vector<float> want(256);
  for (int e = 0; e < 256; ++e) want[e] = 0.25f * block.scales[e / 16] * -32;
  want[0] = 0.25f * 1 * (10 - 32);     // -5.5
  want[32] = 0.25f * 3 * (28 - 32);    // scale 2: -3
  want[64] = 0.25f * 5 * (37 - 32);    // scale 4: 6.25
  want[96] = 0.25f * 7 * (51 - 32);    // scale 6: 33.25
  want[128] = 0.25f * 9 * (49 - 32);   // scale 8: 38.25
  EXPECT_EQ(want[0], -5.5f);
  EXPECT_EQ(want[96], 33.25f);
  for (bool reference : {false, true}) {
    EXPECT_EQ(Dequantize(GgufType::kQ6_K, BytesOf(block), 256, reference), want);
  }
}

TEST(GgufQuants, Q2_KDecodesHandBuiltBytes) {
  // scales[i]: low nibble the scale, high nibble the min of sub-block i;
  // element 128h + 32s + l is bits 2s of qs[32h + l], sub-block e / 16.
  BlockQ2_K block;
  block.d = Half(0.5f);
  block.dmin = Half(0.25f);
  for (int i = 0; i < 16; ++i) block.scales[i] = static_cast<uint8_t>(i | ((15 - i) << 4));
  for (int k = 0; k < 64; ++k) block.qs[k] = static_cast<uint8_t>(k * 0x1B + 7);
  const std::vector<float> y = Dequantize(GgufType::kQ2_K, BytesOf(block), 256);
  for (int h = 0; h < 2; ++h) {
    for (int s = 0; s < 4; ++s) {
      for (int l = 0; l < 32; ++l) {
        const int e = 128 * h + 32 * s + l;
        const int q = (block.qs[32 * h + l] >> (2 * s)) & 3;
        EXPECT_EQ(y[e], 0.5f * (e / 16) * q - 0.25f * (15 - e / 16)) << e;
      }
    }
  }
  EXPECT_EQ(Dequantize(GgufType::kQ2_K, BytesOf(block), 256, true), y);
}

TEST(GgufQuants, Q3_KDecodesHandBuiltBytes) {
  // Sixteen 6-bit scales S (the value used is S - 32), packed by hand:
  // bytes 0-7 hold the low nibbles of S[i] (low) and S[i + 8] (high);
  // byte 8 + k holds the top 2 bits of S[k], S[k + 4], S[k + 8], S[k + 12].
  constexpr int S[16] = {0, 63, 32, 31, 1, 62, 16, 48, 5, 10, 20, 40, 33, 34, 35, 36};
  constexpr uint8_t kScales[12] = {0x50, 0xAF, 0x40, 0x8F, 0x11, 0x2E,
                                   0x30, 0x40, 0x80, 0x8F, 0x96, 0xAD};
  BlockQ3_K block;
  block.d = Half(0.5f);
  std::memcpy(block.scales, kScales, 12);
  for (int k = 0; k < 32; ++k) block.hmask[k] = static_cast<uint8_t>(k * 29 + 3);
  for (int k = 0; k < 64; ++k) block.qs[k] = static_cast<uint8_t>(k * 0x35 + 1);
  // Element e: 2 low bits as Q2_K's, the high bit is bit e / 32 of
  // hmask[e % 32]; a clear high bit subtracts 4.
  const std::vector<float> y = Dequantize(GgufType::kQ3_K, BytesOf(block), 256);
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128;
    const int s = (e % 128) / 32;
    const int l = e % 32;
    const int low = (block.qs[32 * h + l] >> (2 * s)) & 3;
    const bool high = (block.hmask[l] >> (e / 32)) & 1;
    EXPECT_EQ(y[e], 0.5f * (S[e / 16] - 32) * (low - (high ? 0 : 4))) << e;
  }
  EXPECT_EQ(Dequantize(GgufType::kQ3_K, BytesOf(block), 256, true), y);
}

// A super-block whose 8 sub-blocks of 32 are constants k_j / 64 (exact in
// every sum, so the search never sees rounding noise): each sub-block fits
// with min 0 and every code at nmax, its scale is c_j / nmax, and the 6-bit
// scales are 63 * k_j / 63 = k_j; the mins are all 0.
constexpr int kK4Consts[8] = {63, 1, 16, 17, 32, 47, 48, 62};

std::vector<float> K4ConstantBlock() {
  std::vector<float> x(256);
  for (int j = 0; j < 8; ++j) {
    for (int l = 0; l < 32; ++l) x[32 * j + l] = kK4Consts[j] / 64.0f;
  }
  return x;
}

// The scale bytes for (ls, lm) = (k_j, 0) by the packing rule: bytes 0-3 =
// ls[j] | (ls[j + 4] >> 4) << 6, bytes 4-7 = 0, bytes 8-11 = ls[j + 4] & 15:
// 63 | 2 << 6 = 0xBF, 1 | 2 << 6 = 0x81, 16 | 3 << 6 = 0xD0, 17 | 3 << 6 = 0xD1,
// then 32 & 15 = 0, 47 & 15 = 0xF, 48 & 15 = 0, 62 & 15 = 0xE.
constexpr uint8_t kK4ConstScales[12] = {0xBF, 0x81, 0xD0, 0xD1, 0, 0, 0, 0, 0x00, 0x0F, 0x00, 0x0E};

TEST(GgufQuants, Q4_KConstantSubBlocksPackTheirScalesByHand) {
  const std::vector<float> x = K4ConstantBlock();
  const std::vector<uint8_t> bytes = Quantize(GgufType::kQ4_K, x);
  const BlockQ4_K y = AsBlock<BlockQ4_K>(bytes);
  EXPECT_EQ(std::vector<uint8_t>(y.scales, y.scales + 12),
            std::vector<uint8_t>(kK4ConstScales, kK4ConstScales + 12));
  EXPECT_EQ(y.dmin, 0);
  // d = max scale / 63 = (63/64 / 15) / 63 = 1/960, rounded to float16.
  EXPECT_NEAR(FromHalf(y.d), 1.0f / 960, 1.0f / 960 * 0x1.0p-11f);
  for (uint8_t q : y.qs) EXPECT_EQ(q, 0xFF);  // every code 15
  const std::vector<float> back = Dequantize(GgufType::kQ4_K, bytes, 256);
  for (int e = 0; e < 256; ++e) EXPECT_NEAR(back[e], x[e], x[e] * 1e-3f) << e;
}

TEST(GgufQuants, Q5_KConstantSubBlocksPackTheirScalesByHand) {
  const std::vector<float> x = K4ConstantBlock();
  const std::vector<uint8_t> bytes = Quantize(GgufType::kQ5_K, x);
  const BlockQ5_K y = AsBlock<BlockQ5_K>(bytes);
  EXPECT_EQ(std::vector<uint8_t>(y.scales, y.scales + 12),
            std::vector<uint8_t>(kK4ConstScales, kK4ConstScales + 12));
  EXPECT_EQ(y.dmin, 0);
  EXPECT_NEAR(FromHalf(y.d), 1.0f / 1984, 1.0f / 1984 * 0x1.0p-11f);  // (63/64 / 31) / 63
  for (uint8_t q : y.qs) EXPECT_EQ(q, 0xFF);  // every code 31: low nibbles 15 ...
  for (uint8_t h : y.qh) EXPECT_EQ(h, 0xFF);  // ... and bit 4 everywhere
}

TEST(GgufQuants, Q6_KScalesOfPowerOfTwoSubBlocksByHand) {
  // Sub-block s constant v_s (powers of two: every sum exact). Each fits with
  // code -32 and scale -v_s / 32; the first of largest magnitude is
  // -1/64 (v = 0.5), so iscale = -128 / (-1/64) = 8192, d = 1/8192 (0x0800)
  // and the int8 scales are -256 v_s, clamped to 127 (v = -0.5 gives 128).
  const float v[16] = {0.5f,  0.25f, -0.125f, 0.0625f, -0.5f,  0.0f,  1.0f / 128, -1.0f / 128,
                       0.5f,  0.5f,  0.25f,   0.25f,   -0.25f, -0.25f, 1.0f / 32, -1.0f / 32};
  const int8_t want_scales[16] = {-128, -64, 32, -16, 127, 0, -2, 2, -128, -128, -64, -64, 64, 64, -8, 8};
  std::vector<float> x(256);
  for (int e = 0; e < 256; ++e) x[e] = v[e / 16];
  const std::vector<uint8_t> bytes = Quantize(GgufType::kQ6_K, x);
  const BlockQ6_K y = AsBlock<BlockQ6_K>(bytes);
  EXPECT_EQ(y.d, 0x0800);
  EXPECT_EQ(std::vector<int8_t>(y.scales, y.scales + 16),
            std::vector<int8_t>(want_scales, want_scales + 16));
  for (uint8_t q : y.ql) EXPECT_EQ(q, 0);  // every code 0, i.e. -32
  for (uint8_t q : y.qh) EXPECT_EQ(q, 0);
  const std::vector<float> back = Dequantize(GgufType::kQ6_K, bytes, 256);
  for (int e = 0; e < 256; ++e) {
    // Exact, but for the clamped scale: 127 * -32 / 8192 = -0.49609375.
    EXPECT_EQ(back[e], e / 16 == 4 ? -0.49609375f : v[e / 16]) << e;
  }
}

TEST(GgufQuants, Q2_KAndQ3_KConstantBlocksByHand) {
  const std::vector<float> x(256, 0.5f);
  // Q2_K: every sub-block's fit is codes 3 with min 0 and scale 0.5 / 3, the
  // 4-bit scales 15, the mins 0; d = (0.5 / 3) / 15 in float16.
  const std::vector<uint8_t> q2 = Quantize(GgufType::kQ2_K, x);
  const BlockQ2_K y2 = AsBlock<BlockQ2_K>(q2);
  for (uint8_t s : y2.scales) EXPECT_EQ(s, 0x0F);
  for (uint8_t q : y2.qs) EXPECT_EQ(q, 0xFF);
  EXPECT_EQ(y2.dmin, 0);
  EXPECT_NEAR(FromHalf(y2.d), 0.5f / 45, 0.5f / 45 * 0x1.0p-11f);
  // Q3_K: make_q3_quants gives code -4 and scale -1/8 everywhere; the 6-bit
  // scales are -32 (stored 0), d = 1/256 (0x1C00), every stored code 0 with
  // its high bit clear (-4): all bytes zero but d. -1/8 * -4 = 0.5 exactly.
  const std::vector<uint8_t> q3 = Quantize(GgufType::kQ3_K, x);
  std::vector<uint8_t> expected(110, 0);
  expected[108] = 0x00;
  expected[109] = 0x1C;
  EXPECT_EQ(q3, expected);
  for (float v : Dequantize(GgufType::kQ3_K, q3, 256)) EXPECT_EQ(v, 0.5f);
}

// ---------------------------------------------------------------------------
// The fast path against the reference, byte for byte.
// ---------------------------------------------------------------------------

// Rows that reach every branch: Gaussian, heavy-tailed, sparse, one-signed,
// outliers, constant, lattice values (ties), signed zeros, zero sub-blocks,
// mixed scales, tiny and huge.
std::vector<std::vector<float>> TrickyRows(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<std::vector<float>> rows;
  for (int kind = 0; kind < 16; ++kind) {
    std::vector<float> x(n);
    for (int64_t j = 0; j < n; ++j) {
      float v = normal(rng);
      switch (kind) {
        case 1: v = v / std::max(0.05f, std::fabs(normal(rng))); break;
        case 2: v = uniform(rng) < 0.7f ? 0.0f : v; break;
        case 3: v = std::fabs(v); break;
        case 4: v = -std::fabs(v); break;
        case 5: v = j % 97 == 5 ? 60.0f * v : v; break;
        case 6: v = 0.3f; break;
        case 7: v = std::round(v * 4) / 4; break;
        case 8: v = uniform(rng) < 0.5f ? -0.0f : 0.0f; break;
        case 9: v = (j / 16) % 3 == 0 ? 0.0f : v; break;
        case 10: v = (j / 32) % 2 ? v * 1e-3f : v; break;
        case 11: v *= 1e-6f; break;
        case 12: v *= 3000.0f; break;
        case 13: v = std::round(v * 8); break;
        // The largest magnitude twice with both signs: +2 before -2, or after.
        case 14: v = j % 32 == 3 ? 2.0f : (j % 32 == 9 ? -2.0f : 0.1f * v); break;
        case 15: v = j % 32 == 3 ? -2.0f : (j % 32 == 9 ? 2.0f : 0.1f * v); break;
        default: break;
      }
      x[j] = v;
    }
    rows.push_back(std::move(x));
  }
  return rows;
}

std::vector<std::vector<float>> ImportanceVectors(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<std::vector<float>> out(3, std::vector<float>(n));
  for (int64_t j = 0; j < n; ++j) {
    out[0][j] = uniform(rng);                                     // mild
    out[1][j] = std::exp(3.0f * normal(rng));                     // skewed
    out[2][j] = uniform(rng) < 0.2f ? 0.0f : 100 * uniform(rng);  // some zero
  }
  return out;
}

TEST(GgufQuants, FastPathEqualsReferenceByteForByte) {
  // 768 = 3 super-blocks, 24 blocks: neither a multiple of the 8 or 4 lanes
  // of the k-quant searches, nor of the 64-block batches of the legacy types.
  constexpr int64_t kN = 768;
  const std::vector<std::vector<float>> rows = TrickyRows(kN, 7);
  const std::vector<std::vector<float>> importance = ImportanceVectors(kN, 8);
  for (const GgufQuantizer& q : GgufQuantizers()) {
    SCOPED_TRACE(Name(q.type));
    for (size_t r = 0; r < rows.size(); ++r) {
      for (int w = -1; w < static_cast<int>(importance.size()); ++w) {
        if (w >= 0 && !q.uses_importance) continue;
        SCOPED_TRACE(absl::StrCat("row kind ", r, ", importance ", w));
        const float* imp = w >= 0 ? importance[w].data() : nullptr;
        const std::vector<uint8_t> fast = Quantize(q.type, rows[r], imp);
        const std::vector<uint8_t> ref = Quantize(q.type, rows[r], imp, /*reference=*/true);
        ASSERT_EQ(fast, ref);
        const std::vector<float> a = Dequantize(q.type, fast, kN);
        const std::vector<float> b = Dequantize(q.type, fast, kN, /*reference=*/true);
        for (int64_t j = 0; j < kN; ++j) ASSERT_EQ(Bits(a[j]), Bits(b[j])) << j;
      }
    }
  }
}

// QuantizeGgufTensor checks a row's float16 values for overflow only when
// its largest |x| is above 256: below that, no type may produce one.
TEST(GgufQuants, RowsUpTo256NeverOverflowFloat16) {
  constexpr int64_t kN = 768;
  const std::vector<std::vector<float>> importance = ImportanceVectors(kN, 8);
  for (const GgufQuantizer& q : GgufQuantizers()) {
    SCOPED_TRACE(Name(q.type));
    for (std::vector<float> row : TrickyRows(kN, 9)) {
      float amax = 0.0f;
      for (float v : row) amax = std::max(amax, std::fabs(v));
      if (amax == 0.0f) continue;
      for (float& v : row) v *= 256.0f / amax;
      for (int w = -1; w < static_cast<int>(importance.size()); ++w) {
        if (w >= 0 && !q.uses_importance) continue;
        const std::vector<float> y =
            Dequantize(q.type, Quantize(q.type, row, w >= 0 ? importance[w].data() : nullptr), kN);
        for (int64_t j = 0; j < kN; ++j) ASSERT_TRUE(std::isfinite(y[j])) << j;
      }
    }
  }
}

TEST(GgufQuants, FastDequantizerEqualsReferenceOnRandomBytes) {
  std::mt19937 rng(11);
  for (const GgufQuantizer& q : GgufQuantizers()) {
    SCOPED_TRACE(Name(q.type));
    const int64_t n = 512;
    for (int rep = 0; rep < 20; ++rep) {
      std::vector<uint8_t> bytes(RowBytes(q.type, n));
      for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng());
      const std::vector<float> a = Dequantize(q.type, bytes, n);
      const std::vector<float> b = Dequantize(q.type, bytes, n, true);
      for (int64_t j = 0; j < n; ++j) ASSERT_TRUE(SameFloat(a[j], b[j])) << j;
    }
  }
}

TEST(GgufQuants, TensorFunctionsEqualTheReferenceForEveryDtype) {
  at::manual_seed(3);
  const at::Tensor w = at::randn({9, 512}) * 0.05;
  const at::Tensor importance = at::rand({512}) * 2;
  for (GgufType type : {GgufType::kQ4_K, GgufType::kQ6_K, GgufType::kQ4_0, GgufType::kF16}) {
    for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
      SCOPED_TRACE(absl::StrCat(Name(type), " from ", c10::toString(dtype)));
      const at::Tensor x = w.to(dtype);
      absl::StatusOr<std::string> fast = QuantizeGgufTensor(x, type, importance, "w");
      absl::StatusOr<std::string> ref = QuantizeGgufTensorReference(x, type, importance, "w");
      ASSERT_TRUE(fast.ok()) << fast.status();
      ASSERT_TRUE(ref.ok()) << ref.status();
      EXPECT_EQ(*fast, *ref);
      EXPECT_EQ(static_cast<int64_t>(fast->size()), 9 * RowBytes(type, 512));
      absl::StatusOr<at::Tensor> a = DequantizeGgufTensor(*fast, type, {9, 512}, "w");
      absl::StatusOr<at::Tensor> b = DequantizeGgufTensorReference(*fast, type, {9, 512}, "w");
      ASSERT_TRUE(a.ok() && b.ok());
      EXPECT_TRUE(a->equal(*b));
      EXPECT_EQ(a->scalar_type(), at::kFloat);
      EXPECT_EQ(a->sizes(), x.sizes());
    }
  }
}

// ---------------------------------------------------------------------------
// Error.
// ---------------------------------------------------------------------------

double RelativeRmsError(GgufType type, const std::vector<float>& x) {
  const std::vector<float> y = Dequantize(type, Quantize(type, x), x.size());
  double err = 0.0;
  double ref = 0.0;
  for (size_t j = 0; j < x.size(); ++j) {
    err += (double{x[j]} - y[j]) * (double{x[j]} - y[j]);
    ref += double{x[j]} * x[j];
  }
  return std::sqrt(err / ref);
}

TEST(GgufQuants, ErrorOnGaussianRowsIsOrderedByBits) {
  std::mt19937 rng(5);
  const std::vector<float> x = Gaussian(rng, 64 * 1024, 0.02f);
  std::map<GgufType, double> e;
  for (GgufType type : kQuantizedTypes) e[type] = RelativeRmsError(type, x);
  for (const auto& [type, err] : e) std::printf("  %s relative RMS error %.5f\n", Name(type).c_str(), err);
  // llama.cpp's figures for Gaussian data (about 0.005, 0.018, 0.036 ...).
  EXPECT_LT(e[GgufType::kQ8_0], 0.007);
  EXPECT_LT(e[GgufType::kQ8_0], e[GgufType::kQ6_K]);
  EXPECT_LT(e[GgufType::kQ6_K], 0.025);
  EXPECT_LT(e[GgufType::kQ6_K], std::min(e[GgufType::kQ5_K], e[GgufType::kQ5_1]));
  EXPECT_NEAR(e[GgufType::kQ5_K], e[GgufType::kQ5_1], 0.25 * e[GgufType::kQ5_1]);
  EXPECT_LT(std::max(e[GgufType::kQ5_K], e[GgufType::kQ5_1]), e[GgufType::kQ5_0]);
  EXPECT_LT(e[GgufType::kQ5_0], e[GgufType::kQ4_K]);
  EXPECT_LT(e[GgufType::kQ4_K], std::min(e[GgufType::kQ4_1], e[GgufType::kQ4_0]));
  EXPECT_LT(std::max(e[GgufType::kQ4_1], e[GgufType::kQ4_0]), e[GgufType::kQ3_K]);
  EXPECT_LT(e[GgufType::kQ3_K], e[GgufType::kQ2_K]);
  EXPECT_LT(e[GgufType::kQ2_K], 0.35);
}

TEST(GgufQuants, LegacyErrorIsBoundedByTheStoredScale) {
  // Per element, against the float16 d the block stores: round to nearest
  // (Q8_0) or half up (the others) costs at most d/2; the codes were computed
  // with the unrounded d, within 2^-11 (relative) of the stored one, so each
  // code c adds up to |c| d 2^-11 (c <= 127, 8, 16, 15, 31), plus a little
  // for the two d's differing. Q4_0/Q5_0 clamp the far extreme: up to a whole
  // d there.
  std::mt19937 rng(9);
  const std::vector<float> x = Gaussian(rng, 32 * 256, 1.0f);
  struct Case {
    GgufType type;
    double steps;  // |error| / |d| allowed
  };
  for (const Case& c : {Case{GgufType::kQ8_0, 0.5 + 129 * 0x1.0p-11},
                        Case{GgufType::kQ4_0, 1.0 + 10 * 0x1.0p-11},
                        Case{GgufType::kQ5_0, 1.0 + 18 * 0x1.0p-11},
                        Case{GgufType::kQ4_1, 0.5 + 17 * 0x1.0p-11},
                        Case{GgufType::kQ5_1, 0.5 + 33 * 0x1.0p-11}}) {
    SCOPED_TRACE(Name(c.type));
    const std::vector<uint8_t> bytes = Quantize(c.type, x);
    const std::vector<float> y = Dequantize(c.type, bytes, x.size());
    const int64_t block_bytes = Quantizer(c.type).block_bytes;
    for (size_t j = 0; j < x.size(); ++j) {
      GgufHalf d_bits;
      std::memcpy(&d_bits, bytes.data() + (j / 32) * block_bytes, sizeof(d_bits));
      const double d = std::fabs(FromHalf(d_bits));
      double bound = c.steps * d;
      if (c.type == GgufType::kQ4_1 || c.type == GgufType::kQ5_1) {
        GgufHalf m_bits;  // the min is stored in float16 too
        std::memcpy(&m_bits, bytes.data() + (j / 32) * block_bytes + 2, sizeof(m_bits));
        bound += std::fabs(FromHalf(m_bits)) * 0x1.0p-11;
      }
      ASSERT_LE(std::fabs(double{x[j]} - y[j]), bound + 1e-7) << j;
    }
  }
}

TEST(GgufQuants, ZeroRowsStayZero) {
  const std::vector<float> zeros(512, 0.0f);
  for (const GgufQuantizer& q : GgufQuantizers()) {
    SCOPED_TRACE(Name(q.type));
    for (const float* imp : {static_cast<const float*>(nullptr), zeros.data()}) {
      const std::vector<float> y = Dequantize(q.type, Quantize(q.type, zeros, imp), 512);
      for (float v : y) ASSERT_EQ(v, 0.0f);
    }
  }
}

TEST(GgufQuants, AnOutlierStaysInItsBlock) {
  // Without importance, every block (or super-block) is quantized on its
  // own: moving one value changes only the block that holds it, and the
  // outlier itself comes back within a few percent.
  std::mt19937 rng(21);
  const std::vector<float> x = Gaussian(rng, 1024, 0.01f);
  std::vector<float> spiked = x;
  spiked[300] = 5.0f;
  for (GgufType type : kQuantizedTypes) {
    SCOPED_TRACE(Name(type));
    const GgufQuantizer& q = Quantizer(type);
    const std::vector<uint8_t> a = Quantize(type, x);
    const std::vector<uint8_t> b = Quantize(type, spiked);
    const int64_t spiked_block = 300 / q.block_elements;
    for (int64_t block = 0; block < 1024 / q.block_elements; ++block) {
      const bool same = std::equal(a.begin() + block * q.block_bytes,
                                   a.begin() + (block + 1) * q.block_bytes,
                                   b.begin() + block * q.block_bytes);
      EXPECT_EQ(same, block != spiked_block) << block;
    }
    const std::vector<float> y = Dequantize(type, b, 1024);
    EXPECT_NEAR(y[300], 5.0f, 5.0f * 0.03f);
    for (float v : y) ASSERT_TRUE(std::isfinite(v));
  }
}

// ---------------------------------------------------------------------------
// Importance weights.
// ---------------------------------------------------------------------------

TEST(GgufQuants, ImportanceLowersTheWeightedError) {
  // Every 8th column matters 100 times more than the others (an imatrix from
  // activations with a few large channels). The searches that read the
  // weights trade error on the cheap columns for error on the costly ones.
  constexpr int64_t kN = 1024;
  constexpr int kRows = 24;
  std::mt19937 rng(31);
  std::vector<float> importance(kN);
  for (int64_t j = 0; j < kN; ++j) importance[j] = j % 8 == 3 ? 100.0f : 1.0f;
  std::vector<std::vector<float>> rows;
  for (int r = 0; r < kRows; ++r) rows.push_back(Gaussian(rng, kN, 0.02f));
  for (const GgufQuantizer& q : GgufQuantizers()) {
    if (!q.uses_importance) continue;
    SCOPED_TRACE(Name(q.type));
    double with = 0.0;
    double without = 0.0;
    for (const std::vector<float>& x : rows) {
      const std::vector<float> a = Dequantize(q.type, Quantize(q.type, x, importance.data()), kN);
      const std::vector<float> b = Dequantize(q.type, Quantize(q.type, x), kN);
      for (int64_t j = 0; j < kN; ++j) {
        with += importance[j] * (double{x[j]} - a[j]) * (double{x[j]} - a[j]);
        without += importance[j] * (double{x[j]} - b[j]) * (double{x[j]} - b[j]);
      }
    }
    std::printf("  %s weighted error with importance / without: %.3f\n", Name(q.type).c_str(),
                with / without);
    EXPECT_LT(with, 0.9 * without);
  }
}

TEST(GgufQuants, Q8_0AndFloatTypesIgnoreImportance) {
  std::mt19937 rng(41);
  const std::vector<float> x = Gaussian(rng, 256);
  const std::vector<float> importance(256, 7.0f);
  for (GgufType type : {GgufType::kQ8_0, GgufType::kF16, GgufType::kBF16, GgufType::kF32}) {
    EXPECT_EQ(Quantize(type, x, importance.data()), Quantize(type, x)) << Name(type);
  }
}

// ---------------------------------------------------------------------------
// F16, BF16.
// ---------------------------------------------------------------------------

TEST(GgufQuants, F16RoundsToNearestEven) {
  struct Case {
    float x;
    uint16_t bits;
  };
  const Case cases[] = {
      {1.0f, 0x3C00},
      {1.0f + 0x1.0p-11f, 0x3C00},      // halfway to 1 + 2^-10: the even one
      {1.0f + 3 * 0x1.0p-11f, 0x3C02},  // halfway between 0x3C01 and 0x3C02
      {-2.5f, 0xC100},
      {65504.0f, 0x7BFF},
      {65519.0f, 0x7BFF},  // below the midpoint to Inf
      {0x1.0p-24f, 0x0001},  // the smallest subnormal
      {0x1.0p-25f, 0x0000},  // halfway to it: even (zero)
      {3 * 0x1.0p-25f, 0x0002},
      {-0.0f, 0x8000},
  };
  std::vector<float> x;
  for (const Case& c : cases) x.push_back(c.x);
  for (bool reference : {false, true}) {
    const std::vector<uint8_t> bytes = Quantize(GgufType::kF16, x, nullptr, reference);
    for (size_t i = 0; i < x.size(); ++i) {
      EXPECT_EQ(bytes[2 * i] | (bytes[2 * i + 1] << 8), cases[i].bits) << x[i];
    }
  }
}

TEST(GgufQuants, Bf16RoundsToNearestEven) {
  const std::vector<float> x = {1.0f, 1.0f + 0x1.0p-8f, 1.0f + 3 * 0x1.0p-8f, -3.0f, 0x1.0p-130f};
  const std::vector<uint16_t> want = {0x3F80, 0x3F80, 0x3F82, 0xC040, 0x0008};  // subnormals kept
  for (bool reference : {false, true}) {
    const std::vector<uint8_t> bytes = Quantize(GgufType::kBF16, x, nullptr, reference);
    for (size_t i = 0; i < x.size(); ++i) {
      EXPECT_EQ(bytes[2 * i] | (bytes[2 * i + 1] << 8), want[i]) << x[i];
    }
  }
}

TEST(GgufQuants, HalfAndBf16WeightsRoundTripExactly) {
  // Every finite float16 / bfloat16 value: the stored bits are the input's.
  for (at::ScalarType dtype : {at::kHalf, at::kBFloat16}) {
    const GgufType type = dtype == at::kHalf ? GgufType::kF16 : GgufType::kBF16;
    SCOPED_TRACE(Name(type));
    at::Tensor bits = at::arange(0, 65536, at::kInt).to(at::kShort);
    at::Tensor values = bits.view(dtype);
    const at::Tensor finite = at::isfinite(values);
    values = values.masked_select(finite).reshape({-1, 2});  // an even count: pairs
    const int64_t count = values.numel();
    absl::StatusOr<std::string> bytes = QuantizeGgufTensor(values, type, at::Tensor(), "w");
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    ASSERT_EQ(static_cast<int64_t>(bytes->size()), 2 * count);
    EXPECT_EQ(std::memcmp(bytes->data(), values.contiguous().data_ptr(), bytes->size()), 0);
    absl::StatusOr<at::Tensor> back = DequantizeGgufTensor(*bytes, type, {count / 2, 2}, "w");
    ASSERT_TRUE(back.ok());
    EXPECT_TRUE(back->equal(values.to(at::kFloat)));
  }
}

// ---------------------------------------------------------------------------
// Bad inputs.
// ---------------------------------------------------------------------------

TEST(GgufQuants, BadInputsAreNamed) {
  const at::Tensor good = at::randn({2, 256});
  using Fn = absl::StatusOr<std::string> (*)(const at::Tensor&, GgufType, const at::Tensor&,
                                             absl::string_view);
  for (Fn quantize : {&QuantizeGgufTensor, &QuantizeGgufTensorReference}) {
    ExpectInvalidArgument(quantize(at::randn({2, 100}), GgufType::kQ4_K, at::Tensor(),
                                   "blk.0.attn_q.weight")
                              .status(),
                          {"blk.0.attn_q.weight", "[2, 100]", "Q4_K", "multiple of the block"});
    at::Tensor nan = good.clone();
    nan[1][7] = std::numeric_limits<float>::quiet_NaN();
    ExpectInvalidArgument(quantize(nan, GgufType::kQ8_0, at::Tensor(), "w").status(),
                          {"'w'", "Q8_0", "row 1", "NaN"});
    at::Tensor inf = good.clone();
    inf[0][3] = std::numeric_limits<float>::infinity();
    ExpectInvalidArgument(quantize(inf, GgufType::kF16, at::Tensor(), "w").status(),
                          {"'w'", "row 0", "Inf"});
    ExpectInvalidArgument(
        quantize(good.to(at::kInt), GgufType::kQ8_0, at::Tensor(), "w").status(),
        {"'w'", "F32, F16 or BF16", "Int"});
    ExpectInvalidArgument(quantize(at::randn({}), GgufType::kF32, at::Tensor(), "w").status(),
                          {"'w'", "at least one dimension"});
    ExpectInvalidArgument(quantize(at::randn({0, 32}), GgufType::kQ8_0, at::Tensor(), "w").status(),
                          {"'w'", "[0, 32]", "dimension 0 is 0"});
    ExpectInvalidArgument(
        quantize(good, static_cast<GgufType>(99), at::Tensor(), "w").status(),
        {"'w'", "type id 99"});
    // Importance: wrong length, negative, NaN.
    ExpectInvalidArgument(quantize(good, GgufType::kQ4_K, at::ones({255}), "w").status(),
                          {"'w'", "Q4_K", "importance"});
    at::Tensor negative = at::ones({256});
    negative[5] = -1.0;
    ExpectInvalidArgument(quantize(good, GgufType::kQ4_K, negative, "w").status(),
                          {"'w'", "importance[5]"});
    at::Tensor nan_weight = at::ones({256});
    nan_weight[9] = std::numeric_limits<float>::quiet_NaN();
    ExpectInvalidArgument(quantize(good, GgufType::kQ6_K, nan_weight, "w").status(),
                          {"'w'", "importance[9]"});
    // Results that overflow float16: an F16 value past 65504, a Q8_0 scale
    // past it (d = 1e7 / 127).
    ExpectInvalidArgument(quantize(at::full({1, 32}, 70000.0), GgufType::kF16, at::Tensor(), "w")
                              .status(),
                          {"'w'", "F16", "row 0", "overflow"});
    ExpectInvalidArgument(quantize(at::full({1, 32}, 1e7), GgufType::kQ8_0, at::Tensor(), "w")
                              .status(),
                          {"'w'", "Q8_0", "overflow"});
  }
  using DequantizeFn = absl::StatusOr<at::Tensor> (*)(absl::string_view, GgufType,
                                                      const std::vector<int64_t>&,
                                                      absl::string_view);
  for (DequantizeFn dequantize : {&DequantizeGgufTensor, &DequantizeGgufTensorReference}) {
    const std::string bytes(2 * 144, '\0');
    ExpectInvalidArgument(dequantize(bytes.substr(1), GgufType::kQ4_K, {2, 256}, "t").status(),
                          {"'t'", "[2, 256]", "Q4_K", "287 bytes, expected 288"});
    ExpectInvalidArgument(dequantize(bytes, GgufType::kQ4_K, {2, 100}, "t").status(),
                          {"'t'", "multiple of the block"});
    ExpectInvalidArgument(dequantize(bytes, static_cast<GgufType>(42), {2, 256}, "t").status(),
                          {"'t'", "type id 42"});
    EXPECT_TRUE(dequantize(bytes, GgufType::kQ4_K, {2, 256}, "t").ok());
  }
}

}  // namespace
}  // namespace compress::engine
