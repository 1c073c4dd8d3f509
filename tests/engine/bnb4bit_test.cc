// bitsandbytes 4-bit: the tables against the bitsandbytes source, nearest-code
// quantization by brute force, the error bound, fast against reference, double
// quantization, the serialized layout on hand-worked values, round trips
// through a safetensors file declared before quantizing, and bad inputs.
#include "worker/engine/quant/bnb4bit.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/engine/test_util.h"
#include "worker/engine/model/safetensors_reader.h"
#include "worker/engine/model/safetensors_writer.h"
#include "worker/engine/quant/quantized_tensor.h"

namespace compress::engine {
namespace {

using testing::ExpectInvalidArgument;
using testing::TempDir;

constexpr Bnb4BitType kTypes[] = {Bnb4BitType::kNf4, Bnb4BitType::kFp4};

const char* TypeName(Bnb4BitType type) { return FindBnb4BitFormat(type).quant_type; }

std::string Describe(const Bnb4BitOptions& o, at::ScalarType dtype) {
  return absl::StrCat(TypeName(o.type), ", block ", o.block_size,
                      o.double_quant ? absl::StrCat(", nested ", o.nested_block_size) : "", ", ",
                      c10::toString(dtype));
}

// testing::TrickyWeights plus rows of values below 1/12 of the absmax (FP4's
// subnormal and signed-zero codes) and one that underflows when normalized.
at::Tensor TrickyWeights(int64_t out, int64_t in, uint64_t seed) {
  at::Tensor w = testing::TrickyWeights(out, in, seed);
  w[7] = at::randn({in}) * 1e-3;
  w[7][0] = 1.0;
  // A float32 subnormal whose quotient by the absmax underflows to -0.
  w[8] = at::randn({in}) * 1e-3;
  w[8][0] = 100.0;
  w[8][1] = -1e-44f;
  return w;
}

// The largest distance between neighbouring table values, halved: the worst
// rounding error of a value in [-1, 1] on that table.
double HalfLargestGap(std::vector<float> values) {
  std::sort(values.begin(), values.end());
  double gap = 0;
  for (size_t k = 0; k + 1 < values.size(); ++k) {
    gap = std::max(gap, static_cast<double>(values[k + 1]) - values[k]);
  }
  return gap / 2;
}

std::vector<float> QuantMap(Bnb4BitType type) {
  const auto& map = FindBnb4BitFormat(type).quant_map;
  return {map.begin(), map.end()};
}

TEST(Bnb4Bit, CodeTablesEqualTheBitsandbytesSource) {
  // functional.py get_4bit_type("nf4"), typed in.
  const double nf4[16] = {-1.0,
                          -0.6961928009986877,
                          -0.5250730514526367,
                          -0.39491748809814453,
                          -0.28444138169288635,
                          -0.18477343022823334,
                          -0.09105003625154495,
                          0.0,
                          0.07958029955625534,
                          0.16093020141124725,
                          0.24611230194568634,
                          0.33791524171829224,
                          0.44070982933044434,
                          0.5626170039176941,
                          0.7229568362236023,
                          1.0};
  // get_4bit_type("fp4") before `data /= data.abs().max()` (max 12).
  const double fp4[16] = {0,  0.0625,  8.0,  12.0,  4.0,  6.0,  2.0,  3.0,
                          -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0};
  const Bnb4BitFormat& nf4_row = FindBnb4BitFormat(Bnb4BitType::kNf4);
  const Bnb4BitFormat& fp4_row = FindBnb4BitFormat(Bnb4BitType::kFp4);
  EXPECT_STREQ(nf4_row.quant_type, "nf4");
  EXPECT_STREQ(fp4_row.quant_type, "fp4");
  for (int c = 0; c < 16; ++c) {
    SCOPED_TRACE(c);
    // torch.Tensor(list) rounds each double to float32, then divides in float32.
    EXPECT_EQ(nf4_row.quant_map[c], static_cast<float>(nf4[c]));
    EXPECT_EQ(fp4_row.quant_map[c], static_cast<float>(fp4[c]) / 12.0f);
  }
  // The CUDA kernel's FP4 dequantization tree (dDequantizeFP4Tree) literals.
  EXPECT_EQ(fp4_row.quant_map[1], 5.208333333e-03f);
  EXPECT_EQ(fp4_row.quant_map[6], 0.16666667f);
  EXPECT_EQ(fp4_row.quant_map[4], 0.33333333f);
  EXPECT_EQ(fp4_row.quant_map[2], 0.66666667f);
  // FP4 is sign-magnitude; NF4 is sorted with 0 at code 7.
  EXPECT_TRUE(fp4_row.sign_magnitude);
  EXPECT_FALSE(nf4_row.sign_magnitude);
  for (int c = 0; c < 8; ++c) EXPECT_EQ(fp4_row.quant_map[c | 8], -fp4_row.quant_map[c]) << c;
  for (int c = 0; c < 15; ++c) EXPECT_LT(nf4_row.quant_map[c], nf4_row.quant_map[c + 1]) << c;
  EXPECT_EQ(nf4_row.quant_map[nf4_row.zero_code], 0.0f);
  EXPECT_EQ(fp4_row.quant_map[fp4_row.zero_code], 0.0f);
}

TEST(Bnb4Bit, DynamicMapIsCreateDynamicMapSigned) {
  const std::array<float, 256>& map = Bnb4BitDynamicMap();
  // Strictly increasing, within [-1, 1], 0 at index 127 and 1 at the end,
  // and (but for the extra 1.0) symmetric: 127 negatives mirror 127 positives.
  for (int k = 0; k < 255; ++k) EXPECT_LT(map[k], map[k + 1]) << k;
  EXPECT_GE(map[0], -1.0f);
  EXPECT_EQ(map[127], 0.0f);
  EXPECT_EQ(map[255], 1.0f);
  for (int k = 0; k < 127; ++k) EXPECT_EQ(map[k], -map[254 - k]) << k;
  // Exact float32 values, computed apart from this code by emulating the
  // float32 steps of the Python source (struct-rounded Python floats, torch's
  // scalar linspace formula).
  const std::pair<int, float> exact[] = {
      {0, -0x1.fc6666p-1f},
      {1, -0x1.f53334p-1f},
      {2, -0x1.eep-1f},
      {63, -0x1.b66668p-4f},
      {64, -0x1.93d70ap-4f},
      {100, -0x1.e978d4p-8f},
      {126, -0x1.27476ep-21f},
      {128, 0x1.27476ep-21f},
      {129, 0x1.b43528p-19f},
      {130, 0x1.040bfep-17f},
      {191, 0x1.b66668p-4f},
      {200, 0x1.de6666p-3f},
      {253, 0x1.f53334p-1f},
      {254, 0x1.fc6666p-1f},
      // Entries where linspace's second half, counted down from the end,
      // differs from start + k * step.
      {18, -0x1.7acccep-1f},
      {20, -0x1.6c6666p-1f},
      {23, -0x1.56cccep-1f},
      {25, -0x1.486666p-1f},
      {234, 0x1.6c6666p-1f},
      {236, 0x1.7acccep-1f},
  };
  for (const auto& [index, value] : exact) EXPECT_EQ(map[index], value) << index;
  // And in real numbers: for i in 0..6 the midpoints of 2^i equal steps of
  // [0.1, 1], times 10^(i-6).
  std::vector<double> expected = {0.0, 1.0};
  for (int i = 0; i < 7; ++i) {
    for (int j = 0; j < (1 << i); ++j) {
      const double mean = 0.1 + (j + 0.5) * 0.9 / (1 << i);
      expected.push_back(std::pow(10.0, i - 6) * mean);
      expected.push_back(-std::pow(10.0, i - 6) * mean);
    }
  }
  std::sort(expected.begin(), expected.end());
  ASSERT_EQ(expected.size(), 256u);
  for (int k = 0; k < 256; ++k) {
    EXPECT_NEAR(map[k], expected[k], 1e-6 * std::fabs(expected[k])) << k;
  }
}

TEST(Bnb4Bit, QuantizePicksTheNearestTableEntry) {
  at::manual_seed(11);
  // Several scales, and blocks whose absmax is a single outlier.
  at::Tensor w = at::cat({at::randn({4096}), at::rand({4096}) * 3 - 1.5, at::randn({4096}) * 1e-4,
                          at::randn({4096}).pow(3)});
  for (Bnb4BitType type : kTypes) {
    for (int64_t block : {64, 128, 4096}) {
      const Bnb4BitOptions options{type, block, false, 256};
      SCOPED_TRACE(Describe(options, at::kFloat));
      absl::StatusOr<Bnb4BitTensor> q = QuantizeBnb4Bit(w, options, "w");
      ASSERT_TRUE(q.ok()) << q.status();
      // Brute force in float64 over all 16 entries.
      const at::Tensor scale = q->absmax.to(at::kDouble).repeat_interleave(block);
      const at::Tensor y = (w.to(at::kDouble) / scale).unsqueeze(1);
      const at::Tensor table = at::tensor(QuantMap(type), at::kFloat).to(at::kDouble);
      const at::Tensor distance = (y - table.unsqueeze(0)).abs();
      const at::Tensor chosen = distance.gather(1, q->codes.to(at::kLong).unsqueeze(1)).squeeze(1);
      const at::Tensor best = std::get<0>(distance.min(1));
      EXPECT_TRUE(chosen.le(best + 1e-6).all().item<bool>())
          << "worst excess " << (chosen - best).max().item<double>();
      if (type == Bnb4BitType::kFp4) {
        // Bit 3 is the sign of the weight.
        EXPECT_TRUE(q->codes.ge(8).eq(w.lt(0)).all().item<bool>());
      }
    }
  }
}

TEST(Bnb4Bit, ErrorIsAtMostHalfTheLargestGapTimesAbsmax) {
  const at::Tensor weights = TrickyWeights(16, 320, 2);
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const at::Tensor w = weights.to(dtype);
    for (Bnb4BitType type : kTypes) {
      for (int64_t block : {64, 256}) {
        const Bnb4BitOptions options{type, block, false, 256};
        SCOPED_TRACE(Describe(options, dtype));
        absl::StatusOr<Bnb4BitTensor> q = QuantizeBnb4Bit(w, options, "w");
        ASSERT_TRUE(q.ok()) << q.status();
        ASSERT_TRUE(ValidateBnb4Bit(*q, "w").ok());
        const at::Tensor absmax = q->absmax.repeat_interleave(block).view({16, 320});
        // absmax is exactly the block's largest magnitude.
        EXPECT_TRUE(absmax.equal(w.to(at::kFloat)
                                     .abs()
                                     .reshape({-1, block})
                                     .amax(1)
                                     .repeat_interleave(block)
                                     .view({16, 320})));
        const at::Tensor error = (w.to(at::kFloat) - DequantizeBnb4Bit(*q, at::kFloat)).abs();
        const at::Tensor bound = absmax * (HalfLargestGap(QuantMap(type)) * (1 + 1e-5));
        EXPECT_TRUE(error.le(bound).all().item<bool>())
            << "max excess " << (error - bound).max().item<float>();
      }
    }
  }
}

TEST(Bnb4Bit, FastPathEqualsScalarReferenceCodeForCode) {
  // 24 x 200 = 4800 weights: 75 blocks of 64, 18.75 of 256, a partial 4096.
  const at::Tensor weights = TrickyWeights(24, 200, 1);
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const at::Tensor w = weights.to(dtype);
    for (Bnb4BitType type : kTypes) {
      for (int64_t block : {64, 256, 4096}) {
        for (bool double_quant : {false, true}) {
          for (int64_t nested : {64, 256}) {
            if (!double_quant && nested != 256) continue;
            const Bnb4BitOptions options{type, block, double_quant, nested};
            SCOPED_TRACE(Describe(options, dtype));
            absl::StatusOr<Bnb4BitTensor> fast = QuantizeBnb4Bit(w, options, "w");
            absl::StatusOr<Bnb4BitTensor> aten =
                QuantizeBnb4Bit(w, options, "w", Bnb4BitKernel::kAten);
            absl::StatusOr<Bnb4BitTensor> reference = QuantizeBnb4BitReference(w, options, "w");
            ASSERT_TRUE(fast.ok()) << fast.status();
            ASSERT_TRUE(aten.ok()) << aten.status();
            ASSERT_TRUE(reference.ok()) << reference.status();
            // The device path (ATen ops), run on the CPU, agrees exactly.
            EXPECT_TRUE(aten->codes.equal(reference->codes));
            if (!double_quant) EXPECT_TRUE(aten->absmax.equal(reference->absmax));
            ASSERT_TRUE(ValidateBnb4Bit(*fast, "w").ok()) << ValidateBnb4Bit(*fast, "w");
            EXPECT_EQ(fast->shape, (std::vector<int64_t>{24, 200}));
            EXPECT_EQ(fast->dtype, dtype);
            EXPECT_TRUE(fast->codes.equal(reference->codes));
            if (double_quant) {
              EXPECT_EQ(fast->nested_offset, reference->nested_offset);
              EXPECT_TRUE(fast->quantized_absmax.equal(reference->quantized_absmax));
              EXPECT_TRUE(fast->nested_absmax.equal(reference->nested_absmax));
            } else {
              EXPECT_TRUE(fast->absmax.equal(reference->absmax));
            }
            for (at::ScalarType out : {at::kFloat, dtype}) {
              EXPECT_TRUE(
                  DequantizeBnb4Bit(*fast, out).equal(DequantizeBnb4BitReference(*fast, out)))
                  << c10::toString(out);
            }
          }
        }
      }
    }
  }
}

