// Calibration samples, input statistics and the layer-wise runner, checked
// against whole-model forward passes and brute-force X^T X.
#include "worker/engine/recipe/layerwise.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "tests/engine/test_util.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/recipe/calibration.h"
#include "worker/engine/tokenizer/bpe_trainer.h"

namespace compress::engine {
namespace {

using testing::ExpectInvalidArgument;
using testing::TempDir;

std::string TokenFileBytes(const std::vector<uint32_t>& ids) {
  std::string bytes;
  for (uint32_t id : ids) {
    for (int shift = 0; shift < 32; shift += 8) bytes.push_back(static_cast<char>(id >> shift));
  }
  return bytes;
}

// ------------------------------------------------------------------ samples

TEST(CalibrationSamples, TokenFileWindowsSpreadEvenlyFromFirstToLastToken) {
  TempDir dir;
  std::vector<uint32_t> ids(1000);
  for (uint32_t i = 0; i < ids.size(); ++i) ids[i] = i;
  testing::WriteBytes(dir / "c.tokens", TokenFileBytes(ids));
  CalibrationSampleOptions options;
  options.num_samples = 4;
  options.sequence_length = 10;
  options.vocab_size = 1000;
  absl::StatusOr<at::Tensor> samples = LoadCalibrationSamples(dir / "c.tokens", nullptr, options);
  ASSERT_TRUE(samples.ok()) << samples.status();
  ASSERT_EQ(samples->sizes(), (std::vector<int64_t>{4, 10}));
  ASSERT_EQ(samples->scalar_type(), at::kLong);
  const int64_t starts[] = {0, 330, 660, 990};  // (1000 - 10) * s / 3
  for (int s = 0; s < 4; ++s) {
    for (int t = 0; t < 10; ++t) EXPECT_EQ((*samples)[s][t].item<int64_t>(), starts[s] + t);
  }
  // A single sample starts at the beginning; more samples than fit overlap.
  options.num_samples = 1;
  EXPECT_EQ((*LoadCalibrationSamples(dir / "c.tokens", nullptr, options))[0][0].item<int64_t>(), 0);
  options.num_samples = 200;
  options.sequence_length = 100;
  absl::StatusOr<at::Tensor> many = LoadCalibrationSamples(dir / "c.tokens", nullptr, options);
  ASSERT_TRUE(many.ok());
  EXPECT_EQ((*many)[199][99].item<int64_t>(), 999);
}

TEST(CalibrationSamples, TextIsEncodedWithTheTokenizer) {
  std::string text;
  for (int i = 0; i < 40; ++i) text += "in the beginning was the word, and the word was with god. ";
  BpeTrainerOptions trainer;
  trainer.vocab_size = 300;
  absl::StatusOr<Tokenizer> tokenizer =
      Tokenizer::FromJson(*TrainByteLevelBpe(text, trainer), "trained.json");
  ASSERT_TRUE(tokenizer.ok());
  TempDir dir;
  testing::WriteBytes(dir / "c.txt", text);
  const std::vector<int32_t> tokens = tokenizer->Encode(text);
  CalibrationSampleOptions options;
  options.num_samples = 3;
  options.sequence_length = 16;
  options.vocab_size = tokenizer->vocab_size();
  absl::StatusOr<at::Tensor> samples = LoadCalibrationSamples(dir / "c.txt", &*tokenizer, options);
  ASSERT_TRUE(samples.ok()) << samples.status();
  const int64_t last_start = static_cast<int64_t>(tokens.size()) - 16;
  for (int s = 0; s < 3; ++s) {
    const int64_t start = s * last_start / 2;
    for (int t = 0; t < 16; ++t) EXPECT_EQ((*samples)[s][t].item<int64_t>(), tokens[start + t]);
  }
  // Text without a tokenizer is refused, naming the file.
  ExpectInvalidArgument(LoadCalibrationSamples(dir / "c.txt", nullptr, options).status(),
                        {"c.txt", "tokenizer.json"});
}

TEST(CalibrationSamples, BadFilesAndCountsAreClearErrors) {
  TempDir dir;
  CalibrationSampleOptions options;
  options.num_samples = 2;
  options.sequence_length = 4;
  options.vocab_size = 10;
  testing::WriteBytes(dir / "odd.tokens", "abcdefg");
  ExpectInvalidArgument(LoadCalibrationSamples(dir / "odd.tokens", nullptr, options).status(),
                        {"odd.tokens", "multiple of 4"});
  testing::WriteBytes(dir / "big.tokens", TokenFileBytes({1, 2, 3, 10, 4}));
  ExpectInvalidArgument(LoadCalibrationSamples(dir / "big.tokens", nullptr, options).status(),
                        {"big.tokens", "token 3 is id 10", "vocabulary of 10"});
  testing::WriteBytes(dir / "short.tokens", TokenFileBytes({1, 2, 3}));
  ExpectInvalidArgument(LoadCalibrationSamples(dir / "short.tokens", nullptr, options).status(),
                        {"short.tokens", "3 tokens", "sequence_length 4"});
  EXPECT_EQ(LoadCalibrationSamples(dir / "missing.tokens", nullptr, options).status().code(),
            absl::StatusCode::kNotFound);
  options.num_samples = 0;
  ExpectInvalidArgument(LoadCalibrationSamples(dir / "short.tokens", nullptr, options).status(),
                        {"num_samples (0)"});
}

// ------------------------------------------------------------------ statistics

at::Tensor Rows(const at::Tensor& x) { return x.reshape({-1, x.size(-1)}).to(at::kDouble); }

TEST(StatisticsCollector, AccumulatesXtXNormsAndRangesAndSharesRepeatedInputs) {
  at::manual_seed(3);
  const at::Tensor a1 = at::randn({2, 5, 8}), a2 = at::randn({1, 7, 8});
  const at::Tensor m1 = at::randn({2, 5, 8}), m2 = at::randn({1, 7, 8});
  StatisticsCollector collector({}, /*with_hessian=*/true, at::kDouble);
  for (const auto& [attention, mlp] : {std::pair{a1, m1}, std::pair{a2, m2}}) {
    // The forward pass's order: q, k, v see one tensor; o another; gate, up one.
    for (const char* linear : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}) {
      ASSERT_TRUE(collector.OnLinearInput(0, linear, attention).ok());
    }
    ASSERT_TRUE(collector.OnLinearInput(0, "self_attn.o_proj", mlp * 2).ok());
    for (const char* linear : {"mlp.gate_proj", "mlp.up_proj"}) {
      ASSERT_TRUE(collector.OnLinearInput(0, linear, mlp).ok());
    }
  }
  const at::Tensor attention_rows = at::cat({Rows(a1), Rows(a2)});
  const at::Tensor mlp_rows = at::cat({Rows(m1), Rows(m2)});
  for (const char* linear : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}) {
    SCOPED_TRACE(linear);
    const LinearInputStatistics* s = collector.Find(linear);
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->tokens, 17);
    EXPECT_TRUE(at::allclose(s->hessian, attention_rows.t().mm(attention_rows), 1e-10, 1e-10));
    // float32 squares summed in float64.
    EXPECT_TRUE(at::allclose(s->sum_square, attention_rows.square().sum(0), 1e-6, 1e-9));
    EXPECT_TRUE(at::allclose(s->sum_abs, attention_rows.abs().sum(0), 1e-6, 1e-9));
    EXPECT_TRUE(s->abs_max.equal(std::get<0>(attention_rows.abs().max(0)).to(at::kFloat)));
    EXPECT_TRUE(s->min.equal(std::get<0>(attention_rows.min(0)).to(at::kFloat)));
    EXPECT_TRUE(s->max.equal(std::get<0>(attention_rows.max(0)).to(at::kFloat)));
  }
  EXPECT_EQ(collector.Find("self_attn.q_proj"), collector.Find("self_attn.v_proj"));
  EXPECT_EQ(collector.Find("mlp.gate_proj"), collector.Find("mlp.up_proj"));
  EXPECT_NE(collector.Find("self_attn.o_proj"), collector.Find("mlp.gate_proj"));
  EXPECT_TRUE(at::allclose(collector.Find("self_attn.o_proj")->hessian,
                           4 * mlp_rows.t().mm(mlp_rows), 1e-10, 1e-10));
  EXPECT_TRUE(at::allclose(collector.Find("mlp.up_proj")->hessian, mlp_rows.t().mm(mlp_rows),
                           1e-10, 1e-10));
  EXPECT_EQ(collector.Find("mlp.down_proj"), nullptr);

  // A pass can stop right after the last linear it measures.
  collector.Clear();
  collector.StopAfter("self_attn.v_proj");
  EXPECT_TRUE(collector.OnLinearInput(0, "self_attn.q_proj", a1).ok());
  const absl::Status stopped = collector.OnLinearInput(0, "self_attn.v_proj", a1);
  EXPECT_TRUE(StatisticsCollector::StoppedEarly(stopped)) << stopped;
  EXPECT_FALSE(StatisticsCollector::StoppedEarly(absl::AbortedError("something else")));
  EXPECT_EQ(collector.Find("self_attn.v_proj")->tokens, 10);

  // Only the chosen linears; without the Hessian when not asked.
  StatisticsCollector chosen({"mlp.down_proj"}, /*with_hessian=*/false);
  ASSERT_TRUE(chosen.OnLinearInput(0, "self_attn.q_proj", a1).ok());
  ASSERT_TRUE(chosen.OnLinearInput(0, "mlp.down_proj", m1).ok());
  EXPECT_EQ(chosen.Find("self_attn.q_proj"), nullptr);
  ASSERT_NE(chosen.Find("mlp.down_proj"), nullptr);
  EXPECT_FALSE(chosen.Find("mlp.down_proj")->hessian.defined());
  chosen.Clear();
  EXPECT_EQ(chosen.Find("mlp.down_proj"), nullptr);
}

