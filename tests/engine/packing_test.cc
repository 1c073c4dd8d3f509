// Packing: the format table, the bit-stream layout on known values, fast
// against reference, and exact round trips for every bit width.
#include "worker/engine/quant/packing.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>

#include "tests/engine/test_util.h"
#include "worker/engine/quant/rtn.h"

namespace compress::engine {
namespace {

using testing::ExpectInvalidArgument;

uint32_t Word(const at::Tensor& packed, int64_t row, int64_t column) {
  const int32_t value = packed[row][column].item<int32_t>();
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  return word;
}

at::Tensor RandomCodes(int64_t n, int64_t m, int bits, uint64_t seed) {
  at::manual_seed(seed);
  return at::randint(0, 1 << bits, {n, m}, at::kByte);
}

TEST(Packing, FormatTableHasOneRowPerBitWidth) {
  for (int bits = 2; bits <= 8; ++bits) {
    SCOPED_TRACE(bits);
    const PackedFormat* format = FindPackedFormat(bits);
    ASSERT_NE(format, nullptr);
    EXPECT_EQ(format->bits, bits);
    EXPECT_EQ(format->block_codes, 32);
    EXPECT_EQ(format->block_bytes, 4 * bits) << "32 codes fill exactly `bits` words";
    const bool gptq = bits == 2 || bits == 3 || bits == 4 || bits == 8;
    EXPECT_STREQ(format->quant_method, gptq ? "gptq" : "compress_rtn");
    EXPECT_EQ(format->zero_offset, gptq ? 1 : 0);
  }
  EXPECT_EQ(FindPackedFormat(1), nullptr);
  EXPECT_EQ(FindPackedFormat(9), nullptr);
}

TEST(Packing, LayoutIsALittleEndianBitStreamAlongTheInputDimension) {
  // 4 bits: codes 0..7 of one column fill one word, low nibble first (GPTQ).
  at::Tensor four = at::arange(8, at::kByte).view({8, 1});
  EXPECT_EQ(Word(PackBitStream(four, 4), 0, 0), 0x76543210u);
  // 2 bits: sixteen codes per word.
  at::Tensor two =
      at::tensor({1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 3}, at::kByte).view({16, 1});
  EXPECT_EQ(Word(PackBitStream(two, 2), 0, 0), 0xF9393939u);
  // 8 bits: four bytes per word, and columns stay separate.
  at::Tensor eight =
      at::tensor({0x11, 0xA1, 0x22, 0xA2, 0x33, 0xA3, 0xFF, 0xA4}, at::kByte).view({4, 2});
  at::Tensor packed8 = PackBitStream(eight, 8);
  EXPECT_EQ(Word(packed8, 0, 0), 0xFF332211u);
  EXPECT_EQ(Word(packed8, 0, 1), 0xA4A3A2A1u);
  // 3 bits: code 10 straddles words 0 and 1 (bits 30, 31 and then bit 0).
  at::Tensor three = at::zeros({32, 1}, at::kByte);
  three[10][0] = 0b101;
  three[11][0] = 0b111;
  at::Tensor packed3 = PackBitStream(three, 3);
  ASSERT_EQ(packed3.size(0), 3);
  EXPECT_EQ(Word(packed3, 0, 0), 0b01u << 30);
  EXPECT_EQ(Word(packed3, 1, 0), 0b1u | (0b111u << 1));
  // 5 bits, 7 codes: 35 bits, two words, the tail zero.
  at::Tensor five = at::full({7, 1}, 31, at::kByte);
  at::Tensor packed5 = PackBitStream(five, 5);
  ASSERT_EQ(packed5.size(0), PackedRows(7, 5));
  EXPECT_EQ(Word(packed5, 0, 0), 0xFFFFFFFFu);
  EXPECT_EQ(Word(packed5, 1, 0), 0x7u);
}

TEST(Packing, FastEqualsReferenceAndRoundTripsForEveryWidth) {
  for (int bits = 2; bits <= 8; ++bits) {
    for (int64_t n : {1, 31, 32, 33, 100, 256}) {
      SCOPED_TRACE(::testing::PrintToString(bits) + " bits, n=" + ::testing::PrintToString(n));
      const at::Tensor codes = RandomCodes(n, 5, bits, static_cast<uint64_t>(bits * 1000 + n));
      const at::Tensor packed = PackBitStream(codes, bits);
      ASSERT_EQ(packed.scalar_type(), at::kInt);
      ASSERT_EQ(packed.sizes(), (std::vector<int64_t>{PackedRows(n, bits), 5}));
      EXPECT_TRUE(packed.equal(PackBitStreamReference(codes, bits)));
      EXPECT_TRUE(UnpackBitStream(packed, bits, n).equal(codes));
      EXPECT_TRUE(UnpackBitStreamReference(packed, bits, n).equal(codes));
    }
  }
  // All-ones codes exercise the sign bit of every int32 word.
  for (int bits = 2; bits <= 8; ++bits) {
    const at::Tensor codes = at::full({64, 3}, (1 << bits) - 1, at::kByte);
    EXPECT_TRUE(UnpackBitStream(PackBitStream(codes, bits), bits, 64).equal(codes)) << bits;
  }
}

TEST(Packing, LinearLayerRoundTripsExactlyWithGptqShapes) {
  at::manual_seed(5);
  const at::Tensor w = at::randn({48, 128});
  for (int bits = 2; bits <= 8; ++bits) {
    for (bool symmetric : {false, true}) {
      for (int64_t group_size : {0, 32}) {
        SCOPED_TRACE(::testing::PrintToString(bits) + (symmetric ? " sym g" : " asym g") +
                     ::testing::PrintToString(group_size));
        absl::StatusOr<QuantizedTensor> q = QuantizeRtn(w, {bits, symmetric, group_size}, "l");
        ASSERT_TRUE(q.ok());
        absl::StatusOr<PackedLinear> packed = PackLinear(*q, "l");
        ASSERT_TRUE(packed.ok()) << packed.status();
        const int64_t groups = group_size > 0 ? 128 / group_size : 1;
        EXPECT_EQ(packed->qweight.sizes(), (std::vector<int64_t>{128 * bits / 32, 48}));
        EXPECT_EQ(packed->qzeros.sizes(), (std::vector<int64_t>{groups, PackedRows(48, bits)}));
        EXPECT_EQ(packed->scales.sizes(), (std::vector<int64_t>{groups, 48}));
        EXPECT_EQ(packed->scales.scalar_type(), at::kHalf);
        EXPECT_EQ(packed->g_idx.sizes(), (std::vector<int64_t>{128}));
        EXPECT_EQ(packed->g_idx[127].item<int>(), groups - 1);
        EXPECT_EQ(packed->qweight.nbytes() + packed->qzeros.nbytes() + packed->scales.nbytes() +
                      packed->g_idx.nbytes(),
                  PackedLinearBytes(48, 128, bits, q->group_size));
        // The packed codes are the transposed codes, stream-packed.
        EXPECT_TRUE(packed->qweight.equal(PackBitStreamReference(q->codes.t(), bits)));

        absl::StatusOr<QuantizedTensor> unpacked = UnpackLinear(*packed, bits, "l");
        ASSERT_TRUE(unpacked.ok()) << unpacked.status();
        EXPECT_EQ(unpacked->group_size, q->group_size);
        EXPECT_TRUE(unpacked->codes.equal(q->codes));
        EXPECT_TRUE(unpacked->zeros.equal(q->zeros));
        EXPECT_TRUE(unpacked->scales.equal(q->scales));
        EXPECT_TRUE(Dequantize(*unpacked, at::kHalf).equal(Dequantize(*q, at::kHalf)));
      }
    }
  }
}

TEST(Packing, GptqZeroPointsAreStoredMinusOne) {
  // 4-bit symmetric: zero 8 is stored as 7 in every nibble (GPTQ v1).
  absl::StatusOr<QuantizedTensor> q = QuantizeRtn(at::randn({16, 64}), {4, true, 32}, "l");
  ASSERT_TRUE(q.ok());
  absl::StatusOr<PackedLinear> packed = PackLinear(*q, "l");
  ASSERT_TRUE(packed.ok());
  EXPECT_EQ(Word(packed->qzeros, 0, 0), 0x77777777u);
  EXPECT_EQ(Word(packed->qzeros, 1, 1), 0x77777777u);
  // 3-bit (GPTQ v1 too, codes straddling words): zero 4 stored as 3.
  q = QuantizeRtn(at::randn({32, 64}), {3, true, 0}, "l");
  packed = PackLinear(*q, "l");
  ASSERT_TRUE(packed.ok());
  EXPECT_TRUE(
      UnpackBitStreamReference(packed->qzeros.t().contiguous(), 3, 32).eq(3).all().item<bool>());
  // 5-bit (bit stream, offset 0): zero 16 stored as is.
  q = QuantizeRtn(at::randn({32, 64}), {5, true, 0}, "l");
  packed = PackLinear(*q, "l");
  ASSERT_TRUE(packed.ok());
  EXPECT_TRUE(
      UnpackBitStreamReference(packed->qzeros.t().contiguous(), 5, 32).eq(16).all().item<bool>());
  // An asymmetric zero of 0 survives the v1 offset (stored as 2^b - 1).
  q = QuantizeRtn(at::rand({8, 32}) + 0.1, {4, false, 0}, "positive");
  ASSERT_TRUE(q.ok());
  ASSERT_TRUE(q->zeros.eq(0).all().item<bool>());
  packed = PackLinear(*q, "positive");
  ASSERT_TRUE(packed.ok());
  EXPECT_EQ(Word(packed->qzeros, 0, 0), 0xFFFFFFFFu);
  EXPECT_TRUE(UnpackLinear(*packed, 4, "positive")->zeros.eq(0).all().item<bool>());
}

TEST(Packing, UnpackRejectsInconsistentTensors) {
  absl::StatusOr<QuantizedTensor> q = QuantizeRtn(at::randn({16, 64}), {4, false, 32}, "l");
  ASSERT_TRUE(q.ok());
  PackedLinear packed = *PackLinear(*q, "l");
  PackedLinear bad = packed;
  bad.qweight = packed.qweight.narrow(0, 0, 4);
  ExpectInvalidArgument(UnpackLinear(bad, 4, "l").status(), {"'l'", "qweight"});
  bad = packed;
  bad.g_idx = packed.g_idx.flip(0).contiguous();
  ExpectInvalidArgument(UnpackLinear(bad, 4, "l").status(), {"'l'", "g_idx"});
  ExpectInvalidArgument(UnpackLinear(packed, 3, "l").status(), {"'l'", "qweight"});
  ExpectInvalidArgument(UnpackLinear(packed, 9, "l").status(), {"'l'", "9 bits"});
}

}  // namespace
}  // namespace compress::engine