TEST(Bnb4Bit, DoubleQuantizationKeepsAbsmaxAndWeightError) {
  at::manual_seed(4);
  const at::Tensor w = at::randn({512, 1024}) * 0.02;  // 8192 blocks, 32 nested blocks
  const std::array<float, 256>& map = Bnb4BitDynamicMap();
  const double half_gap = HalfLargestGap({map.begin(), map.end()});
  EXPECT_NEAR(half_gap, 0.0140625 / 2, 1e-6);
  for (Bnb4BitType type : kTypes) {
    SCOPED_TRACE(TypeName(type));
    absl::StatusOr<Bnb4BitTensor> plain = QuantizeBnb4Bit(w, {type, 64, false, 256}, "w");
    absl::StatusOr<Bnb4BitTensor> nested = QuantizeBnb4Bit(w, {type, 64, true, 256}, "w");
    ASSERT_TRUE(plain.ok() && nested.ok());
    EXPECT_TRUE(nested->codes.equal(plain->codes)) << "codes use the exact absmax";
    EXPECT_FLOAT_EQ(nested->nested_offset, plain->absmax.mean().item<float>());
    // Each absmax within half a dynamic-map gap of its nested block's scale
    // (plus the float32 rounding of the multiply and the add).
    const at::Tensor restored = DequantizeBnb4BitAbsmax(*nested);
    const at::Tensor scale = nested->nested_absmax.repeat_interleave(256);
    const at::Tensor error = (restored - plain->absmax).abs();
    EXPECT_TRUE(error.le(scale * half_gap * (1 + 1e-5) + 1e-7).all().item<bool>())
        << "max excess " << (error - scale * half_gap).max().item<float>();
    EXPECT_LT((error / plain->absmax).max().item<float>(), 0.02);
    // The weights barely notice.
    const double plain_error = RelativeError(w, DequantizeBnb4Bit(*plain, at::kFloat));
    const double nested_error = RelativeError(w, DequantizeBnb4Bit(*nested, at::kFloat));
    EXPECT_GT(nested_error, 0.0);
    EXPECT_LT(std::fabs(nested_error / plain_error - 1.0), 0.01)
        << plain_error << " vs " << nested_error;
  }
}