// ------------------------------------------------------------------ runner

// Records every linear input of a forward pass, as float64 rows.
class RecordingHook : public LinearHook {
 public:
  absl::Status OnLinearInput(int64_t layer, absl::string_view linear,
                             const at::Tensor& input) override {
    rows[{layer, std::string(linear)}].push_back(Rows(input));
    return absl::OkStatus();
  }
  at::Tensor XtX(int64_t layer, const std::string& linear) const {
    const at::Tensor x = at::cat(rows.at({layer, linear}));
    return x.t().mm(x);
  }
  std::map<std::pair<int64_t, std::string>, std::vector<at::Tensor>> rows;
};

// The transform the runner tests apply: a coarse rounding that changes
// the linear weights noticeably (all of them, or those named).
void Coarsen(DecoderBlockWeights& block, const std::vector<std::string>& only = {}) {
  for (const BlockLinear& linear : kBlockLinears) {
    if (!only.empty() && std::find(only.begin(), only.end(), linear.name) == only.end()) continue;
    at::Tensor& w = (block.*linear.member).weight;
    w = at::round(w * 8) / 8;
  }
}

class LayerwiseTest : public ::testing::Test {
 protected:
  void SetUp() override {
    RandomModelOptions options;
    options.hidden_size = 32;
    options.intermediate_size = 64;
    options.num_layers = 3;
    options.num_heads = 4;
    options.num_kv_heads = 2;
    options.vocab_size = 97;
    options.init_std = 0.2;
    options.seed = 11;
    ASSERT_TRUE(WriteRandomLlamaModel(options, dir_.path()).ok());
    absl::StatusOr<LlamaModel> model = LlamaModel::Load(dir_.path());
    ASSERT_TRUE(model.ok()) << model.status();
    model_.emplace(std::move(*model));
    at::manual_seed(5);
    ids_ = at::randint(0, 97, {5, 12}, at::kLong);
  }

