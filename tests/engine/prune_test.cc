// Pruning against brute-force references (every subset of a group, every
// rank), the N:M property, the sparsity reached, the ranking of the methods
// on a layer's output error, SparseGPT against a naive float64
// implementation, and GPTQ keeping a pruning mask.
#include "worker/engine/prune/prune.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <vector>

#include "tests/engine/test_util.h"
#include "worker/engine/quant/gptq.h"
#include "worker/engine/quant/rtn.h"

namespace compress::engine {
namespace {

using testing::ExpectInvalidArgument;

PruneOptions Unstructured(PruneMethod method, double sparsity) {
  PruneOptions o;
  o.method = method;
  o.sparsity = sparsity;
  return o;
}

PruneOptions Pattern(PruneMethod method, int64_t n, int64_t m) {
  PruneOptions o;
  o.method = method;
  o.n = n;
  o.m = m;
  return o;
}

// Inputs whose channels are correlated and unequal in size, as real
// activations are: X = Z A with a random mixing A and column scales.
at::Tensor CorrelatedInputs(int64_t in, int64_t tokens, uint64_t seed) {
  at::manual_seed(seed);
  const at::Tensor z = at::randn({tokens, in}, at::kDouble);
  const at::Tensor mix = at::eye(in, at::kDouble) + 0.4 * at::randn({in, in}, at::kDouble);
  return z.mm(mix) * at::linspace(0.2, 3.0, in, at::kDouble);
}

// tr((W - P) H (W - P)^T) / tr(W H W^T) with H = X^T X.
double OutputError(const at::Tensor& w, const at::Tensor& p, const at::Tensor& x) {
  return RelativeOutputError(w, p, x.t().mm(x));
}

// ---------------------------------------------------------------- references

// The kept set of one group by brute force: of every subset of `keep`
// indices, the one with the largest score sum (scores distinct).
std::set<int64_t> BestSubset(const std::vector<double>& scores, int64_t keep) {
  const int64_t size = static_cast<int64_t>(scores.size());
  std::set<int64_t> best;
  double best_sum = -1;
  for (uint32_t bits = 0; bits < (1u << size); ++bits) {
    if (__builtin_popcount(bits) != keep) continue;
    double sum = 0;
    std::set<int64_t> subset;
    for (int64_t i = 0; i < size; ++i) {
      if (bits & (1u << i)) {
        sum += scores[i];
        subset.insert(i);
      }
    }
    if (sum > best_sum) {
      best_sum = sum;
      best = subset;
    }
  }
  return best;
}

// The reference mask: N:M by BestSubset per group of m; unstructured per
// row by BestSubset over the row; over the tensor by rank (a weight is
// pruned when fewer than k scores are below it).
at::Tensor ReferenceMask(const at::Tensor& scores, const PruneOptions& o, bool per_row) {
  const at::Tensor s = scores.to(at::kDouble).contiguous();
  const int64_t rows = s.size(0), columns = s.size(1);
  at::Tensor keep = at::zeros({rows, columns}, at::kBool);
  auto value = [&](int64_t r, int64_t c) { return s[r][c].item<double>(); };
  if (o.m > 0 || per_row) {
    const int64_t group = o.m > 0 ? o.m : columns;
    const int64_t kept = o.m > 0 ? o.n : columns - std::llround(o.sparsity * columns);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < columns; g += group) {
        std::vector<double> part;
        for (int64_t c = g; c < g + group; ++c) part.push_back(value(r, c));
        for (int64_t i : BestSubset(part, kept)) keep[r][g + i] = true;
      }
    }
    return keep;
  }
  const int64_t pruned = std::llround(o.sparsity * rows * columns);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < columns; ++c) {
      int64_t below = 0;
      for (int64_t r2 = 0; r2 < rows; ++r2) {
        for (int64_t c2 = 0; c2 < columns; ++c2) below += value(r2, c2) < value(r, c);
      }
      keep[r][c] = below >= pruned;
    }
  }
  return keep;
}

