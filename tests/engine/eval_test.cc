// Evaluation (perplexity, KL divergence, text samples) against brute-force
// references written here: one forward pass per scored token over exactly
// the context its window gives it, with -log softmax and the KL sum computed
// by hand in float64 loops. They share with the engine only
// LlamaModel::Forward.
#include "worker/engine/eval/eval.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "tests/engine/test_util.h"
#include "worker/engine/model/generate.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/tokenizer/bpe_trainer.h"
#include "worker/engine/tokenizer/tokenizer.h"

namespace compress::engine {
namespace {

using testing::ExpectInvalidArgument;
using testing::TempDir;
using Ids = std::vector<int32_t>;

// ------------------------------------------------------------------ helpers

RandomModelOptions SmallOptions(int64_t vocab_size) {
  RandomModelOptions options;
  options.hidden_size = 32;
  options.intermediate_size = 64;
  options.num_layers = 2;
  options.num_heads = 4;
  options.num_kv_heads = 2;
  options.vocab_size = vocab_size;
  options.init_std = 0.1;  // peaked enough that the measures are far from uniform
  options.seed = 7;
  return options;
}

LlamaModel LoadOrDie(const std::string& dir) {
  absl::StatusOr<LlamaModel> model = LlamaModel::Load(dir);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) std::abort();
  return std::move(*model);
}

Ids RandomTokens(int64_t count, int64_t vocab_size, uint32_t seed) {
  std::mt19937 rng(seed);
  Ids tokens(static_cast<size_t>(count));
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab_size));
  return tokens;
}

// Loads `from`, adds N(0, sigma^2) noise to every weight and saves the
// result into `to`.
void WritePerturbedCopy(const std::string& from, const std::string& to, double sigma,
                        uint64_t seed) {
  LlamaModel model = LoadOrDie(from);
  at::NoGradGuard no_grad;
  at::manual_seed(seed);
  for (auto& [name, weight] : model.NamedParameters()) {
    weight.add_(at::randn_like(weight) * sigma);
  }
  ASSERT_TRUE(model.SaveHuggingFace(to).ok());
}

// The log-probabilities (float64) of the next token after tokens[begin..last].
std::vector<double> NextTokenLogProbs(const LlamaModel& model, const Ids& tokens, int64_t begin,
                                      int64_t last) {
  c10::InferenceMode inference;
  const Ids context(tokens.begin() + begin, tokens.begin() + last + 1);
  const at::Tensor input = at::tensor(context, at::TensorOptions().dtype(at::kInt)).unsqueeze(0);
  absl::StatusOr<at::Tensor> logits = model.Forward(input);
  EXPECT_TRUE(logits.ok()) << logits.status();
  const at::Tensor row = logits->select(0, 0).select(0, -1).to(at::kDouble).contiguous();
  const double* l = row.data_ptr<double>();
  const int64_t vocab = row.numel();
  const double max = *std::max_element(l, l + vocab);
  double sum = 0;
  for (int64_t v = 0; v < vocab; ++v) sum += std::exp(l[v] - max);
  const double log_sum = max + std::log(sum);
  std::vector<double> log_probs(static_cast<size_t>(vocab));
  for (int64_t v = 0; v < vocab; ++v) log_probs[v] = l[v] - log_sum;
  return log_probs;
}

// Calls `score(begin, position)` for every prediction, in order, with the
// first position of the window that scores it, written from eval.h's
// definition: windows start every `stride` positions, hold `context`
// positions (fewer at the end of the n - 1 predictions), score what the
// previous one did not, and stop at the first that reaches the end.
// Returns the number of windows.
template <typename Score>
int64_t ForEachPrediction(int64_t num_tokens, int64_t context, int64_t stride, Score score) {
  const int64_t predictions = num_tokens - 1;
  int64_t scored_up_to = 0;  // predictions [0, scored_up_to) are done
  int64_t windows = 0;
  for (int64_t begin = 0; scored_up_to < predictions; begin += stride) {
    ++windows;
    const int64_t end = std::min(begin + context, predictions);
    for (int64_t position = std::max(begin, scored_up_to); position < end; ++position) {
      score(begin, position);
    }
    scored_up_to = end;
  }
  return windows;
}