  LayerwiseOptions Options(PropagationMode mode) const {
    LayerwiseOptions options;
    options.calibration_ids = ids_;
    options.propagation = mode;
    options.samples_per_pass = 2;  // three passes over five samples
    options.hessian_dtype = at::kDouble;
    options.sequential_linears = false;  // all statistics from the original block
    return options;
  }

  // Runs the runner with Coarsen; the statistics of every linear, by layer,
  // and the finished blocks.
  absl::Status Run(const LayerwiseOptions& options,
                   std::map<std::pair<int64_t, std::string>, at::Tensor>* hessians,
                   std::vector<DecoderBlockWeights>* finished) {
    LayerwiseCallbacks callbacks;
    callbacks.transform = [&](DecoderBlockWeights& block, const BlockStatistics& statistics,
                              const std::vector<std::string>& linears) {
      for (const std::string& linear : linears) {
        const LinearInputStatistics* s = statistics.Find(linear);
        if (s == nullptr) return absl::InternalError("no statistics for " + linear);
        EXPECT_EQ(s->tokens, ids_.numel());
        (*hessians)[{block.layer, linear}] = s->hessian.clone();
      }
      Coarsen(block, linears);
      return absl::OkStatus();
    };
    callbacks.finished = [&](const DecoderBlockWeights& block) {
      finished->push_back(block);
      return absl::OkStatus();
    };
    return RunLayerwise(model_->checkpoint(), model_->config(), options, callbacks);
  }

