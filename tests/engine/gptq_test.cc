// GPTQ against a naive float64 implementation (no lazy blocks, explicit
// loops) and against RTN on the layer's output error.
#include "worker/engine/quant/gptq.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "tests/engine/test_util.h"

namespace compress::engine {
namespace {

using testing::ExpectInvalidArgument;

// Inputs whose channels are correlated and unequal in size, as real
// activations are: X = Z A with a random mixing A and column scales.
at::Tensor CorrelatedHessian(int64_t in, int64_t tokens, uint64_t seed) {
  at::manual_seed(seed);
  const at::Tensor z = at::randn({tokens, in}, at::kDouble);
  const at::Tensor mix = at::eye(in, at::kDouble) + 0.4 * at::randn({in, in}, at::kDouble);
  const at::Tensor x = z.mm(mix) * at::linspace(0.2, 3.0, in, at::kDouble);
  return x.t().mm(x);
}

// The textbook algorithm, one column at a time in float64, every later
// column updated at once; the grid of each group from RTN on the columns as
// they stand when the group starts (static groups: from the original).
at::Tensor NaiveGptq(const at::Tensor& weight, const at::Tensor& hessian, const GptqOptions& o) {
  const int64_t rows = weight.size(0), columns = weight.size(1);
  const int64_t group_size = o.grid.group_size > 0 ? o.grid.group_size : columns;
  at::Tensor w = weight.to(at::kDouble).clone();
  at::Tensor h = hessian.to(at::kDouble).clone();
  std::vector<int64_t> order(columns);
  for (int64_t i = 0; i < columns; ++i) order[i] = i;
  const bool static_groups = group_size == columns || o.act_order;
  at::Tensor scales, zeros;
  RtnOptions grid = o.grid;
  grid.group_size = group_size;
  if (static_groups) {
    QuantizedTensor initial = *QuantizeRtn(w.to(at::kFloat), grid, "w");
    scales = initial.scales.to(at::kDouble);
    zeros = initial.zeros.to(at::kDouble);
  } else {
    scales = at::zeros({rows, columns / group_size}, at::kDouble);
    zeros = at::zeros({rows, columns / group_size}, at::kDouble);
  }
  if (o.act_order) {
    std::vector<double> d(columns);
    for (int64_t i = 0; i < columns; ++i) d[i] = h[i][i].item<double>();
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return d[a] > d[b]; });
  }
  const at::Tensor perm = at::tensor(order, at::kLong);
  w = w.index_select(1, perm);
  h = h.index_select(0, perm).index_select(1, perm);
  h.diagonal().add_(o.dampening * h.diagonal().mean().item<double>());
  const at::Tensor u = at::linalg_cholesky(at::inverse(h)).t();  // upper factor of H^-1
  const double qmax = (1 << o.grid.bits) - 1;
  at::Tensor result = at::zeros({rows, columns}, at::kDouble);
  for (int64_t i = 0; i < columns; ++i) {
    const int64_t column = order[i], group = column / group_size;
    if (!static_groups && i % group_size == 0) {
      QuantizedTensor p = *QuantizeRtn(w.narrow(1, i, group_size).to(at::kFloat), grid, "w");
      scales.select(1, group).copy_(p.scales.select(1, 0).to(at::kDouble));
      zeros.select(1, group).copy_(p.zeros.select(1, 0).to(at::kDouble));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const double s = scales[r][group].item<double>(), z = zeros[r][group].item<double>();
      const double x = w[r][i].item<double>();
      const double code = std::min(std::max(std::nearbyint(x / s) + z, 0.0), qmax);
      const double value = (code - z) * s;
      result[r][column] = value;
      const double error = (x - value) / u[i][i].item<double>();
      for (int64_t j = i + 1; j < columns; ++j) {
        w[r][j] = w[r][j].item<double>() - error * u[i][j].item<double>();
      }
    }
  }
  return result;
}

GptqOptions Options(int bits, int64_t group_size, bool act_order = false, int64_t block = 128) {
  GptqOptions o;
  o.grid.bits = bits;
  o.grid.group_size = group_size;
  o.act_order = act_order;
  o.block_size = block;
  return o;
}

TEST(Gptq, LazyBlocksAgreeWithTheNaiveFloat64Algorithm) {
  at::manual_seed(1);
  const at::Tensor w = at::randn({6, 32});
  const at::Tensor h = CorrelatedHessian(32, 200, 2);
  for (const GptqOptions& o : {Options(3, -1), Options(4, 8, false, 5), Options(3, 16, false, 16),
                               Options(2, 8, true, 7)}) {
    SCOPED_TRACE(::testing::Message() << "bits " << o.grid.bits << " group " << o.grid.group_size
                                      << " act_order " << o.act_order << " block " << o.block_size);
    absl::StatusOr<GptqResult> gptq = QuantizeGptq(w, h.to(at::kFloat), o, "w");
    ASSERT_TRUE(gptq.ok()) << gptq.status();
    ASSERT_TRUE(ValidateQuantized(gptq->quantized, "w").ok());
    const at::Tensor ours = Dequantize(gptq->quantized, at::kFloat).to(at::kDouble);
    const at::Tensor naive = NaiveGptq(w, h, o);
    // float32 against float64: a value may land on the other side of a
    // rounding boundary now and then, never often.
    const double mismatched = (ours - naive).abs().gt(1e-4).to(at::kDouble).mean().item<double>();
    EXPECT_LT(mismatched, 0.02);
    EXPECT_NEAR(RelativeOutputError(w, ours, h), RelativeOutputError(w, naive, h),
                0.05 * RelativeOutputError(w, naive, h));
  }
}