TEST(Bnb4Bit, Nf4BeatsFp4OnGaussianWeights) {
  at::manual_seed(5);
  const at::Tensor w = at::randn({256, 1024});
  absl::StatusOr<Bnb4BitTensor> nf4 = QuantizeBnb4Bit(w, {Bnb4BitType::kNf4, 64, false, 256}, "w");
  absl::StatusOr<Bnb4BitTensor> fp4 = QuantizeBnb4Bit(w, {Bnb4BitType::kFp4, 64, false, 256}, "w");
  ASSERT_TRUE(nf4.ok() && fp4.ok());
  const double nf4_error = RelativeError(w, DequantizeBnb4Bit(*nf4, at::kFloat));
  const double fp4_error = RelativeError(w, DequantizeBnb4Bit(*fp4, at::kFloat));
  // NF4's levels are normal quantiles: on Gaussian weights it is the better
  // 4-bit grid (QLoRA, table 2); both stay near 4-bit RTN's ~10%.
  EXPECT_LT(nf4_error, fp4_error);
  EXPECT_LT(nf4_error, 0.11);
  EXPECT_LT(fp4_error, 0.14);
}

// Values of the packed tensors.
std::vector<int> Bytes(const at::Tensor& t) {
  std::vector<int> out;
  at::Tensor flat = t.to(at::kCPU).contiguous().view(-1);
  for (int64_t i = 0; i < flat.numel(); ++i) out.push_back(flat[i].item<int>());
  return out;
}