// SparseGPT in float64, one column at a time, every later column updated at
// once (no lazy blocks); the masks chosen as the paper's reference code
// does: per block of block_size columns over all rows, or per run of m.
at::Tensor NaiveSparseGpt(const at::Tensor& weight, const at::Tensor& hessian,
                          const PruneOptions& o, at::Tensor* mask) {
  const int64_t rows = weight.size(0), columns = weight.size(1);
  at::Tensor w = weight.to(at::kDouble).clone();
  at::Tensor h = hessian.to(at::kDouble).clone();
  h.diagonal().add_(o.dampening * h.diagonal().mean().item<double>());
  const at::Tensor u = at::linalg_cholesky(at::inverse(h)).t();  // upper factor of H^-1
  at::Tensor keep = at::ones({rows, columns}, at::kBool);
  at::Tensor result = at::zeros({rows, columns}, at::kDouble);
  for (int64_t begin = 0; begin < columns; begin += o.block_size) {
    const int64_t end = std::min(begin + o.block_size, columns);
    if (o.m == 0) {
      // Scores of the block as it stands; the k lowest pruned (by rank).
      const at::Tensor d = u.diagonal().narrow(0, begin, end - begin);
      const at::Tensor scores = w.narrow(1, begin, end - begin).square() / d.square();
      PruneOptions tensor_wide = o;
      keep.narrow(1, begin, end - begin).copy_(ReferenceMask(scores, tensor_wide, false));
    }
    for (int64_t i = begin; i < end; ++i) {
      if (o.m > 0 && (i - begin) % o.m == 0) {
        const at::Tensor d = u.diagonal().narrow(0, i, o.m);
        const at::Tensor scores = w.narrow(1, i, o.m).square() / d.square();
        keep.narrow(1, i, o.m).copy_(ReferenceMask(scores, o, true));
      }
      for (int64_t r = 0; r < rows; ++r) {
        const double x = w[r][i].item<double>();
        const double value = keep[r][i].item<bool>() ? x : 0.0;
        result[r][i] = value;
        const double error = (x - value) / u[i][i].item<double>();
        for (int64_t j = i + 1; j < columns; ++j) {
          w[r][j] = w[r][j].item<double>() - error * u[i][j].item<double>();
        }
      }
    }
  }
  *mask = keep;
  return result;
}

// GPTQ with a pruning mask in float64, one column at a time, every later
// column updated at once: per-channel grids from the (pruned) weight, or
// each group's from its columns as they stand, pruned entries counted as 0;
// a pruned weight's value is 0 and its deviation compensated.
at::Tensor NaiveMaskedGptq(const at::Tensor& weight, const at::Tensor& hessian,
                           const at::Tensor& keep, const GptqOptions& o) {
  const int64_t rows = weight.size(0), columns = weight.size(1);
  const int64_t group_size = o.grid.group_size > 0 ? o.grid.group_size : columns;
  at::Tensor w = (weight.to(at::kDouble) * keep).clone();
  at::Tensor h = hessian.to(at::kDouble).clone();
  h.diagonal().add_(o.dampening * h.diagonal().mean().item<double>());
  const at::Tensor u = at::linalg_cholesky(at::inverse(h)).t();
  RtnOptions grid = o.grid;
  grid.group_size = group_size;
  at::Tensor scales = at::zeros({rows, columns / group_size}, at::kDouble);
  at::Tensor zeros = at::zeros({rows, columns / group_size}, at::kDouble);
  const double qmax = (1 << o.grid.bits) - 1;
  at::Tensor result = at::zeros({rows, columns}, at::kDouble);
  for (int64_t i = 0; i < columns; ++i) {
    const int64_t group = i / group_size;
    if (i % group_size == 0) {
      const at::Tensor part = w.narrow(1, i, group_size) * keep.narrow(1, i, group_size);
      QuantizedTensor p = *QuantizeRtn(part.to(at::kFloat), grid, "w");
      scales.select(1, group).copy_(p.scales.select(1, 0).to(at::kDouble));
      zeros.select(1, group).copy_(p.zeros.select(1, 0).to(at::kDouble));
    }
    // All rows at once (float64, round half to even as nearbyint).
    const at::Tensor s = scales.select(1, group), z = zeros.select(1, group);
    const at::Tensor x = w.select(1, i).clone();
    const at::Tensor code = (x / s).round().add(z).clamp(0, qmax);
    const at::Tensor value = at::where(keep.select(1, i), (code - z) * s, at::zeros_like(x));
    result.select(1, i).copy_(value);
    const at::Tensor error = (x - value) / u[i][i].item<double>();
    if (i + 1 < columns) {
      w.narrow(1, i + 1, columns - i - 1).sub_(error.unsqueeze(1) * u[i].narrow(0, i + 1, columns - i - 1).unsqueeze(0));
    }
  }
  (void)rows;
  return result;
}