struct BruteForcePerplexity {
  double mean_nll = 0;
  int64_t scored = 0;
  int64_t windows = 0;
};

BruteForcePerplexity BruteForce(const LlamaModel& model, const Ids& tokens, int64_t context,
                                int64_t stride) {
  double nll_sum = 0;
  BruteForcePerplexity result;
  result.windows = ForEachPrediction(
      static_cast<int64_t>(tokens.size()), context, stride, [&](int64_t begin, int64_t position) {
        nll_sum -= NextTokenLogProbs(model, tokens, begin, position)[tokens[position + 1]];
        ++result.scored;
      });
  result.mean_nll = nll_sum / static_cast<double>(result.scored);
  return result;
}

PerplexityOptions Options(int64_t context, int64_t stride, int64_t batch_size = 4) {
  PerplexityOptions options;
  options.context_length = context;
  options.stride = stride;
  options.batch_size = batch_size;
  return options;
}

// One small random model (vocab 64) for the suites, written once.
class EvalTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir;
    ASSERT_TRUE(WriteRandomLlamaModel(SmallOptions(kVocab), dir_->path()).ok());
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static constexpr int64_t kVocab = 64;
  static TempDir* dir_;
};
TempDir* EvalTest::dir_ = nullptr;

// ------------------------------------------------------------------ perplexity

using EvalPerplexity = EvalTest;

TEST_F(EvalPerplexity, EqualsBruteForceForEveryWindowSetting) {
  const LlamaModel model = LoadOrDie(dir_->path());
  const Ids tokens = RandomTokens(23, kVocab, 1);  // 22 predictions
  struct Setting {
    int64_t context, stride, batch_size;
  };
  for (const Setting& s : std::vector<Setting>{
           {8, 8, 4},    // disjoint windows, a shorter tail window [16, 22)
           {8, 3, 2},    // overlapping, tail [15, 22), batches of 2
           {6, 4, 4},    // overlapping, windows that end exactly at 22
           {5, 1, 3},    // stride 1: every prediction sees 5 tokens but the first ones
           {30, 10, 4},  // one window shorter than the context
           {22, 22, 1},  // one window exactly the stream
       }) {
    SCOPED_TRACE(::testing::Message() << "context " << s.context << " stride " << s.stride);
    const absl::StatusOr<PerplexityResult> result =
        Perplexity(model, tokens, Options(s.context, s.stride, s.batch_size));
    ASSERT_TRUE(result.ok()) << result.status();
    const BruteForcePerplexity expected = BruteForce(model, tokens, s.context, s.stride);
    EXPECT_NEAR(result->mean_nll, expected.mean_nll, 1e-6 * expected.mean_nll);
    EXPECT_NEAR(result->perplexity, std::exp(expected.mean_nll),
                1e-6 * std::exp(expected.mean_nll));
    EXPECT_EQ(result->tokens_scored, 22);
    EXPECT_EQ(expected.scored, 22);
    EXPECT_EQ(result->windows, expected.windows);
    EXPECT_EQ(result->context_length, s.context);
    EXPECT_EQ(result->stride, s.stride);
    EXPECT_GT(result->tokens_per_second, 0);
  }
}

TEST_F(EvalPerplexity, SlidingWindowsScoreWithMoreContext) {
  // A stride below the context gives the later tokens more context, so the
  // score differs from disjoint windows (the windows are really different).
  const LlamaModel model = LoadOrDie(dir_->path());
  const Ids tokens = RandomTokens(40, kVocab, 2);
  const absl::StatusOr<PerplexityResult> disjoint = Perplexity(model, tokens, Options(8, 8));
  const absl::StatusOr<PerplexityResult> sliding = Perplexity(model, tokens, Options(8, 2));
  ASSERT_TRUE(disjoint.ok() && sliding.ok());
  EXPECT_EQ(disjoint->windows, 5);  // 39 predictions in 8s
  EXPECT_EQ(sliding->windows, 17);  // starts 0, 2, ..., 32 (the one that reaches 39)
  EXPECT_GT(std::abs(disjoint->mean_nll - sliding->mean_nll), 1e-6);
}