TEST(Gptq, OutputErrorIsBelowRtnAtEveryWidthAndGrouping) {
  at::manual_seed(3);
  const at::Tensor w = at::randn({64, 128});
  const at::Tensor h = CorrelatedHessian(128, 512, 4);
  for (int bits : {2, 3, 4, 8}) {
    for (int64_t group : {int64_t{-1}, int64_t{32}}) {
      for (bool act_order : {false, true}) {
        SCOPED_TRACE(::testing::Message() << bits << " bits, group " << group << " act_order " << act_order);
        GptqOptions o = Options(bits, group, act_order);
        absl::StatusOr<GptqResult> gptq = QuantizeGptq(w, h.to(at::kFloat), o, "w");
        ASSERT_TRUE(gptq.ok()) << gptq.status();
        const at::Tensor rtn = Dequantize(*QuantizeRtn(w, o.grid, "w"), at::kFloat);
        const double gptq_error =
            RelativeOutputError(w, Dequantize(gptq->quantized, at::kFloat), h);
        const double rtn_error = RelativeOutputError(w, rtn, h);
        EXPECT_LT(gptq_error, 0.8 * rtn_error);
        EXPECT_EQ(gptq->retries, 0);
      }
    }
  }
}

TEST(Gptq, ActOrderKeepsStaticGroupsFromTheOriginalWeight) {
  at::manual_seed(5);
  const at::Tensor w = at::randn({8, 64});
  const at::Tensor h = CorrelatedHessian(64, 300, 6);
  GptqOptions o = Options(4, 16, /*act_order=*/true);
  absl::StatusOr<GptqResult> gptq = QuantizeGptq(w, h.to(at::kFloat), o, "w");
  ASSERT_TRUE(gptq.ok());
  const QuantizedTensor rtn = *QuantizeRtn(w, o.grid, "w");
  EXPECT_TRUE(gptq->quantized.scales.equal(rtn.scales));
  EXPECT_TRUE(gptq->quantized.zeros.equal(rtn.zeros));
  EXPECT_FALSE(gptq->quantized.codes.equal(rtn.codes));  // the codes did move
}

TEST(Gptq, DeadInputsAreZeroedAndIndefiniteHessiansRetryWithMoreDampening) {
  at::manual_seed(7);
  const at::Tensor w = at::randn({4, 16});
  at::Tensor h = CorrelatedHessian(16, 100, 8).to(at::kFloat);
  h.index_put_({3}, 0);
  h.index_put_({at::indexing::Slice(), 3}, 0);  // input 3 was always zero
  absl::StatusOr<GptqResult> gptq = QuantizeGptq(w, h, Options(4, -1), "w");
  ASSERT_TRUE(gptq.ok()) << gptq.status();
  EXPECT_EQ(gptq->dead_columns, 1);
  EXPECT_TRUE(Dequantize(gptq->quantized, at::kFloat).select(1, 3).eq(0).all().item<bool>());

  // Not positive semi-definite: eigenvalues 1 +- 2 along the first two inputs.
  at::Tensor bad = at::eye(8);
  bad[0][1] = 2;
  bad[1][0] = 2;
  gptq = QuantizeGptq(at::randn({4, 8}), bad, Options(4, -1), "w");
  ASSERT_TRUE(gptq.ok()) << gptq.status();
  EXPECT_EQ(gptq->retries, 3);  // 0.01, 0.1, 1 of the mean diagonal fail; 10 works
  EXPECT_DOUBLE_EQ(gptq->dampening_used, 10.0);
  EXPECT_TRUE(at::isfinite(Dequantize(gptq->quantized, at::kFloat)).all().item<bool>());
  GptqOptions few = Options(4, -1);
  few.max_dampening_retries = 1;
  EXPECT_EQ(QuantizeGptq(at::randn({4, 8}), bad, few, "w").status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(Gptq, BadInputsNameTheTensor) {
  const at::Tensor w = at::randn({4, 16});
  ExpectInvalidArgument(QuantizeGptq(w, at::eye(8), Options(4, -1), "layer.w").status(),
                        {"layer.w", "16 inputs"});
  ExpectInvalidArgument(QuantizeGptq(w, at::eye(16), Options(4, 5), "layer.w").status(),
                        {"layer.w", "group_size 5"});
  ExpectInvalidArgument(QuantizeGptq(w, at::eye(16), Options(9, -1), "layer.w").status(), {"bits 9"});
  at::Tensor nan = at::eye(16);
  nan[2][2] = NAN;
  ExpectInvalidArgument(QuantizeGptq(w, nan, Options(4, -1), "layer.w").status(),
                        {"layer.w", "NaN"});
  GptqOptions o = Options(4, -1);
  o.dampening = 0;
  ExpectInvalidArgument(QuantizeGptq(w, at::eye(16), o, "layer.w").status(), {"dampening"});
}

}  // namespace
}  // namespace compress::engine
