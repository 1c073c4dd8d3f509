// RTN: the fast ATen path against the scalar reference, the documented
// conventions on hand-computed values, the error bound and monotonicity.
#include "worker/engine/quant/rtn.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/engine/test_util.h"
#include "worker/engine/quant/quantized_tensor.h"

namespace compress::engine {
namespace {

using testing::ExpectInvalidArgument;

using testing::TrickyWeights;

std::string Describe(const RtnOptions& o, at::ScalarType dtype) {
  return absl::StrCat(o.bits, " bits, ", o.symmetric ? "sym" : "asym", ", group ", o.group_size,
                      ", ", c10::toString(dtype));
}

TEST(Rtn, FastPathEqualsScalarReferenceCodeForCode) {
  const at::Tensor weights = TrickyWeights(24, 256, 1);
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const at::Tensor w = weights.to(dtype);
    for (int bits = 2; bits <= 8; ++bits) {
      for (bool symmetric : {false, true}) {
        for (int64_t group_size : {0, -1, 32, 128}) {
          const RtnOptions options{bits, symmetric, group_size};
          SCOPED_TRACE(Describe(options, dtype));
          absl::StatusOr<QuantizedTensor> fast = QuantizeRtn(w, options, "w");
          absl::StatusOr<QuantizedTensor> reference = QuantizeRtnReference(w, options, "w");
          ASSERT_TRUE(fast.ok()) << fast.status();
          ASSERT_TRUE(reference.ok()) << reference.status();
          ASSERT_TRUE(ValidateQuantized(*fast, "w").ok());
          EXPECT_EQ(fast->group_size, group_size > 0 ? group_size : 256);
          EXPECT_EQ(fast->bits, bits);
          EXPECT_TRUE(fast->codes.equal(reference->codes));
          EXPECT_TRUE(fast->scales.equal(reference->scales));
          EXPECT_TRUE(fast->zeros.equal(reference->zeros));
          if (symmetric) {
            EXPECT_TRUE(fast->zeros.eq(1 << (bits - 1)).all().item<bool>());
          }
          // Dequantization, fast against reference, in the weight's dtype.
          EXPECT_TRUE(Dequantize(*fast, dtype).equal(DequantizeReference(*fast, dtype)));
        }
      }
    }
  }
}

TEST(Rtn, MatchesHandComputedValues) {
  const at::Tensor w = at::tensor({-1.0f, 0.0f, 0.5f, 2.0f}).view({1, 4});
  // Asymmetric: scale = 3/15 = 0.2 rounds (up) to the float16 1639/8192;
  // zero = round(1 / 0.20007) = 5.
  absl::StatusOr<QuantizedTensor> asym = QuantizeRtn(w, {4, false, 0}, "w");
  ASSERT_TRUE(asym.ok()) << asym.status();
  EXPECT_EQ(asym->scales.item<float>(), 1639.0f / 8192.0f);
  EXPECT_EQ(asym->zeros.item<int>(), 5);
  EXPECT_TRUE(asym->codes.equal(at::tensor({0, 5, 7, 15}, at::kByte).view({1, 4})));
  EXPECT_TRUE(
      Dequantize(*asym, at::kFloat)
          .equal(at::tensor({-5.0f, 0.0f, 2.0f, 10.0f}).mul(1639.0f / 8192.0f).view({1, 4})));
  // Symmetric: scale = 2 * 2 / 15 rounds up to 1093/4096; zero = 8.
  absl::StatusOr<QuantizedTensor> sym = QuantizeRtn(w, {4, true, 0}, "w");
  ASSERT_TRUE(sym.ok()) << sym.status();
  EXPECT_EQ(sym->scales.item<float>(), 1093.0f / 4096.0f);
  EXPECT_EQ(sym->zeros.item<int>(), 8);
  EXPECT_TRUE(sym->codes.equal(at::tensor({4, 8, 10, 15}, at::kByte).view({1, 4})));
  // An all-zero group dequantizes to exact zeros.
  absl::StatusOr<QuantizedTensor> zero = QuantizeRtn(at::zeros({2, 8}), {3, false, 4}, "w");
  ASSERT_TRUE(zero.ok());
  EXPECT_TRUE(Dequantize(*zero, at::kFloat).eq(0).all().item<bool>());
}

TEST(Rtn, ErrorIsAtMostHalfAScaleElementwise) {
  const at::Tensor w = TrickyWeights(16, 256, 2);
  for (int bits = 2; bits <= 8; ++bits) {
    for (bool symmetric : {false, true}) {
      for (int64_t group_size : {0, 32, 128}) {
        const RtnOptions options{bits, symmetric, group_size};
        SCOPED_TRACE(Describe(options, at::kFloat));
        absl::StatusOr<QuantizedTensor> q = QuantizeRtn(w, options, "w");
        ASSERT_TRUE(q.ok()) << q.status();
        const at::Tensor scale =
            q->scales.to(at::kFloat).repeat_interleave(q->group_size, /*dim=*/1);
        const at::Tensor error = (w - Dequantize(*q, at::kFloat)).abs();
        // float32 rounding in w / scale and (q - zero) * scale adds a few ulps.
        const at::Tensor bound = scale * 0.5 * (1 + 1e-6) + w.abs() * 1e-6;
        EXPECT_TRUE(error.le(bound).all().item<bool>())
            << "max excess " << (error - bound).max().item<float>();
      }
    }
  }
}

TEST(Rtn, ReconstructionErrorStrictlyDecreasesWithBits) {
  at::manual_seed(3);
  const at::Tensor w = at::randn({64, 256});
  for (bool symmetric : {false, true}) {
    for (int64_t group_size : {0, 32, 128}) {
      double previous = std::numeric_limits<double>::infinity();
      for (int bits = 2; bits <= 8; ++bits) {
        const RtnOptions options{bits, symmetric, group_size};
        SCOPED_TRACE(Describe(options, at::kFloat));
        absl::StatusOr<QuantizedTensor> q = QuantizeRtn(w, options, "w");
        ASSERT_TRUE(q.ok());
        const double error = RelativeError(w, Dequantize(*q, at::kFloat));
        EXPECT_LT(error, previous);
        EXPECT_GT(error, 0.0);
        previous = error;
      }
      EXPECT_LT(previous, 0.01) << "8 bits reconstructs to within 1%";
    }
  }
}

TEST(Rtn, RejectsBadInputsNamingTensorAndShape) {
  const at::Tensor w = at::randn({8, 96});
  ExpectInvalidArgument(
      QuantizeRtn(w, {4, false, 64}, "model.layers.0.mlp.up_proj.weight").status(),
      {"model.layers.0.mlp.up_proj.weight", "[8, 96]", "group_size 64", "in_features 96"});
  ExpectInvalidArgument(QuantizeRtnReference(w, {4, false, 64}, "t").status(), {"'t'", "[8, 96]"});
  ExpectInvalidArgument(QuantizeRtn(w, {1, false, 0}, "t").status(), {"bits 1"});
  ExpectInvalidArgument(QuantizeRtn(w, {9, false, 0}, "t").status(), {"bits 9"});
  ExpectInvalidArgument(QuantizeRtn(w, {4, false, -2}, "t").status(), {"group_size -2"});
  ExpectInvalidArgument(QuantizeRtn(at::randn({96}), {4, false, 0}, "norm").status(),
                        {"'norm'", "[96]", "2-D"});
  ExpectInvalidArgument(QuantizeRtn(at::ones({4, 4}, at::kInt), {4, false, 0}, "ids").status(),
                        {"'ids'", "floating-point"});
  at::Tensor with_nan = w.clone();
  with_nan[3][5] = std::numeric_limits<float>::quiet_NaN();
  ExpectInvalidArgument(QuantizeRtn(with_nan, {4, false, 32}, "t").status(), {"'t'", "NaN or Inf"});
  at::Tensor with_inf = w.clone();
  with_inf[0][0] = std::numeric_limits<float>::infinity();
  ExpectInvalidArgument(QuantizeRtn(with_inf, {4, true, 0}, "t").status(), {"'t'", "NaN or Inf"});
  ExpectInvalidArgument(QuantizeRtnReference(with_inf, {4, true, 0}, "t").status(),
                        {"'t'", "NaN or Inf"});
}

TEST(Rtn, ValidationCatchesScalesBeyondFloat16) {
  // A range of 2e6 at 2 bits needs a scale of ~6.7e5, above float16's 65504.
  const at::Tensor w = at::tensor({-1e6f, 1e6f}).view({1, 2});
  absl::StatusOr<QuantizedTensor> q = QuantizeRtn(w, {2, false, 0}, "huge");
  ASSERT_TRUE(q.ok());
  ExpectInvalidArgument(ValidateQuantized(*q, "huge"), {"'huge'", "65504"});
}

}  // namespace
}  // namespace compress::engine