TEST_F(EvalPerplexity, BatchSizeDoesNotChangeTheResult) {
  const LlamaModel model = LoadOrDie(dir_->path());
  const Ids tokens = RandomTokens(50, kVocab, 3);
  const absl::StatusOr<PerplexityResult> one = Perplexity(model, tokens, Options(10, 4, 1));
  const absl::StatusOr<PerplexityResult> many = Perplexity(model, tokens, Options(10, 4, 5));
  ASSERT_TRUE(one.ok() && many.ok());
  // Equal up to float32 rounding: a batched matmul may sum in another order.
  EXPECT_NEAR(one->mean_nll, many->mean_nll, 1e-6 * one->mean_nll);
  EXPECT_EQ(one->windows, many->windows);
  EXPECT_EQ(one->tokens_scored, 49);
}

TEST_F(EvalPerplexity, ANonResidentModelGivesTheSameResult) {
  const LlamaModel resident = LoadOrDie(dir_->path());
  LlamaLoadOptions lazy_options;
  lazy_options.resident = false;
  absl::StatusOr<LlamaModel> lazy = LlamaModel::Load(dir_->path(), lazy_options);
  ASSERT_TRUE(lazy.ok()) << lazy.status();
  const Ids tokens = RandomTokens(20, kVocab, 10);
  const absl::StatusOr<PerplexityResult> a = Perplexity(resident, tokens, Options(8, 4));
  const absl::StatusOr<PerplexityResult> b = Perplexity(*lazy, tokens, Options(8, 4));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NEAR(a->mean_nll, b->mean_nll, 1e-6 * a->mean_nll);
}

TEST_F(EvalPerplexity, MaxTokensEvaluatesAPrefix) {
  const LlamaModel model = LoadOrDie(dir_->path());
  const Ids tokens = RandomTokens(30, kVocab, 4);
  PerplexityOptions capped = Options(6, 3);
  capped.max_tokens = 12;
  const absl::StatusOr<PerplexityResult> result = Perplexity(model, tokens, capped);
  const absl::StatusOr<PerplexityResult> prefix =
      Perplexity(model, Ids(tokens.begin(), tokens.begin() + 12), Options(6, 3));
  ASSERT_TRUE(result.ok() && prefix.ok());
  EXPECT_EQ(result->tokens_scored, 11);
  EXPECT_DOUBLE_EQ(result->mean_nll, prefix->mean_nll);
}

TEST_F(EvalPerplexity, InvalidInputsNameTheField) {
  const LlamaModel model = LoadOrDie(dir_->path());
  const Ids tokens = RandomTokens(10, kVocab, 5);
  auto check = [&](const PerplexityOptions& options, const Ids& input, const std::string& field) {
    SCOPED_TRACE(field);
    ExpectInvalidArgument(Perplexity(model, input, options).status(), {field});
    ExpectInvalidArgument(CompareToReference(model, model, input, options).status(), {field});
  };
  check(Options(0, 1), tokens, "context_length");
  check(Options(8, 0), tokens, "stride");
  check(Options(8, 9), tokens, "stride");
  check(Options(8, 8, 0), tokens, "batch_size");
  PerplexityOptions one_token = Options(8, 8);
  one_token.max_tokens = 1;
  check(one_token, tokens, "max_tokens");
  check(Options(8, 8), Ids{3}, "tokens");
  check(Options(8, 8), Ids{}, "tokens");
  Ids out_of_vocab = tokens;
  out_of_vocab[3] = kVocab;
  check(Options(8, 8), out_of_vocab, "tokens[3]");
  out_of_vocab[3] = -1;
  check(Options(8, 8), out_of_vocab, "tokens[3]");
}