std::string Text(const at::Tensor& t) {
  at::Tensor bytes = t.to(at::kCPU).contiguous();
  return std::string(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()),
                     static_cast<size_t>(bytes.numel()));
}

std::vector<std::string> Names(const NamedTensors& tensors) {
  std::vector<std::string> names;
  for (const auto& [name, tensor] : tensors) names.push_back(name);
  return names;
}

TEST(Bnb4Bit, NibbleOrderAndJsonOnHandWorkedExamples) {
  // One block, absmax 1. NF4: 1.0 -> 15, -1.0 -> 0, 0.5 -> 12 (0.4407 is
  // nearer than 0.5626), 0.0 -> 7. FP4: 1.0 -> 0b0011, -1.0 -> 0b1011,
  // 0.5 (6/12) -> 0b0101, 0.0 -> 0. First weight in the high nibble.
  const at::Tensor w = at::tensor({1.0f, -1.0f, 0.5f, 0.0f}).view({2, 2});
  absl::StatusOr<Bnb4BitTensor> nf4 = QuantizeBnb4Bit(w, {Bnb4BitType::kNf4, 64, false, 256}, "w");
  ASSERT_TRUE(nf4.ok()) << nf4.status();
  EXPECT_EQ(Bytes(nf4->codes), (std::vector<int>{15, 0, 12, 7}));
  absl::StatusOr<NamedTensors> nf4_tensors = SerializeBnb4Bit(*nf4, "l.weight");
  ASSERT_TRUE(nf4_tensors.ok()) << nf4_tensors.status();
  EXPECT_EQ(Names(*nf4_tensors),
            (std::vector<std::string>{"l.weight", "l.weight.absmax", "l.weight.quant_map",
                                      "l.weight.quant_state.bitsandbytes__nf4"}));
  const NamedTensors& t = *nf4_tensors;
  EXPECT_EQ(t[0].second.scalar_type(), at::kByte);
  EXPECT_EQ(t[0].second.sizes(), (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(Bytes(t[0].second), (std::vector<int>{0xF0, 0xC7}));
  EXPECT_EQ(t[1].second.scalar_type(), at::kFloat);
  EXPECT_TRUE(t[1].second.equal(at::tensor({1.0f})));
  EXPECT_TRUE(t[2].second.equal(at::tensor(QuantMap(Bnb4BitType::kNf4), at::kFloat)));
  EXPECT_EQ(Text(t[3].second),
            R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 2]})");

  absl::StatusOr<Bnb4BitTensor> fp4 = QuantizeBnb4Bit(w, {Bnb4BitType::kFp4, 64, false, 256}, "w");
  ASSERT_TRUE(fp4.ok());
  absl::StatusOr<NamedTensors> fp4_tensors = SerializeBnb4Bit(*fp4, "l.weight");
  ASSERT_TRUE(fp4_tensors.ok());
  EXPECT_EQ(Bytes((*fp4_tensors)[0].second), (std::vector<int>{0x3B, 0x50}));
  EXPECT_EQ((*fp4_tensors)[3].first, "l.weight.quant_state.bitsandbytes__fp4");
  EXPECT_EQ(Text((*fp4_tensors)[3].second),
            R"({"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [2, 2]})");

  // An odd count pads the last low nibble with the code of 0 (NF4: 7).
  const at::Tensor odd = at::tensor({1.0f, -1.0f, 0.5f}).to(at::kBFloat16);
  absl::StatusOr<Bnb4BitTensor> nf4_odd =
      QuantizeBnb4Bit(odd, {Bnb4BitType::kNf4, 128, false, 256}, "w");
  ASSERT_TRUE(nf4_odd.ok());
  absl::StatusOr<NamedTensors> odd_tensors = SerializeBnb4Bit(*nf4_odd, "e.weight");
  ASSERT_TRUE(odd_tensors.ok());
  EXPECT_EQ(Bytes((*odd_tensors)[0].second), (std::vector<int>{0xF0, 0xC7}));
  EXPECT_EQ((*odd_tensors)[0].second.sizes(), (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(Text((*odd_tensors)[3].second),
            R"({"quant_type": "nf4", "blocksize": 128, "dtype": "bfloat16", "shape": [3]})");

  // Double quantization of the 2 x 2 weight: one absmax (1.0) is its own
  // mean, so the centred value is 0, the nested absmax 0 and its code 127
  // (the dynamic map's 0); 0 * 0 + 1 restores it exactly.
  absl::StatusOr<Bnb4BitTensor> dq =
      QuantizeBnb4Bit(w.to(at::kHalf), {Bnb4BitType::kNf4, 64, true, 256}, "w");
  ASSERT_TRUE(dq.ok()) << dq.status();
  EXPECT_EQ(dq->nested_offset, 1.0f);
  absl::StatusOr<NamedTensors> dq_tensors = SerializeBnb4Bit(*dq, "l.weight");
  ASSERT_TRUE(dq_tensors.ok()) << dq_tensors.status();
  const NamedTensors& d = *dq_tensors;
  EXPECT_EQ(Names(d),
            (std::vector<std::string>{"l.weight", "l.weight.absmax", "l.weight.quant_map",
                                      "l.weight.nested_absmax", "l.weight.nested_quant_map",
                                      "l.weight.quant_state.bitsandbytes__nf4"}));
  EXPECT_EQ(Bytes(d[0].second), (std::vector<int>{0xF0, 0xC7}));
  EXPECT_EQ(d[1].second.scalar_type(), at::kByte);
  EXPECT_EQ(Bytes(d[1].second), (std::vector<int>{127}));
  EXPECT_TRUE(d[3].second.equal(at::tensor({0.0f})));
  EXPECT_EQ(d[4].second.sizes(), (std::vector<int64_t>{256}));
  EXPECT_EQ(d[4].second[0].item<float>(), Bnb4BitDynamicMap()[0]);
  EXPECT_EQ(
      Text(d[5].second),
      R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [2, 2], )"
      R"("nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 1.000000000e+00})");
  EXPECT_TRUE(
      DequantizeBnb4Bit(*dq, at::kHalf)
          .equal(at::tensor({1.0f, -1.0f, 0.44070982933044434f, 0.0f}).to(at::kHalf).view({2, 2})));
}