// At most n nonzeros in every run of m consecutive inputs of a row.
void ExpectNm(const at::Tensor& t, int64_t n, int64_t m) {
  const at::Tensor nonzero = (t.reshape({t.size(0), t.size(1) / m, m}) != 0).sum(-1);
  EXPECT_LE(nonzero.max().item<int64_t>(), n);
}

// ---------------------------------------------------------------- masks

TEST(PruneMaskTest, EveryPatternKeepsExactlyTheBruteForceSet) {
  at::manual_seed(1);
  const at::Tensor w = at::randn({6, 16});
  const at::Tensor sum_square = at::rand({16}, at::kDouble) * 10 + 0.1;
  const at::Tensor wanda_scores = w.abs() * sum_square.sqrt().to(at::kFloat);
  struct Case {
    PruneOptions options;
    at::Tensor scores;
    bool per_row;
  };
  const std::vector<Case> cases = {
      {Unstructured(PruneMethod::kMagnitude, 0.5), w.abs(), false},
      {Unstructured(PruneMethod::kMagnitude, 0.3), w.abs(), false},
      {Pattern(PruneMethod::kMagnitude, 2, 4), w.abs(), true},
      {Pattern(PruneMethod::kMagnitude, 4, 8), w.abs(), true},
      {Pattern(PruneMethod::kMagnitude, 1, 4), w.abs(), true},
      {Unstructured(PruneMethod::kWanda, 0.5), wanda_scores, true},
      {Unstructured(PruneMethod::kWanda, 0.7), wanda_scores, true},
      {Pattern(PruneMethod::kWanda, 2, 4), wanda_scores, true},
      {Pattern(PruneMethod::kWanda, 4, 8), wanda_scores, true},
  };
  for (const Case& c : cases) {
    const PruneOptions& o = c.options;
    SCOPED_TRACE(::testing::Message() << PruneMethodName(o.method) << " sparsity " << o.sparsity
                                      << " " << o.n << ":" << o.m);
    absl::StatusOr<PruneResult> result =
        o.method == PruneMethod::kWanda ? PruneWanda(w, sum_square, o, "w")
                                        : PruneMagnitude(w, o, "w");
    ASSERT_TRUE(result.ok()) << result.status();
    const at::Tensor expected = ReferenceMask(c.scores, o, c.per_row);
    EXPECT_TRUE(result->mask.equal(expected));
    // Kept weights unchanged, the rest exactly zero.
    EXPECT_TRUE(result->pruned.equal(w * expected));
    EXPECT_EQ(result->pruned.scalar_type(), w.scalar_type());
  }
}

TEST(PruneMaskTest, TiesArePrunedInInputOrder) {
  const at::Tensor w = at::ones({2, 8});
  absl::StatusOr<PruneResult> nm = PruneMagnitude(w, Pattern(PruneMethod::kMagnitude, 2, 4), "w");
  ASSERT_TRUE(nm.ok());
  const at::Tensor expected_row = at::tensor({0, 0, 1, 1, 0, 0, 1, 1}).to(at::kBool);
  EXPECT_TRUE(nm->mask.equal(expected_row.unsqueeze(0).expand({2, 8})));
  absl::StatusOr<PruneResult> tensor =
      PruneMagnitude(w, Unstructured(PruneMethod::kMagnitude, 0.25), "w");
  ASSERT_TRUE(tensor.ok());
  at::Tensor first_four = at::ones({2, 8}, at::kBool);
  first_four[0].narrow(0, 0, 4).fill_(false);
  EXPECT_TRUE(tensor->mask.equal(first_four));
}

