// The training loop: schedule, AdamW and clipping against their formulas,
// accumulation against one larger batch, learning, determinism, checkpoints.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

#include "tests/engine/test_util.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/train/trainer.h"

namespace compress::engine {
namespace {

using testing::TempDir;

RandomModelOptions TinyModel() {
  RandomModelOptions o;
  o.hidden_size = 32;
  o.intermediate_size = 64;
  o.num_layers = 2;
  o.num_heads = 4;
  o.num_kv_heads = 2;
  o.vocab_size = 16;
  o.seed = 7;
  return o;
}

LlamaModel LoadTiny(const TempDir& dir) {
  EXPECT_TRUE(WriteRandomLlamaModel(TinyModel(), dir.path()).ok());
  absl::StatusOr<LlamaModel> model = LlamaModel::Load(dir.path());
  if (!model.ok()) std::abort();
  return std::move(model).value();
}

// A corpus with structure to learn: a repeating 5-token phrase.
std::vector<int32_t> PatternTokens(size_t n) {
  const int32_t phrase[] = {3, 1, 4, 1, 5};
  std::vector<int32_t> tokens(n);
  for (size_t i = 0; i < n; ++i) tokens[i] = phrase[i % 5];
  return tokens;
}

TrainOptions SmallRun(int64_t steps) {
  TrainOptions o;
  o.schedule = {/*peak=*/1e-2, /*minimum=*/1e-3, /*warmup_steps=*/3, /*total_steps=*/steps};
  o.batch_size = 4;
  o.sequence_length = 12;
  o.seed = 11;
  return o;
}

TEST(TrainerSchedule, WarmsUpLinearlyThenFollowsACosineToTheMinimum) {
  LearningRateSchedule s{/*peak=*/1.0, /*minimum=*/0.1, /*warmup_steps=*/4, /*total_steps=*/14};
  EXPECT_DOUBLE_EQ(s.At(0), 0.25);
  EXPECT_DOUBLE_EQ(s.At(3), 1.0);
  EXPECT_DOUBLE_EQ(s.At(4), 1.0);  // the cosine starts at the peak
  EXPECT_NEAR(s.At(13), 0.1, 1e-12);
  // Step 8 is 4 of the 9 decay steps in: minimum + (peak - minimum)/2 * (1 + cos(pi * 4/9)).
  EXPECT_NEAR(s.At(8), 0.1 + 0.45 * (1 + std::cos(M_PI * 4 / 9.0)), 1e-12);
  for (int64_t step = 4; step < 13; ++step) EXPECT_GT(s.At(step), s.At(step + 1));
}

TEST(TrainerAdamW, MatchesTheUpdateFormulaStepByStep) {
  at::Tensor w = at::tensor({1.0, -2.0, 0.5, 3.0}, at::kDouble).reshape({2, 2});
  AdamWOptions o;
  o.weight_decay = 0.1;
  AdamW optimizer({{"w", w}}, o);
  const double grads[2][4] = {{0.5, -1.0, 2.0, 0.0}, {-0.25, 0.5, 1.0, 3.0}};
  double p[4] = {1.0, -2.0, 0.5, 3.0}, m[4] = {0}, v[4] = {0};
  const double lr = 0.01;
  for (int t = 1; t <= 2; ++t) {
    w.mutable_grad() = at::tensor(std::vector<double>(grads[t - 1], grads[t - 1] + 4), at::kDouble)
                           .reshape({2, 2});
    optimizer.Step(lr);
    for (int i = 0; i < 4; ++i) {
      const double g = grads[t - 1][i];
      p[i] *= 1 - lr * o.weight_decay;
      m[i] = o.beta1 * m[i] + (1 - o.beta1) * g;
      v[i] = o.beta2 * v[i] + (1 - o.beta2) * g * g;
      const double m_hat = m[i] / (1 - std::pow(o.beta1, t));
      const double v_hat = v[i] / (1 - std::pow(o.beta2, t));
      p[i] -= lr * m_hat / (std::sqrt(v_hat) + o.epsilon);
    }
    at::Tensor flat = w.reshape({-1});
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(flat[i].item<double>(), p[i], 1e-12) << t << "," << i;
  }
  // 1-D tensors (norms, biases) get no weight decay.
  at::Tensor norm = at::ones({3}, at::kDouble);
  AdamW no_decay({{"norm", norm}}, o);
  norm.mutable_grad() = at::zeros({3}, at::kDouble);
  no_decay.Step(0.5);
  EXPECT_TRUE(at::equal(norm, at::ones({3}, at::kDouble)));
}

TEST(TrainerClip, ScalesTheGlobalNormDownToTheLimitOnly) {
  at::Tensor a = at::zeros({1}, at::kDouble), b = at::zeros({1}, at::kDouble);
  a.mutable_grad() = at::tensor({3.0}, at::kDouble);
  b.mutable_grad() = at::tensor({4.0}, at::kDouble);
  EXPECT_NEAR(ClipGradientNorm({{"a", a}, {"b", b}}, 1.0), 5.0, 1e-12);
  EXPECT_NEAR(a.grad().item<double>(), 0.6, 1e-6);
  EXPECT_NEAR(b.grad().item<double>(), 0.8, 1e-6);
  EXPECT_NEAR(ClipGradientNorm({{"a", a}, {"b", b}}, 10.0), 1.0, 1e-5);
  EXPECT_NEAR(a.grad().item<double>(), 0.6, 1e-6);  // under the limit: unchanged
}

TEST(TrainerLoop, LearnsAPatternAndIsDeterministicForASeed) {
  TempDir first_dir, second_dir;
  LlamaModel first = LoadTiny(first_dir), second = LoadTiny(second_dir);
  const std::vector<int32_t> tokens = PatternTokens(500);
  absl::StatusOr<TrainResult> a = TrainCausalLm(first, tokens, SmallRun(40));
  absl::StatusOr<TrainResult> b = TrainCausalLm(second, tokens, SmallRun(40));
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(a->steps.size(), 40u);
  EXPECT_LT(a->steps.back().loss, 0.3 * a->steps.front().loss);
  for (size_t i = 0; i < a->steps.size(); ++i) EXPECT_EQ(a->steps[i].loss, b->steps[i].loss) << i;
  auto pa = first.NamedParameters(), pb = second.NamedParameters();
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(at::equal(pa[i].second, pb[i].second)) << pa[i].first;
}

TEST(TrainerLoop, AccumulatingTwoHalfBatchesEqualsOneFullBatch) {
  TempDir full_dir, half_dir;
  LlamaModel full = LoadTiny(full_dir), halves = LoadTiny(half_dir);
  const std::vector<int32_t> tokens = PatternTokens(300);
  TrainOptions one = SmallRun(1);
  one.max_gradient_norm = 0;  // clipping would hide a wrong gradient scale
  TrainOptions two = one;
  two.batch_size = one.batch_size / 2;
  two.accumulation_steps = 2;
  // The batches are drawn from one seeded stream, so 2 x 2 draws give the
  // same windows as 1 x 4.
  absl::StatusOr<TrainResult> a = TrainCausalLm(full, tokens, one);
  absl::StatusOr<TrainResult> b = TrainCausalLm(halves, tokens, two);
  ASSERT_TRUE(a.ok() && b.ok());
  // Adam's first step is blind to the gradient's scale; the norm is not.
  EXPECT_NEAR(a->steps[0].gradient_norm, b->steps[0].gradient_norm,
              1e-5 * a->steps[0].gradient_norm);
  EXPECT_NEAR(a->steps[0].loss, b->steps[0].loss, 1e-6);
  auto pf = full.NamedParameters(), ph = halves.NamedParameters();
  for (size_t i = 0; i < pf.size(); ++i) {
    // Within 1e-5: a step moves weights by ~3e-3, and where the two sums of
    // a near-zero gradient round apart, Adam's g / (|g| + eps) moves them
    // apart by up to a few 1e-6 (seen on some CPUs' BLAS kernels).
    EXPECT_TRUE(at::allclose(pf[i].second, ph[i].second, 1e-5, 1e-5)) << pf[i].first;
  }
}

TEST(TrainerLoop, WritesCheckpointsThatReloadToTheTrainedModel) {
  TempDir model_dir, checkpoints;
  LlamaModel model = LoadTiny(model_dir);
  TrainOptions o = SmallRun(6);
  o.checkpoint_dir = checkpoints.path();
  o.checkpoint_every = 4;
  absl::StatusOr<TrainResult> result = TrainCausalLm(model, PatternTokens(200), o);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->checkpoints.size(), 2u);  // step 4, and the last step
  EXPECT_EQ(result->checkpoints.back(), checkpoints / "step-000006");
  absl::StatusOr<LlamaModel> reloaded = LlamaModel::Load(result->checkpoints.back());
  ASSERT_TRUE(reloaded.ok()) << reloaded.status();
  at::Tensor ids = at::tensor({3, 1, 4, 1, 5, 3}, at::kLong).unsqueeze(0);
  at::NoGradGuard no_grad;
  EXPECT_TRUE(at::allclose(*model.Forward(ids), *reloaded->Forward(ids), 1e-6, 1e-6));
}

TEST(TrainerLoop, RejectsBadOptionsAndStopsWhenCancelled) {
  TempDir dir;
  LlamaModel model = LoadTiny(dir);
  TrainOptions bad = SmallRun(2);
  bad.accumulation_steps = 0;
  absl::StatusOr<TrainResult> result = TrainCausalLm(model, PatternTokens(100), bad);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(result.status().message().find("accumulation_steps"), std::string::npos);
  EXPECT_EQ(TrainCausalLm(model, PatternTokens(5), SmallRun(2)).status().code(),
            absl::StatusCode::kInvalidArgument);
  TrainOptions cancelled = SmallRun(5);
  cancelled.is_cancelled = [] { return true; };
  EXPECT_EQ(TrainCausalLm(model, PatternTokens(100), cancelled).status().code(),
            absl::StatusCode::kCancelled);
}

}  // namespace
}  // namespace compress::engine