TEST(Bnb4Bit, QuantStateJsonHasAFixedLengthAndParsesBitsandbytesOwnText) {
  Bnb4BitQuantState state;
  state.quant_type = "fp4";
  state.blocksize = 128;
  state.dtype = "bfloat16";
  state.shape = {11008, 4096};
  state.nested = true;
  const size_t length = FormatBnb4BitQuantState(state).size();
  for (float offset : {0.0f, -0.0f, 1e-30f, 0.0123456789f, 3.0f, 65504.0f, 3.4e38f}) {
    state.nested_offset = offset;
    const std::string json = FormatBnb4BitQuantState(state);
    EXPECT_EQ(json.size(), length) << json;
    absl::StatusOr<Bnb4BitQuantState> parsed = ParseBnb4BitQuantState(json, "t");
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->nested_offset, offset) << "float32 round trip of " << json;
    EXPECT_EQ(parsed->shape, state.shape);
    EXPECT_TRUE(parsed->nested);
  }
  // What bitsandbytes itself writes: json.dumps with Python's repr() floats.
  absl::StatusOr<Bnb4BitQuantState> theirs = ParseBnb4BitQuantState(
      R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4096, 4096], )"
      R"("nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.02880859375})",
      "t");
  ASSERT_TRUE(theirs.ok()) << theirs.status();
  EXPECT_EQ(theirs->quant_type, "nf4");
  EXPECT_EQ(theirs->blocksize, 64);
  EXPECT_EQ(theirs->dtype, "bfloat16");
  EXPECT_EQ(theirs->nested_offset, 0.02880859375f);
}