TEST(PruneMaskTest, SemiStructuredPatternsHoldForEveryMethodAndDtype) {
  const at::Tensor x = CorrelatedInputs(64, 256, 3);
  const at::Tensor h = x.t().mm(x);
  const at::Tensor sum_square = x.square().sum(0);
  at::manual_seed(4);
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const at::Tensor w = (at::randn({24, 64}) * 0.05).to(dtype);
    for (auto [n, m] : std::vector<std::pair<int64_t, int64_t>>{{2, 4}, {4, 8}, {1, 4}}) {
      for (PruneMethod method : {PruneMethod::kMagnitude, PruneMethod::kWanda, PruneMethod::kSparseGpt}) {
        SCOPED_TRACE(::testing::Message() << PruneMethodName(method) << " " << n << ":" << m
                                          << " dtype " << dtype);
        absl::StatusOr<PruneResult> r = Prune(w, sum_square, h, Pattern(method, n, m), "w");
        ASSERT_TRUE(r.ok()) << r.status();
        EXPECT_EQ(r->pruned.scalar_type(), dtype);
        ExpectNm(r->pruned, n, m);
        EXPECT_EQ((r->mask.reshape({24, 64 / m, m}).sum(-1) == n).all().item<bool>(), true);
        EXPECT_TRUE((r->pruned.masked_select(r->mask.logical_not()) == 0).all().item<bool>());
        EXPECT_DOUBLE_EQ(r->sparsity, 1.0 - static_cast<double>(n) / m);
      }
    }
  }
}

TEST(PruneMaskTest, UnstructuredSparsityIsTheRequestedOne) {
  const at::Tensor x = CorrelatedInputs(64, 256, 5);
  const at::Tensor h = x.t().mm(x);
  const at::Tensor sum_square = x.square().sum(0);
  at::manual_seed(6);
  const at::Tensor w = at::randn({32, 64});
  for (double sparsity : {0.25, 0.5, 0.75}) {
    for (PruneMethod method : {PruneMethod::kMagnitude, PruneMethod::kWanda, PruneMethod::kSparseGpt}) {
      SCOPED_TRACE(::testing::Message() << PruneMethodName(method) << " " << sparsity);
      PruneOptions o = Unstructured(method, sparsity);
      o.block_size = 16;
      absl::StatusOr<PruneResult> r = Prune(w, sum_square, h, o, "w");
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_DOUBLE_EQ(r->sparsity, sparsity);
      EXPECT_DOUBLE_EQ(ZeroFraction(r->pruned), sparsity);
      EXPECT_DOUBLE_EQ(1.0 - r->mask.to(at::kDouble).mean().item<double>(), sparsity);
      if (method == PruneMethod::kWanda) {
        // Per output row: every row the same share.
        EXPECT_TRUE((r->mask.sum(1) == static_cast<int64_t>(std::llround((1 - sparsity) * 64))).all().item<bool>());
      }
    }
  }
  // A share that does not divide: round(sparsity * count) weights.
  absl::StatusOr<PruneResult> r = PruneWanda(w, sum_square, Unstructured(PruneMethod::kWanda, 0.3), "w");
  ASSERT_TRUE(r.ok());
  EXPECT_DOUBLE_EQ(r->sparsity, 19.0 / 64);  // round(19.2) per row
}

// ---------------------------------------------------------------- quality