  TempDir dir_;
  std::optional<LlamaModel> model_;
  at::Tensor ids_;
};

void ExpectHessiansMatch(const std::map<std::pair<int64_t, std::string>, at::Tensor>& hessians,
                         const RecordingHook& reference, int64_t layer) {
  for (const BlockLinear& linear : kBlockLinears) {
    SCOPED_TRACE(::testing::Message() << "layer " << layer << " " << linear.name);
    const at::Tensor expected = reference.XtX(layer, linear.name);
    const at::Tensor& actual = hessians.at({layer, linear.name});
    EXPECT_LT((actual - expected).abs().max().item<double>(),
              1e-4 * expected.abs().max().item<double>());
  }
}

TEST_F(LayerwiseTest, ParallelStatisticsAreTheOriginalModelsLinearInputs) {
  RecordingHook reference;
  ASSERT_TRUE(model_->Forward(ids_, nullptr, &reference).ok());
  std::map<std::pair<int64_t, std::string>, at::Tensor> hessians;
  std::vector<DecoderBlockWeights> finished;
  ASSERT_TRUE(Run(Options(PropagationMode::kParallel), &hessians, &finished).ok());
  ASSERT_EQ(finished.size(), 3u);
  for (int64_t layer = 0; layer < 3; ++layer) {
    ExpectHessiansMatch(hessians, reference, layer);
    // The finished block holds the transformed weights.
    DecoderBlockWeights expected = *model_->LoadBlock(layer);
    Coarsen(expected);
    EXPECT_TRUE(finished[layer].down_proj.weight.equal(expected.down_proj.weight));
  }
}

TEST_F(LayerwiseTest, SequentialStatisticsSeeTheCompressedBlocksBefore) {
  std::map<std::pair<int64_t, std::string>, at::Tensor> sequential, parallel;
  std::vector<DecoderBlockWeights> finished, ignored;
  ASSERT_TRUE(Run(Options(PropagationMode::kSequential), &sequential, &finished).ok());
  ASSERT_TRUE(Run(Options(PropagationMode::kParallel), &parallel, &ignored).ok());

  // Reference: compressed blocks before `layer`, the original block at it.
  RecordingHook reference;
  at::Tensor hidden = *Embed(model_->embed_tokens(), ids_);
  const RotaryCache rope = *MakeRotaryCache(model_->config(), 0, ids_.size(1), at::kCPU, at::kFloat);
  for (int64_t layer = 0; layer < 3; ++layer) {
    ASSERT_TRUE(DecoderBlockForward(model_->config(), *model_->LoadBlock(layer), hidden, rope,
                                    nullptr, &reference)
                    .ok());
    hidden = *DecoderBlockForward(model_->config(), finished[layer], hidden, rope, nullptr, nullptr);
    ExpectHessiansMatch(sequential, reference, layer);
  }
  // The modes agree on the first block and differ after it: the test sees
  // which activations were propagated.
  EXPECT_TRUE(at::allclose(sequential.at({0, "mlp.down_proj"}), parallel.at({0, "mlp.down_proj"})));
  EXPECT_FALSE(at::allclose(sequential.at({2, "self_attn.q_proj"}),
                            parallel.at({2, "self_attn.q_proj"}), 1e-3, 1e-3));
}