TEST(Bnb4Bit, SerializeParseRoundTripsBitForBitThroughAFile) {
  TempDir dir;
  int file_index = 0;
  for (const std::vector<int64_t>& shape :
       {std::vector<int64_t>{48, 100}, std::vector<int64_t>{7, 9},
        std::vector<int64_t>{3, 5, 67}}) {
    for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
      for (Bnb4BitType type : kTypes) {
        for (bool double_quant : {false, true}) {
          const Bnb4BitOptions options{type, 64, double_quant, 64};
          SCOPED_TRACE(Describe(options, dtype) + " shape " + ::testing::PrintToString(shape));
          // The writer declares every tensor before the weight is quantized.
          absl::StatusOr<std::vector<SafetensorsTensorSpec>> specs = Bnb4BitTensorSpecs(
              "m.proj.weight", shape,
              dtype == at::kFloat ? SafetensorsDtype::kF32 : SafetensorsDtype::kBF16, options);
          ASSERT_TRUE(specs.ok()) << specs.status();
          at::manual_seed(file_index);
          const at::Tensor w = (at::randn(shape) * 0.05).to(dtype);
          absl::StatusOr<Bnb4BitTensor> q = QuantizeBnb4Bit(w, options, "m.proj.weight");
          ASSERT_TRUE(q.ok()) << q.status();
          absl::StatusOr<NamedTensors> tensors = SerializeBnb4Bit(*q, "m.proj.weight");
          ASSERT_TRUE(tensors.ok()) << tensors.status();
          ASSERT_EQ(tensors->size(), specs->size());
          int64_t bytes = 0;
          for (size_t i = 0; i < specs->size(); ++i) {
            EXPECT_EQ((*tensors)[i].first, (*specs)[i].name);
            EXPECT_EQ((*tensors)[i].second.sizes(), at::IntArrayRef((*specs)[i].shape));
            bytes += static_cast<int64_t>((*tensors)[i].second.nbytes());
          }
          EXPECT_EQ(bytes, *Bnb4BitSerializedBytes(shape,
                                                   dtype == at::kFloat ? SafetensorsDtype::kF32
                                                                       : SafetensorsDtype::kBF16,
                                                   options));

          const std::string path = dir / absl::StrCat("w", file_index++, ".safetensors");
          absl::StatusOr<SafetensorsWriter> writer = SafetensorsWriter::Open(path, *specs);
          ASSERT_TRUE(writer.ok()) << writer.status();
          for (const auto& [name, tensor] : *tensors) {
            ASSERT_TRUE(writer->WriteTensor(name, tensor).ok()) << name;
          }
          ASSERT_TRUE(writer->Commit().ok());

          absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file = SafetensorsFile::Open(path);
          ASSERT_TRUE(file.ok()) << file.status();
          NamedTensors read;
          read.emplace_back("m.other.weight", at::zeros({3}));  // someone else's: ignored
          for (const SafetensorsTensorInfo& info : (*file)->header().tensors) {
            absl::StatusOr<at::Tensor> view = (*file)->View(info);
            ASSERT_TRUE(view.ok());
            read.emplace_back(info.name, *view);
          }
          absl::StatusOr<Bnb4BitTensor> parsed = ParseBnb4Bit(read, "m.proj.weight");
          ASSERT_TRUE(parsed.ok()) << parsed.status();
          EXPECT_EQ(parsed->shape, shape);
          EXPECT_EQ(parsed->dtype, dtype);
          EXPECT_EQ(parsed->options.type, type);
          EXPECT_EQ(parsed->options.block_size, 64);
          EXPECT_EQ(parsed->options.double_quant, double_quant);
          EXPECT_TRUE(parsed->codes.equal(q->codes));
          if (double_quant) {
            EXPECT_EQ(parsed->options.nested_block_size, 64);
            EXPECT_EQ(parsed->nested_offset, q->nested_offset);
            EXPECT_TRUE(parsed->quantized_absmax.equal(q->quantized_absmax));
            EXPECT_TRUE(parsed->nested_absmax.equal(q->nested_absmax));
          } else {
            EXPECT_TRUE(parsed->absmax.equal(q->absmax));
          }
          EXPECT_TRUE(DequantizeBnb4Bit(*parsed, dtype).equal(DequantizeBnb4Bit(*q, dtype)));
          // Serializing the parsed weight gives the same bytes again.
          absl::StatusOr<NamedTensors> again = SerializeBnb4Bit(*parsed, "m.proj.weight");
          ASSERT_TRUE(again.ok());
          for (size_t i = 0; i < tensors->size(); ++i) {
            EXPECT_TRUE((*again)[i].second.equal((*tensors)[i].second)) << (*tensors)[i].first;
          }
        }
      }
    }
  }
}

TEST(Bnb4Bit, PartialLastBlockAndZeroBlocks) {
  // 2 full blocks of 64 and a last block of 5: the first block all zero.
  at::manual_seed(6);
  at::Tensor w = at::randn({133});
  w.narrow(0, 0, 64).zero_();
  w[130] = -7.0f;  // the partial block's absmax
  for (Bnb4BitType type : kTypes) {
    for (bool double_quant : {false, true}) {
      const Bnb4BitOptions options{type, 64, double_quant, 256};
      SCOPED_TRACE(Describe(options, at::kFloat));
      absl::StatusOr<Bnb4BitTensor> q = QuantizeBnb4Bit(w, options, "w");
      ASSERT_TRUE(q.ok()) << q.status();
      EXPECT_EQ(q->blocks(), 3);
      const at::Tensor absmax = DequantizeBnb4BitAbsmax(*q);
      ASSERT_EQ(absmax.numel(), 3);
      if (!double_quant) {
        EXPECT_EQ(absmax[0].item<float>(), 0.0f);
        EXPECT_EQ(absmax[2].item<float>(), 7.0f);
      }
      const uint8_t zero_code = FindBnb4BitFormat(type).zero_code;
      EXPECT_TRUE(q->codes.narrow(0, 0, 64).eq(zero_code).all().item<bool>());
      // The partial block's extreme gets the extreme code (-1 * absmax).
      const int expected_extreme = type == Bnb4BitType::kNf4 ? 0 : 11;
      EXPECT_EQ(q->codes[130].item<int>(), expected_extreme);
      const at::Tensor restored = DequantizeBnb4Bit(*q, at::kFloat);
      EXPECT_TRUE(at::isfinite(restored).all().item<bool>());
      EXPECT_TRUE(restored.narrow(0, 0, 64).eq(0).all().item<bool>());
      EXPECT_TRUE(restored.equal(DequantizeBnb4BitReference(*q, at::kFloat)));
    }
  }
  // An all-zero weight: absmax 0, offset 0, nested absmax 0, all exact zeros.
  for (bool double_quant : {false, true}) {
    absl::StatusOr<Bnb4BitTensor> q =
        QuantizeBnb4Bit(at::zeros({4, 100}), {Bnb4BitType::kNf4, 64, double_quant, 256}, "z");
    ASSERT_TRUE(q.ok());
    const at::Tensor restored = DequantizeBnb4Bit(*q, at::kBFloat16);
    EXPECT_TRUE(restored.eq(0).all().item<bool>());
    EXPECT_EQ(q->nested_offset, 0.0f);
    EXPECT_TRUE(SerializeBnb4Bit(*q, "z").ok());
  }
}

