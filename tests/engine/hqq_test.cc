// HQQ: the fast path against the scalar float64 reference, against RTN on
// squared and lp error group by group, the RTN start, scale equivariance and
// the validation of options and weights.
#include "worker/engine/quant/hqq.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/engine/test_util.h"
#include "worker/engine/quant/quantized_tensor.h"
#include "worker/engine/quant/rtn.h"

namespace compress::engine {
namespace {

using testing::ExpectInvalidArgument;

HqqOptions Options(int bits, bool symmetric, int64_t group_size, int iterations = 20) {
  HqqOptions o;
  o.grid = {bits, symmetric, group_size};
  o.iterations = iterations;
  return o;
}

std::string Describe(const HqqOptions& o) {
  return absl::StrCat(o.grid.bits, " bits, ", o.grid.symmetric ? "sym" : "asym", ", group ",
                      o.grid.group_size, ", ", o.iterations, " iterations");
}

at::Tensor Gaussian(int64_t out, int64_t in, uint64_t seed) {
  at::manual_seed(seed);
  return at::randn({out, in}) * 0.02;
}

// Laplace weights (exponential magnitudes, random signs) with one weight in
// 256 replaced by an outlier of 8 to 16 standard deviations.
at::Tensor HeavyTailed(int64_t out, int64_t in, uint64_t seed) {
  at::manual_seed(seed);
  const at::Tensor sign = at::randint(0, 2, {out, in}).mul_(2).sub_(1).to(at::kFloat);
  at::Tensor w = at::empty({out, in}).exponential_(1.0).mul_(sign);
  const at::Tensor outlier = at::rand({out, in}).lt(1.0 / 256);
  const at::Tensor size = at::rand({out, in}).mul_(8).add_(8).mul_(std::sqrt(2.0)).mul_(sign);
  return at::where(outlier, size, w).mul_(0.01);
}

// Rows that exercise every branch: all zero, constant, all positive, all
// negative, a single non-zero, tiny (float16-subnormal scales), large.
at::Tensor TrickyWeights(int64_t out, int64_t in, uint64_t seed) {
  at::Tensor w = Gaussian(out, in, seed);
  w[0].zero_();
  w[1].fill_(0.3);
  w[2] = at::rand({in}) * 0.05;
  w[3] = -at::rand({in}) * 0.05;
  w[4].zero_();
  w[4][7] = 0.7;
  w[5] *= 1e-5;
  w[6] *= 5000;
  return w;
}

// Per group (float64 [out, groups]): sum of squared errors and sum of
// |error|^p of the dequantized weight.
struct GroupErrors {
  at::Tensor squared;
  at::Tensor lp;
};

GroupErrors Errors(const at::Tensor& w, const QuantizedTensor& q, double p = 0.7) {
  const at::Tensor error = (w.to(at::kDouble) - Dequantize(q, at::kFloat).to(at::kDouble))
                               .view({q.out_features(), q.groups(), q.group_size});
  return {error.square().sum(-1), error.abs().pow(p).sum(-1)};
}

TEST(Hqq, ZeroIterationsIsRtnCodeForCode) {
  const at::Tensor w = TrickyWeights(16, 256, 1);
  for (int bits : {2, 3, 4, 8}) {
    for (bool symmetric : {false, true}) {
      for (int64_t group_size : {0, 64}) {
        const HqqOptions o = Options(bits, symmetric, group_size, /*iterations=*/0);
        SCOPED_TRACE(Describe(o));
        absl::StatusOr<QuantizedTensor> hqq = QuantizeHqq(w, o, "w");
        absl::StatusOr<QuantizedTensor> rtn = QuantizeRtn(w, o.grid, "w");
        absl::StatusOr<QuantizedTensor> reference = QuantizeHqqReference(w, o, "w");
        ASSERT_TRUE(hqq.ok()) << hqq.status();
        ASSERT_TRUE(rtn.ok()) << rtn.status();
        ASSERT_TRUE(reference.ok()) << reference.status();
        for (const QuantizedTensor* q : {&*hqq, &*reference}) {
          EXPECT_TRUE(q->codes.equal(rtn->codes));
          EXPECT_TRUE(q->scales.equal(rtn->scales));
          EXPECT_TRUE(q->zeros.equal(rtn->zeros));
          EXPECT_EQ(q->group_size, rtn->group_size);
          EXPECT_EQ(q->bits, bits);
        }
      }
    }
  }
}

TEST(Hqq, FastPathAgreesWithScalarReference) {
  const std::vector<std::pair<std::string, at::Tensor>> weights = {
      {"Gaussian", Gaussian(16, 256, 2)},
      {"heavy-tailed", HeavyTailed(16, 256, 2)},
      {"tricky", TrickyWeights(16, 256, 2)}};
  for (const auto& [kind, w] : weights) {
    for (const HqqOptions& o : {Options(2, false, 64), Options(3, false, 0), Options(4, false, 128),
                                Options(4, true, 64), Options(8, false, 64)}) {
      SCOPED_TRACE(absl::StrCat(Describe(o), ", ", kind));
      absl::StatusOr<QuantizedTensor> fast = QuantizeHqq(w, o, "w");
      absl::StatusOr<QuantizedTensor> reference = QuantizeHqqReference(w, o, "w");
      ASSERT_TRUE(fast.ok()) << fast.status();
      ASSERT_TRUE(reference.ok()) << reference.status();
      // float32 against float64: a rounding may go the other way now and
      // then and send one group along another path, never often.
      const double same_codes =
          fast->codes.eq(reference->codes).to(at::kDouble).mean().item<double>();
      const double same_zeros =
          fast->zeros.eq(reference->zeros).to(at::kDouble).mean().item<double>();
      const double same_scales =
          fast->scales.eq(reference->scales).to(at::kDouble).mean().item<double>();
      EXPECT_GT(same_codes, 0.99);
      EXPECT_GT(same_zeros, 0.97);
      EXPECT_GT(same_scales, 0.97);
      const double fast_error = Errors(w, *fast).squared.sum().item<double>();
      const double reference_error = Errors(w, *reference).squared.sum().item<double>();
      EXPECT_NEAR(fast_error, reference_error, 2e-3 * reference_error);
    }
  }
}

TEST(Hqq, BeatsRtnOnSquaredAndLpErrorGroupByGroup) {
  for (bool heavy : {false, true}) {
    const at::Tensor w = heavy ? HeavyTailed(64, 512, 3) : Gaussian(64, 512, 3);
    for (int bits : {2, 3, 4, 8}) {
      for (int64_t group_size : {0, 64, 128}) {
        const HqqOptions o = Options(bits, /*symmetric=*/false, group_size);
        SCOPED_TRACE(absl::StrCat(Describe(o), heavy ? ", heavy-tailed" : ", Gaussian"));
        absl::StatusOr<QuantizedTensor> hqq = QuantizeHqq(w, o, "w");
        absl::StatusOr<QuantizedTensor> rtn = QuantizeRtn(w, o.grid, "w");
        ASSERT_TRUE(hqq.ok()) << hqq.status();
        ASSERT_TRUE(rtn.ok());
        const GroupErrors ours = Errors(w, *hqq);
        const GroupErrors theirs = Errors(w, *rtn);
        // Never worse per group on the objective that picks the result
        // (float32 sums inside, float64 here: a few ulps of slack).
        EXPECT_TRUE(ours.squared.le(theirs.squared * (1 + 1e-5)).all().item<bool>())
            << "worst ratio " << (ours.squared / theirs.squared).max().item<double>();
        // Strictly better on average, on both norms.
        const double squared_ratio =
            ours.squared.sum().item<double>() / theirs.squared.sum().item<double>();
        const double lp_ratio = ours.lp.sum().item<double>() / theirs.lp.sum().item<double>();
        EXPECT_LT(squared_ratio, 1.0);
        EXPECT_LT(lp_ratio, 1.0);
        if (bits <= 3) EXPECT_LT(squared_ratio, 0.95) << "a real gain where RTN is coarse";
      }
    }
  }
}

TEST(Hqq, SymmetricKeepsTheMidpointZeroAndBeatsSymmetricRtn) {
  const at::Tensor w = HeavyTailed(32, 256, 4);
  for (int bits : {2, 4, 8}) {
    const HqqOptions o = Options(bits, /*symmetric=*/true, 64);
    SCOPED_TRACE(Describe(o));
    absl::StatusOr<QuantizedTensor> hqq = QuantizeHqq(w, o, "w");
    ASSERT_TRUE(hqq.ok()) << hqq.status();
    EXPECT_TRUE(hqq->zeros.eq(1 << (bits - 1)).all().item<bool>());
    const GroupErrors ours = Errors(w, *hqq);
    const GroupErrors theirs = Errors(w, *QuantizeRtn(w, o.grid, "w"));
    EXPECT_TRUE(ours.squared.le(theirs.squared * (1 + 1e-5)).all().item<bool>());
    EXPECT_LT(ours.squared.sum().item<double>(), theirs.squared.sum().item<double>());
  }
}

TEST(Hqq, MoreIterationsNeverHurtAGroup) {
  // The iterates of a shorter run are a prefix of a longer one's candidates.
  const at::Tensor w = HeavyTailed(32, 256, 5);
  const HqqOptions few = Options(3, false, 64, 3);
  const HqqOptions many = Options(3, false, 64, 30);
  const GroupErrors after_few = Errors(w, *QuantizeHqq(w, few, "w"));
  const GroupErrors after_many = Errors(w, *QuantizeHqq(w, many, "w"));
  EXPECT_TRUE(after_many.squared.le(after_few.squared * (1 + 1e-5)).all().item<bool>());
  EXPECT_LT(after_many.squared.sum().item<double>(), after_few.squared.sum().item<double>());
}

TEST(Hqq, ScalingTheWeightByAPowerOfTwoScalesOnlyTheScales) {
  const at::Tensor w = HeavyTailed(16, 256, 6);
  const HqqOptions o = Options(3, false, 64);
  absl::StatusOr<QuantizedTensor> base = QuantizeHqq(w, o, "w");
  ASSERT_TRUE(base.ok());
  for (double factor : {1.0 / 8, 16.0}) {
    SCOPED_TRACE(factor);
    absl::StatusOr<QuantizedTensor> scaled = QuantizeHqq(w * factor, o, "w");
    ASSERT_TRUE(scaled.ok());
    EXPECT_TRUE(scaled->codes.equal(base->codes));
    EXPECT_TRUE(scaled->zeros.equal(base->zeros));
    EXPECT_TRUE(scaled->scales.equal((base->scales.to(at::kFloat) * factor).to(at::kHalf)));
  }
}

TEST(Hqq, ValidOutputOnEveryDtypeAndOddRows) {
  const at::Tensor weights = TrickyWeights(24, 256, 7);
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const at::Tensor w = weights.to(dtype);
    for (int bits : {2, 4, 8}) {
      for (bool symmetric : {false, true}) {
        for (int64_t group_size : {-1, 32}) {
          const HqqOptions o = Options(bits, symmetric, group_size);
          SCOPED_TRACE(absl::StrCat(Describe(o), ", ", c10::toString(dtype)));
          absl::StatusOr<QuantizedTensor> hqq = QuantizeHqq(w, o, "w");
          ASSERT_TRUE(hqq.ok()) << hqq.status();
          ASSERT_TRUE(ValidateQuantized(*hqq, "w").ok());
          EXPECT_EQ(hqq->group_size, group_size > 0 ? group_size : 256);
          EXPECT_TRUE(hqq->scales.to(at::kFloat).gt(0).all().item<bool>());
          if (symmetric) EXPECT_TRUE(hqq->zeros.eq(1 << (bits - 1)).all().item<bool>());
          // The codes are RTN's rounding on the stored grid: the float16 scale
          // as stored is the one they were computed with.
          const int64_t groups = 256 / hqq->group_size;
          const at::Tensor scale = hqq->scales.to(at::kFloat).view({24, groups, 1});
          const at::Tensor zero = hqq->zeros.to(at::kFloat).view({24, groups, 1});
          const at::Tensor codes = w.to(at::kFloat)
                                       .view({24, groups, hqq->group_size})
                                       .div(scale)
                                       .round_()
                                       .add_(zero)
                                       .clamp_(0, (1 << bits) - 1)
                                       .to(at::kByte)
                                       .view({24, 256});
          EXPECT_TRUE(codes.equal(hqq->codes));
          // Against RTN on the weight as stored (float32 of the dtype).
          const at::Tensor stored = w.to(at::kFloat);
          const GroupErrors ours = Errors(stored, *hqq);
          const GroupErrors theirs = Errors(stored, *QuantizeRtn(w, o.grid, "w"));
          EXPECT_TRUE(ours.squared.le(theirs.squared * (1 + 1e-5) + 1e-30).all().item<bool>());
          // The all-zero row stays exactly zero.
          EXPECT_TRUE(Dequantize(*hqq, at::kFloat)[0].eq(0).all().item<bool>());
        }
      }
    }
  }
}

TEST(Hqq, RejectsBadOptionsAndWeightsNamingTheFieldOrTensor) {
  const at::Tensor w = at::randn({8, 96});
  ExpectInvalidArgument(
      QuantizeHqq(w, Options(4, false, 64), "model.layers.0.mlp.up_proj.weight").status(),
      {"model.layers.0.mlp.up_proj.weight", "[8, 96]", "group_size 64", "in_features 96"});
  ExpectInvalidArgument(QuantizeHqqReference(w, Options(4, false, 64), "t").status(),
                        {"'t'", "[8, 96]"});
  ExpectInvalidArgument(QuantizeHqq(w, Options(1, false, 0), "t").status(), {"bits 1"});
  ExpectInvalidArgument(QuantizeHqq(w, Options(9, false, 0), "t").status(), {"bits 9"});
  ExpectInvalidArgument(QuantizeHqq(w, Options(4, false, -2), "t").status(), {"group_size -2"});
  HqqOptions o = Options(4, false, 0, -1);
  ExpectInvalidArgument(QuantizeHqq(w, o, "t").status(), {"iterations -1"});
  for (double p : {0.0, 1.5, std::nan("")}) {
    o = Options(4, false, 0);
    o.lp_norm = p;
    ExpectInvalidArgument(ValidateHqqOptions(o), {"lp_norm"});
  }
  for (double beta : {0.0, -1.0, std::numeric_limits<double>::infinity()}) {
    o = Options(4, false, 0);
    o.beta = beta;
    ExpectInvalidArgument(QuantizeHqqReference(w, o, "t").status(), {"beta"});
  }
  o = Options(4, false, 0);
  o.beta_growth = 0.5;
  ExpectInvalidArgument(QuantizeHqq(w, o, "t").status(), {"beta_growth 0.5"});
  ExpectInvalidArgument(QuantizeHqq(at::randn({96}), Options(4, false, 0), "norm").status(),
                        {"'norm'", "[96]", "2-D"});
  at::Tensor with_nan = w.clone();
  with_nan[3][5] = std::numeric_limits<float>::quiet_NaN();
  ExpectInvalidArgument(QuantizeHqq(with_nan, Options(4, false, 32), "t").status(),
                        {"'t'", "[8, 96]", "NaN or Inf"});
  at::Tensor with_inf = w.to(at::kHalf);
  with_inf[0][0] = std::numeric_limits<float>::infinity();
  ExpectInvalidArgument(QuantizeHqq(with_inf, Options(3, true, 0), "t").status(),
                        {"'t'", "NaN or Inf"});
  ExpectInvalidArgument(QuantizeHqqReference(with_inf, Options(3, true, 0), "t").status(),
                        {"'t'", "NaN or Inf"});
}

}  // namespace
}  // namespace compress::engine