TEST_F(LayerwiseTest, SequentialLinearsAreFittedToTheAlreadyChangedOnesBeforeThem) {
  std::map<std::pair<int64_t, std::string>, at::Tensor> hessians;
  std::vector<DecoderBlockWeights> finished;
  LayerwiseOptions options = Options(PropagationMode::kParallel);
  options.sequential_linears = true;
  ASSERT_TRUE(Run(options, &hessians, &finished).ok());
  ASSERT_EQ(hessians.size(), 3u * kNumBlockLinears);

  // Parallel: block 1's input is the original block 0's output.
  const RotaryCache rope = *MakeRotaryCache(model_->config(), 0, ids_.size(1), at::kCPU, at::kFloat);
  at::Tensor input = *Embed(model_->embed_tokens(), ids_);
  for (int64_t layer = 0; layer < 2; ++layer) {
    const DecoderBlockWeights original = *model_->LoadBlock(layer);
    std::vector<std::string> done;
    for (const std::vector<std::string>& step : SequentialLinearSteps()) {
      DecoderBlockWeights partly = *model_->LoadBlock(layer);
      if (!done.empty()) Coarsen(partly, done);
      RecordingHook reference;
      ASSERT_TRUE(DecoderBlockForward(model_->config(), partly, input, rope, nullptr, &reference).ok());
      for (const std::string& linear : step) {
        SCOPED_TRACE(::testing::Message() << "layer " << layer << " " << linear);
        const at::Tensor expected = reference.XtX(layer, linear);
        EXPECT_LT((hessians.at({layer, linear}) - expected).abs().max().item<double>(),
                  1e-4 * expected.abs().max().item<double>());
      }
      done.insert(done.end(), step.begin(), step.end());
    }
    input = *DecoderBlockForward(model_->config(), original, input, rope, nullptr, nullptr);
  }
  // The steps matter: down_proj's inputs differ from the original block's.
  std::map<std::pair<int64_t, std::string>, at::Tensor> all_at_once;
  finished.clear();
  ASSERT_TRUE(Run(Options(PropagationMode::kParallel), &all_at_once, &finished).ok());
  EXPECT_FALSE(at::allclose(hessians.at({0, "mlp.down_proj"}), all_at_once.at({0, "mlp.down_proj"}),
                            1e-3, 1e-3));
  EXPECT_TRUE(at::allclose(hessians.at({0, "self_attn.q_proj"}),
                           all_at_once.at({0, "self_attn.q_proj"}), 1e-6, 1e-6));
}

TEST_F(LayerwiseTest, PrepareSeesTheLoadedBlockAndItsChangesReachTheSteps) {
  RecordingHook reference;
  ASSERT_TRUE(model_->Forward(ids_, nullptr, &reference).ok());
  for (PropagationMode mode : {PropagationMode::kParallel, PropagationMode::kSequential}) {
    SCOPED_TRACE(mode == PropagationMode::kParallel ? "parallel" : "sequential");
    LayerwiseOptions options = Options(mode);
    options.sequential_linears = true;
    options.probe_samples = 3;
    int prepared = 0;
    std::vector<DecoderBlockWeights> finished;
    LayerwiseCallbacks callbacks;
    callbacks.prepare = [&](DecoderBlockWeights& block, const BlockStatistics& statistics,
                            const BlockProbe& probe) -> absl::Status {
      ++prepared;
      // Block 0's statistics are the original model's, whatever the mode.
      if (block.layer == 0) {
        for (const BlockLinear& linear : kBlockLinears) {
          const at::Tensor expected = reference.XtX(0, linear.name);
          EXPECT_LT((statistics.Find(linear.name)->hessian - expected).abs().max().item<double>(),
                    1e-4 * expected.abs().max().item<double>());
        }
      }
      // The probe: zero for the block as loaded, more for a coarser one.
      EXPECT_EQ(*probe(block), 0.0);
      DecoderBlockWeights coarse = block;
      Coarsen(coarse);
      EXPECT_GT(*probe(coarse), 0.0);
      // A change here is what the steps see.
      block.down_proj.weight = block.down_proj.weight * 2;
      return absl::OkStatus();
    };
    callbacks.transform = [&](DecoderBlockWeights&, const BlockStatistics&,
                              const std::vector<std::string>&) { return absl::OkStatus(); };
    callbacks.finished = [&](const DecoderBlockWeights& block) {
      finished.push_back(block);
      return absl::OkStatus();
    };
    ASSERT_TRUE(RunLayerwise(model_->checkpoint(), model_->config(), options, callbacks).ok());
    EXPECT_EQ(prepared, 3);
    ASSERT_EQ(finished.size(), 3u);
    EXPECT_TRUE(finished[1].down_proj.weight.equal(model_->LoadBlock(1)->down_proj.weight * 2));
  }
}