TEST(Bnb4Bit, BitsPerWeight) {
  const std::vector<int64_t> shape = {4096, 4096};
  absl::StatusOr<int64_t> plain = Bnb4BitSerializedBytes(shape, SafetensorsDtype::kBF16, {});
  ASSERT_TRUE(plain.ok());
  const int64_t json_plain =
      std::string(
          R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4096, 4096]})")
          .size();
  // codes n/2, absmax 4 bytes a block of 64, the 16-float map, the JSON.
  EXPECT_EQ(*plain, 4096 * 4096 / 2 + 4096 * 4096 / 64 * 4 + 64 + json_plain);
  absl::StatusOr<int64_t> nested =
      Bnb4BitSerializedBytes(shape, SafetensorsDtype::kBF16, {Bnb4BitType::kNf4, 64, true, 256});
  ASSERT_TRUE(nested.ok());
  const int64_t json_nested = json_plain + std::string(R"(, "nested_blocksize": 256, )"
                                                       R"("nested_dtype": "float32", )"
                                                       R"("nested_offset": 0.000000000e+00)")
                                               .size();
  EXPECT_EQ(*nested, 4096 * 4096 / 2 + 4096 * 4096 / 64 + 4096 * 4096 / 64 / 256 * 4 + 64 +
                         256 * 4 + json_nested);
  absl::StatusOr<double> bpw = Bnb4BitBitsPerWeight(shape, SafetensorsDtype::kBF16, {});
  absl::StatusOr<double> bpw_nested =
      Bnb4BitBitsPerWeight(shape, SafetensorsDtype::kBF16, {Bnb4BitType::kNf4, 64, true, 256});
  ASSERT_TRUE(bpw.ok() && bpw_nested.ok());
  EXPECT_NEAR(*bpw, 4.5, 1e-4);
  EXPECT_NEAR(*bpw_nested, 4.0 + 8.0 / 64 + 32.0 / (64 * 256), 1e-3);
}