// Inputs of very unequal energy: a weight's size says little about its
// effect, its size times its input's norm does.
TEST(PruneQualityTest, WandaKeepsTheWeightsOnLoudInputsAndLosesLessThanMagnitude) {
  at::manual_seed(7);
  const int64_t in = 32;
  // Half the inputs 20x louder than the other half, alternating.
  at::Tensor scale = at::ones({in}, at::kDouble);
  scale.index_fill_(0, at::arange(0, in, 2), 20.0);
  const at::Tensor x = at::randn({512, in}, at::kDouble) * scale;
  // Weights on the loud inputs smaller (but not 20x smaller).
  at::Tensor w = at::randn({16, in});
  w.index_put_({at::indexing::Slice(), at::arange(0, in, 2)},
               w.index({at::indexing::Slice(), at::arange(0, in, 2)}) * 0.2);
  const at::Tensor sum_square = x.square().sum(0);
  for (const PruneOptions& o : {Unstructured(PruneMethod::kMagnitude, 0.5),
                                Pattern(PruneMethod::kMagnitude, 2, 4)}) {
    PruneOptions wanda_options = o;
    wanda_options.method = PruneMethod::kWanda;
    absl::StatusOr<PruneResult> magnitude = PruneMagnitude(w, o, "w");
    absl::StatusOr<PruneResult> wanda = PruneWanda(w, sum_square, wanda_options, "w");
    ASSERT_TRUE(magnitude.ok() && wanda.ok());
    EXPECT_FALSE(magnitude->mask.equal(wanda->mask)) << "the two must disagree";
    // Wanda keeps more of the loud inputs' weights than magnitude does.
    const at::Tensor loud = at::arange(0, in, 2);
    EXPECT_GT(wanda->mask.index_select(1, loud).sum().item<int64_t>(),
              magnitude->mask.index_select(1, loud).sum().item<int64_t>());
    const double magnitude_error = OutputError(w, magnitude->pruned, x);
    const double wanda_error = OutputError(w, wanda->pruned, x);
    EXPECT_LT(wanda_error, 0.5 * magnitude_error);
  }
}

TEST(PruneQualityTest, SparseGptBeatsWandaBeatsMagnitudeOnCorrelatedInputs) {
  const at::Tensor x = CorrelatedInputs(128, 1024, 8);
  const at::Tensor h = x.t().mm(x);
  const at::Tensor sum_square = x.square().sum(0);
  at::manual_seed(9);
  const at::Tensor w = at::randn({64, 128}) * 0.05;
  for (PruneOptions o : {Unstructured(PruneMethod::kMagnitude, 0.5), Pattern(PruneMethod::kMagnitude, 2, 4),
                         Pattern(PruneMethod::kMagnitude, 4, 8)}) {
    SCOPED_TRACE(::testing::Message() << o.n << ":" << o.m);
    double errors[3];
    int k = 0;
    for (PruneMethod method : {PruneMethod::kMagnitude, PruneMethod::kWanda, PruneMethod::kSparseGpt}) {
      o.method = method;
      absl::StatusOr<PruneResult> r = Prune(w, sum_square, h, o, "w");
      ASSERT_TRUE(r.ok()) << r.status();
      errors[k++] = OutputError(w, r->pruned, x);
    }
    EXPECT_LT(errors[1], errors[0]);
    EXPECT_LT(errors[2], errors[1]);
    EXPECT_LT(errors[2], 0.8 * errors[1]) << "the weight updates are worth something";
  }
}

TEST(PruneSparseGptTest, MatchesANaiveFloat64Implementation) {
  const at::Tensor x = CorrelatedInputs(24, 256, 10);
  const at::Tensor h = x.t().mm(x);
  at::manual_seed(11);
  const at::Tensor w = at::randn({8, 24});
  for (PruneOptions o : {Unstructured(PruneMethod::kSparseGpt, 0.5), Unstructured(PruneMethod::kSparseGpt, 0.25),
                         Pattern(PruneMethod::kSparseGpt, 2, 4), Pattern(PruneMethod::kSparseGpt, 4, 8)}) {
    for (int64_t block : {8, 24}) {
      SCOPED_TRACE(::testing::Message() << o.sparsity << " " << o.n << ":" << o.m << " block " << block);
      o.block_size = block;
      absl::StatusOr<PruneResult> fast = PruneSparseGpt(w, h, o, "w");
      ASSERT_TRUE(fast.ok()) << fast.status();
      at::Tensor mask;
      const at::Tensor naive = NaiveSparseGpt(w, h, o, &mask);
      EXPECT_TRUE(fast->mask.equal(mask));
      EXPECT_TRUE(at::allclose(fast->pruned.to(at::kDouble), naive, 1e-4, 1e-5))
          << (fast->pruned.to(at::kDouble) - naive).abs().max().item<double>();
      EXPECT_EQ(fast->retries, 0);
    }
  }
}