TEST_F(LayerwiseTest, ALayerRangeSeesTheSameActivationsAsTheWholeRun) {
  std::map<std::pair<int64_t, std::string>, at::Tensor> whole, range;
  std::vector<DecoderBlockWeights> finished;
  ASSERT_TRUE(Run(Options(PropagationMode::kParallel), &whole, &finished).ok());
  finished.clear();
  LayerwiseOptions options = Options(PropagationMode::kParallel);
  options.first_layer = 1;
  options.end_layer = 2;
  ASSERT_TRUE(Run(options, &range, &finished).ok());
  ASSERT_EQ(finished.size(), 1u);
  EXPECT_EQ(finished[0].layer, 1);
  EXPECT_EQ(range.size(), static_cast<size_t>(kNumBlockLinears));
  for (const BlockLinear& linear : kBlockLinears) {
    EXPECT_TRUE(at::allclose(range.at({1, linear.name}), whole.at({1, linear.name}), 1e-9, 1e-9));
  }
}

TEST_F(LayerwiseTest, WithoutCalibrationEveryBlockIsTransformedWithoutStatistics) {
  LayerwiseOptions options;
  std::vector<int64_t> layers;
  LayerwiseCallbacks callbacks;
  callbacks.transform = [&](DecoderBlockWeights& block, const BlockStatistics& statistics,
                            const std::vector<std::string>& linears) {
    EXPECT_EQ(statistics.Find("self_attn.q_proj"), nullptr);
    EXPECT_EQ(linears.size(), static_cast<size_t>(kNumBlockLinears));
    layers.push_back(block.layer);
    return absl::OkStatus();
  };
  callbacks.finished = [](const DecoderBlockWeights&) { return absl::OkStatus(); };
  ASSERT_TRUE(RunLayerwise(model_->checkpoint(), model_->config(), options, callbacks).ok());
  EXPECT_EQ(layers, (std::vector<int64_t>{0, 1, 2}));
}

TEST_F(LayerwiseTest, BadInputsAndCancellationStopTheRun) {
  std::map<std::pair<int64_t, std::string>, at::Tensor> hessians;
  std::vector<DecoderBlockWeights> finished;
  LayerwiseOptions options = Options(PropagationMode::kSequential);
  options.calibration_ids = at::full({2, 4}, 97, at::kLong);  // outside the vocabulary
  EXPECT_EQ(Run(options, &hessians, &finished).code(), absl::StatusCode::kInvalidArgument);
  options = Options(PropagationMode::kSequential);
  options.end_layer = 4;
  ExpectInvalidArgument(Run(options, &hessians, &finished), {"layer range"});
  options = Options(PropagationMode::kSequential);
  int polls = 0;
  options.is_cancelled = [&] { return ++polls > 4; };
  EXPECT_EQ(Run(options, &hessians, &finished).code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(finished.empty());
  // A transform that breaks a shape is caught before the block is used.
  LayerwiseCallbacks callbacks;
  callbacks.transform = [](DecoderBlockWeights& block, const BlockStatistics&,
                           const std::vector<std::string>&) {
    block.up_proj.weight = block.up_proj.weight.narrow(0, 0, 3);
    return absl::OkStatus();
  };
  callbacks.finished = [](const DecoderBlockWeights&) { return absl::OkStatus(); };
  ExpectInvalidArgument(
      RunLayerwise(model_->checkpoint(), model_->config(), Options(PropagationMode::kSequential),
                   callbacks),
      {"up_proj"});
}

}  // namespace
}  // namespace compress::engine