TEST(Bnb4Bit, RejectsBadInputsNamingTensorAndField) {
  const at::Tensor w = at::randn({8, 96});
  for (int64_t block : {0, 32, 100, 8192}) {
    ExpectInvalidArgument(QuantizeBnb4Bit(w, {Bnb4BitType::kNf4, block, false, 256}, "t").status(),
                          {absl::StrCat("block_size ", block)});
  }
  ExpectInvalidArgument(QuantizeBnb4Bit(w, {Bnb4BitType::kNf4, 64, true, 100}, "t").status(),
                        {"nested_block_size 100"});
  EXPECT_TRUE(QuantizeBnb4Bit(w, {Bnb4BitType::kNf4, 64, false, 100}, "t").ok())
      << "nested_block_size is only checked with double quantization";
  EXPECT_TRUE(ValidateBnb4BitOptions({Bnb4BitType::kFp4, 4096, true, 4096}).ok());
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    at::Tensor with_bad = w.clone();
    with_bad[3][5] = bad;
    ExpectInvalidArgument(
        QuantizeBnb4Bit(with_bad, {}, "model.layers.0.mlp.up_proj.weight").status(),
        {"'model.layers.0.mlp.up_proj.weight'", "[8, 96]", "NaN or Inf"});
    ExpectInvalidArgument(QuantizeBnb4BitReference(with_bad, {}, "t").status(),
                          {"'t'", "NaN or Inf"});
    // In a partial last block too.
    at::Tensor tail = at::randn({70});
    tail[69] = bad;
    ExpectInvalidArgument(QuantizeBnb4Bit(tail, {}, "tail").status(), {"'tail'", "NaN or Inf"});
  }
  ExpectInvalidArgument(QuantizeBnb4Bit(at::ones({4, 4}, at::kInt), {}, "ids").status(),
                        {"'ids'", "Int"});
  ExpectInvalidArgument(QuantizeBnb4Bit(at::ones({4, 4}, at::kDouble), {}, "d").status(),
                        {"'d'", "Double"});
  ExpectInvalidArgument(QuantizeBnb4Bit(at::ones({0, 4}), {}, "empty").status(),
                        {"'empty'", "[0, 4]"});
  ExpectInvalidArgument(Bnb4BitTensorSpecs("x.weight", {4, 4}, SafetensorsDtype::kF64, {}).status(),
                        {"'x.weight'", "F64"});
  ExpectInvalidArgument(
      Bnb4BitTensorSpecs("x.weight", {65536, 65536}, SafetensorsDtype::kF16, {}).status(),
      {"'x.weight'", "2^31"});

  // Parsing: every tensor and the JSON are checked.
  absl::StatusOr<Bnb4BitTensor> q =
      QuantizeBnb4Bit(w, {Bnb4BitType::kNf4, 64, true, 256}, "l.weight");
  ASSERT_TRUE(q.ok());
  absl::StatusOr<NamedTensors> good = SerializeBnb4Bit(*q, "l.weight");
  ASSERT_TRUE(good.ok());
  ASSERT_TRUE(ParseBnb4Bit(*good, "l.weight").ok());
  auto replaced = [&](const std::string& name, const at::Tensor& tensor) {
    NamedTensors out = *good;
    for (auto& [n, t] : out) {
      if (n == name) t = tensor;
    }
    return out;
  };
  auto without = [&](const std::string& name) {
    NamedTensors out;
    for (const auto& [n, t] : *good) {
      if (n != name) out.emplace_back(n, t);
    }
    return out;
  };
  auto json = [](const std::string& text) {
    at::Tensor t = at::empty({static_cast<int64_t>(text.size())}, at::kByte);
    std::memcpy(t.data_ptr<uint8_t>(), text.data(), text.size());
    return t;
  };
  const std::string state_name = "l.weight.quant_state.bitsandbytes__nf4";
  ExpectInvalidArgument(ParseBnb4Bit(without(state_name), "l.weight").status(),
                        {"'l.weight'", "quant_state"});
  ExpectInvalidArgument(ParseBnb4Bit(without("l.weight.nested_absmax"), "l.weight").status(),
                        {"'l.weight.nested_absmax'", "missing"});
  ExpectInvalidArgument(
      ParseBnb4Bit(replaced("l.weight.absmax", at::zeros({13}, at::kByte)), "l.weight").status(),
      {"'l.weight.absmax'", "[13]", "expected Byte [12]"});
  ExpectInvalidArgument(
      ParseBnb4Bit(replaced("l.weight.absmax", at::zeros({12})), "l.weight").status(),
      {"'l.weight.absmax'", "Float", "expected Byte"});
  ExpectInvalidArgument(
      ParseBnb4Bit(replaced("l.weight", at::zeros({385, 1}, at::kByte)), "l.weight").status(),
      {"'l.weight'", "expected Byte [384, 1]"});
  ExpectInvalidArgument(
      ParseBnb4Bit(replaced("l.weight.quant_map", at::zeros({16})), "l.weight").status(),
      {"'l.weight.quant_map'", "differs"});
  ExpectInvalidArgument(
      ParseBnb4Bit(replaced("l.weight.nested_absmax", at::full({1}, -1.0f)), "l.weight").status(),
      {"'l.weight'", "nested absmax"});
  ExpectInvalidArgument(ParseBnb4Bit(replaced(state_name, json("not json")), "l.weight").status(),
                        {"'" + state_name + "'", "not a JSON object"});
  ExpectInvalidArgument(
      ParseBnb4Bit(
          replaced(
              state_name,
              json(
                  R"({"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [8, 96], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1})")),
          "l.weight")
          .status(),
      {"'" + state_name + "'", "quant_type 'fp4'"});
  ExpectInvalidArgument(
      ParseBnb4Bit(
          replaced(
              state_name,
              json(
                  R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 96]})")),
          "l.weight")
          .status(),
      {"'l.weight.nested_absmax'", "not part of a nf4 weight"});
  ExpectInvalidArgument(
      ParseBnb4Bit(
          replaced(
              state_name,
              json(
                  R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 97], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1})")),
          "l.weight")
          .status(),
      {"'l.weight'", "expected Byte [388, 1]"});
  ExpectInvalidArgument(
      ParseBnb4BitQuantState(
          R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2], "absmax": 1})",
          "s")
          .status(),
      {"'s'", "unknown key 'absmax'"});
  ExpectInvalidArgument(
      ParseBnb4BitQuantState(
          R"({"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [2]})", "s")
          .status(),
      {"'s'", "blocksize 48"});
  ExpectInvalidArgument(
      ParseBnb4BitQuantState(
          R"({"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [2]})", "s")
          .status(),
      {"'s'", "dtype"});
  ExpectInvalidArgument(
      ParseBnb4BitQuantState(
          R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2], "nested_offset": 0.5})",
          "s")
          .status(),
      {"'s'", "some but not all"});
  ExpectInvalidArgument(
      ParseBnb4BitQuantState(
          R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": -0.5})",
          "s")
          .status(),
      {"'s'", "nested_offset"});
  NamedTensors extra = *good;
  extra.emplace_back("l.weight.quant_state.bitsandbytes__fp4", json("{}"));
  ExpectInvalidArgument(ParseBnb4Bit(extra, "l.weight").status(),
                        {"'l.weight'", "more than one quant_state"});
  NamedTensors unknown = *good;
  unknown.emplace_back("l.weight.SCB", at::zeros({8}));
  ExpectInvalidArgument(ParseBnb4Bit(unknown, "l.weight").status(), {"'l.weight.SCB'"});
}

}  // namespace
}  // namespace compress::engine