TEST(PruneSparseGptTest, DeadInputsAreZeroedAndARankDeficientHessianIsDamped) {
  at::Tensor x = CorrelatedInputs(16, 8, 12);  // 8 tokens: rank 8 < 16
  x.select(1, 3).zero_();
  const at::Tensor h = x.t().mm(x);
  at::manual_seed(13);
  const at::Tensor w = at::randn({4, 16});
  absl::StatusOr<PruneResult> r = PruneSparseGpt(w, h, Pattern(PruneMethod::kSparseGpt, 2, 4), "w");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->dead_columns, 1);
  EXPECT_TRUE((r->pruned.select(1, 3) == 0).all().item<bool>());
  ExpectNm(r->pruned, 2, 4);
}

// ---------------------------------------------------------------- quantizing pruned weights

TEST(PrunedQuantizationTest, GptqWithTheMaskKeepsTheZerosAndCompensatesThem) {
  const at::Tensor x = CorrelatedInputs(128, 1024, 14);
  const at::Tensor h = x.t().mm(x);
  at::manual_seed(15);
  const at::Tensor w = at::randn({32, 128}) * 0.05;
  absl::StatusOr<PruneResult> pruned =
      PruneWanda(w, x.square().sum(0), Pattern(PruneMethod::kWanda, 2, 4), "w");
  ASSERT_TRUE(pruned.ok());
  int64_t filled_without_mask = 0;
  for (int bits : {3, 4}) {
    for (bool act_order : {false, true}) {
      for (int64_t group : {int64_t{-1}, int64_t{32}}) {
        SCOPED_TRACE(::testing::Message() << bits << " bits, act_order " << act_order << " group "
                                          << group);
        GptqOptions o;
        o.grid.bits = bits;
        o.grid.group_size = group;
        o.act_order = act_order;
        o.block_size = 16;
        absl::StatusOr<GptqResult> masked =
            QuantizeGptq(pruned->pruned, h.to(at::kFloat), o, "w", pruned->mask);
        absl::StatusOr<GptqResult> unmasked = QuantizeGptq(pruned->pruned, h.to(at::kFloat), o, "w");
        ASSERT_TRUE(masked.ok() && unmasked.ok()) << masked.status();
        ASSERT_TRUE(ValidateQuantized(masked->quantized, "w").ok());
        const at::Tensor values = Dequantize(masked->quantized, at::kFloat);
        EXPECT_TRUE((values.masked_select(pruned->mask.logical_not()) == 0).all().item<bool>());
        ExpectNm(values, 2, 4);
        const at::Tensor filled = Dequantize(unmasked->quantized, at::kFloat);
        filled_without_mask +=
            (filled.masked_select(pruned->mask.logical_not()) != 0).sum().item<int64_t>();
        // Against the pruned layer, masked GPTQ beats rounding it (which
        // keeps the zeros too); by less than dense GPTQ beats RTN, as half
        // the weights cannot take part in the compensation.
        const at::Tensor rtn = Dequantize(*QuantizeRtn(pruned->pruned, o.grid, "w"), at::kFloat);
        const double masked_error = OutputError(pruned->pruned, values, x);
        EXPECT_LT(masked_error, 0.95 * OutputError(pruned->pruned, rtn, x));
        if (!act_order) {
          // The textbook algorithm with the mask, in float64.
          const at::Tensor naive = NaiveMaskedGptq(pruned->pruned, h, pruned->mask, o);
          const at::Tensor ours = values.to(at::kDouble);
          EXPECT_LT((ours - naive).abs().gt(1e-4).to(at::kDouble).mean().item<double>(), 0.02);
          EXPECT_NEAR(masked_error, OutputError(pruned->pruned, naive, x), 0.05 * masked_error);
        }
      }
    }
  }
  // Without the mask, GPTQ's error feedback fills pruned weights in.
  EXPECT_GT(filled_without_mask, 0);
  // An all-true mask changes nothing.
  GptqOptions o;
  o.grid.group_size = 32;
  absl::StatusOr<GptqResult> plain = QuantizeGptq(w, h, o, "w");
  absl::StatusOr<GptqResult> all_kept =
      QuantizeGptq(w, h, o, "w", at::ones({32, 128}, at::kBool));
  ASSERT_TRUE(plain.ok() && all_kept.ok());
  EXPECT_TRUE(plain->quantized.codes.equal(all_kept->quantized.codes));
  ExpectInvalidArgument(QuantizeGptq(w, h, o, "w.q", at::ones({32, 64}, at::kBool)).status(),
                        {"w.q", "mask"});
}