TEST_F(EvalPerplexity, CancellationStopsBetweenWindows) {
  const LlamaModel model = LoadOrDie(dir_->path());
  const Ids tokens = RandomTokens(30, kVocab, 6);
  PerplexityOptions options = Options(4, 4, 1);  // 8 windows, one per forward
  int polls = 0;
  options.is_cancelled = [&] { return ++polls == 3; };
  EXPECT_EQ(Perplexity(model, tokens, options).status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(polls, 3);  // stopped at once, before the third window
  polls = 0;
  EXPECT_EQ(CompareToReference(model, model, tokens, options).status().code(),
            absl::StatusCode::kCancelled);
  EXPECT_EQ(polls, 3);

  options.is_cancelled = [&] { return ++polls, false; };
  polls = 0;
  const absl::StatusOr<PerplexityResult> result = Perplexity(model, tokens, options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(polls, result->windows);  // polled before every forward pass
}

// ------------------------------------------------------------------ divergence

using EvalDivergence = EvalTest;

TEST_F(EvalDivergence, AModelAgainstItselfHasNoDivergence) {
  const LlamaModel model = LoadOrDie(dir_->path());
  const LlamaModel copy = LoadOrDie(dir_->path());
  const Ids tokens = RandomTokens(40, kVocab, 7);
  for (const LlamaModel* candidate : {&model, &copy}) {
    const absl::StatusOr<DivergenceResult> result =
        CompareToReference(model, *candidate, tokens, Options(10, 5));
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_LE(std::abs(result->mean_kl), 1e-9);
    EXPECT_LE(std::abs(result->max_kl), 1e-9);
    EXPECT_EQ(result->top1_agreement, 1.0);
    EXPECT_NEAR(result->reference.perplexity, result->candidate.perplexity,
                1e-9 * result->reference.perplexity);
    EXPECT_EQ(result->reference.tokens_scored, 39);
    EXPECT_EQ(result->candidate.tokens_scored, 39);

    const absl::StatusOr<PerplexityResult> alone = Perplexity(model, tokens, Options(10, 5));
    ASSERT_TRUE(alone.ok());
    EXPECT_NEAR(result->reference.mean_nll, alone->mean_nll, 1e-9 * alone->mean_nll);
  }
}

TEST_F(EvalDivergence, GrowsWithTheNoiseAddedToTheWeights) {
  const LlamaModel reference = LoadOrDie(dir_->path());
  const Ids tokens = RandomTokens(40, kVocab, 8);
  TempDir noisy;
  double previous_kl = 0;
  double previous_agreement = 1;
  for (double sigma : {0.003, 0.03, 0.3}) {
    SCOPED_TRACE(sigma);
    const std::string path = noisy / ("sigma" + std::to_string(sigma));
    WritePerturbedCopy(dir_->path(), path, sigma, 11);
    const LlamaModel candidate = LoadOrDie(path);
    const absl::StatusOr<DivergenceResult> result =
        CompareToReference(reference, candidate, tokens, Options(8, 4));
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_GT(result->mean_kl, previous_kl);
    EXPECT_GE(result->max_kl, result->mean_kl);
    EXPECT_LE(result->top1_agreement, previous_agreement);
    EXPECT_NE(result->reference.mean_nll, result->candidate.mean_nll);
    previous_kl = result->mean_kl;
    previous_agreement = result->top1_agreement;
  }
  EXPECT_LT(previous_agreement, 1.0);  // the largest noise changes some argmaxes
}

TEST(EvalDivergenceBruteForce, EqualsThePerPositionKlSum) {
  // A vocabulary of 16, where the hand-written sum over the vocabulary is
  // short; the candidate is the same architecture with other weights.
  TempDir dir;
  RandomModelOptions options = SmallOptions(16);
  ASSERT_TRUE(WriteRandomLlamaModel(options, dir / "reference").ok());
  WritePerturbedCopy(dir / "reference", dir / "candidate", 0.1, 3);
  const LlamaModel reference = LoadOrDie(dir / "reference");
  const LlamaModel candidate = LoadOrDie(dir / "candidate");
  const Ids tokens = RandomTokens(19, 16, 9);

  for (const auto& [context, stride] : std::vector<std::pair<int64_t, int64_t>>{{5, 2}, {6, 6}}) {
    SCOPED_TRACE(::testing::Message() << "context " << context << " stride " << stride);
    double kl_sum = 0;
    double kl_max = 0;
    double reference_nll = 0;
    double candidate_nll = 0;
    int64_t matches = 0;
    int64_t scored = 0;
    ForEachPrediction(19, context, stride, [&](int64_t begin, int64_t position) {
      const std::vector<double> p = NextTokenLogProbs(reference, tokens, begin, position);
      const std::vector<double> q = NextTokenLogProbs(candidate, tokens, begin, position);
      double kl = 0;
      for (size_t v = 0; v < p.size(); ++v) kl += std::exp(p[v]) * (p[v] - q[v]);
      kl_sum += kl;
      kl_max = std::max(kl_max, kl);
      const int32_t target = tokens[position + 1];
      reference_nll -= p[target];
      candidate_nll -= q[target];
      matches += std::max_element(p.begin(), p.end()) - p.begin() ==
                 std::max_element(q.begin(), q.end()) - q.begin();
      ++scored;
    });
    const absl::StatusOr<DivergenceResult> result =
        CompareToReference(reference, candidate, tokens, Options(context, stride));
    ASSERT_TRUE(result.ok()) << result.status();
    ASSERT_EQ(scored, 18);
    EXPECT_GT(kl_sum / scored, 1e-4);  // a real difference, not rounding
    EXPECT_NEAR(result->mean_kl, kl_sum / scored, 1e-6 * kl_sum / scored);
    EXPECT_NEAR(result->max_kl, kl_max, 1e-6 * kl_max);
    EXPECT_DOUBLE_EQ(result->top1_agreement, static_cast<double>(matches) / scored);
    EXPECT_NEAR(result->reference.mean_nll, reference_nll / scored, 1e-6 * reference_nll / scored);
    EXPECT_NEAR(result->candidate.mean_nll, candidate_nll / scored, 1e-6 * candidate_nll / scored);
  }
}

TEST(EvalDivergenceInputs, VocabularySizesMustMatch) {
  TempDir dir;
  ASSERT_TRUE(WriteRandomLlamaModel(SmallOptions(16), dir / "small").ok());
  ASSERT_TRUE(WriteRandomLlamaModel(SmallOptions(32), dir / "large").ok());
  const LlamaModel small = LoadOrDie(dir / "small");
  const LlamaModel large = LoadOrDie(dir / "large");
  ExpectInvalidArgument(
      CompareToReference(small, large, RandomTokens(10, 16, 1), Options(4, 4)).status(),
      {"vocab_size", "16", "32"});
}

// ------------------------------------------------------------------ samples

TEST(EvalSampleText, EncodesGeneratesAndDecodes) {
  std::string text;
  for (int i = 0; i < 20; ++i) text += "the quick brown fox jumps over the lazy dog. ";
  BpeTrainerOptions trainer;
  trainer.vocab_size = 280;
  const absl::StatusOr<std::string> json = TrainByteLevelBpe(text, trainer);
  ASSERT_TRUE(json.ok()) << json.status();
  const absl::StatusOr<Tokenizer> tokenizer = Tokenizer::FromJson(*json, "trained.json");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();

  TempDir dir;
  ASSERT_TRUE(WriteRandomLlamaModel(SmallOptions(tokenizer->vocab_size()), dir.path()).ok());
  const LlamaModel model = LoadOrDie(dir.path());

  GenerateOptions options;
  options.max_new_tokens = 6;
  options.temperature = 0.8;
  options.seed = 5;
  const absl::StatusOr<SampleResult> sample = SampleText(model, *tokenizer, "the quick", options);
  ASSERT_TRUE(sample.ok()) << sample.status();

  // The same as encoding, generating and decoding by hand.
  if (tokenizer->eos_id()) options.stop_token_ids = {*tokenizer->eos_id()};
  const absl::StatusOr<GenerateResult> generated =
      Generate(model, tokenizer->Encode("the quick", /*add_bos=*/true), options);
  ASSERT_TRUE(generated.ok()) << generated.status();
  EXPECT_EQ(sample->prompt, "the quick");
  EXPECT_EQ(sample->tokens, generated->tokens);
  EXPECT_EQ(sample->completion, tokenizer->Decode(generated->tokens, /*skip_special=*/true));
  EXPECT_EQ(sample->stopped, generated->stopped);
  EXPECT_FALSE(sample->tokens.empty());
  EXPECT_GE(sample->tokens_per_second, 0);

  ExpectInvalidArgument(SampleText(model, *tokenizer, "", options).status(), {"prompt"});
}

}  // namespace
}  // namespace compress::engine