TEST(PrunedQuantizationTest, KeepPrunedZerosSetsTheZeroPointAndRtnAlreadyKeepsZeros) {
  at::manual_seed(16);
  const at::Tensor w = at::randn({8, 64}) * 0.1;
  absl::StatusOr<PruneResult> pruned = PruneMagnitude(w, Pattern(PruneMethod::kMagnitude, 2, 4), "w");
  ASSERT_TRUE(pruned.ok());
  for (bool symmetric : {false, true}) {
    RtnOptions grid;
    grid.bits = 3;
    grid.symmetric = symmetric;
    grid.group_size = 16;
    absl::StatusOr<QuantizedTensor> q = QuantizeRtn(pruned->pruned, grid, "w");
    ASSERT_TRUE(q.ok());
    const at::Tensor before = q->codes.clone();
    ASSERT_TRUE(KeepPrunedZeros(pruned->mask, &*q, "w").ok());
    EXPECT_TRUE(q->codes.equal(before)) << "RTN maps an exact 0 to the zero point already";
    // Codes of pruned weights forced elsewhere come back to the zero point.
    q->codes.masked_fill_(pruned->mask.logical_not(), 0);
    q->zeros.fill_(symmetric ? 4 : 2);
    ASSERT_TRUE(KeepPrunedZeros(pruned->mask, &*q, "w").ok());
    EXPECT_TRUE((Dequantize(*q, at::kFloat).masked_select(pruned->mask.logical_not()) == 0)
                    .all()
                    .item<bool>());
  }
  QuantizedTensor q = *QuantizeRtn(w, RtnOptions(), "w");
  ExpectInvalidArgument(KeepPrunedZeros(at::ones({8, 32}, at::kBool), &q, "w.k"), {"w.k", "mask"});
}

// ---------------------------------------------------------------- errors

TEST(PruneOptionsTest, BadOptionsAndShapesAreInvalidArgumentNamingTheTensor) {
  ExpectInvalidArgument(ValidatePruneOptions(Unstructured(PruneMethod::kMagnitude, 1.0)),
                        {"sparsity", "(0, 1)"});
  ExpectInvalidArgument(ValidatePruneOptions(Unstructured(PruneMethod::kMagnitude, 0.0)),
                        {"sparsity"});
  ExpectInvalidArgument(ValidatePruneOptions(Pattern(PruneMethod::kWanda, 4, 4)), {"4:4", "N < M"});
  ExpectInvalidArgument(ValidatePruneOptions(Pattern(PruneMethod::kWanda, 0, 4)), {"0:4"});
  PruneOptions damped = Pattern(PruneMethod::kSparseGpt, 2, 4);
  damped.dampening = 0;
  ExpectInvalidArgument(ValidatePruneOptions(damped), {"dampening"});

  const at::Tensor w = at::randn({4, 6});
  ExpectInvalidArgument(PruneMagnitude(w, Pattern(PruneMethod::kMagnitude, 2, 4), "layer.w").status(),
                        {"layer.w", "[4, 6]", "does not divide"});
  ExpectInvalidArgument(PruneMagnitude(at::randn({8}), Unstructured(PruneMethod::kMagnitude, 0.5), "v")
                            .status(),
                        {"'v'", "2-D"});
  at::Tensor bad = at::randn({4, 8});
  bad[1][2] = NAN;
  ExpectInvalidArgument(PruneMagnitude(bad, Unstructured(PruneMethod::kMagnitude, 0.5), "nan.w").status(),
                        {"nan.w", "NaN"});
  ExpectInvalidArgument(
      PruneWanda(at::randn({4, 8}), at::ones({6}, at::kDouble), Pattern(PruneMethod::kWanda, 2, 4), "x.w")
          .status(),
      {"x.w", "8 inputs", "6 entries"});
  ExpectInvalidArgument(PruneSparseGpt(at::randn({4, 8}), at::eye(6), Pattern(PruneMethod::kSparseGpt, 2, 4),
                                       "h.w")
                            .status(),
                        {"h.w", "Hessian"});
}

}  // namespace
}  // namespace compress::engine
