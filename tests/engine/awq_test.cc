// AWQ: the scale search, the clipping search and folding the scales into a block.
#include "worker/engine/quant/awq.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <limits>

#include "tests/engine/test_util.h"
#include "worker/engine/model/llama_config.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/model/safetensors_reader.h"
#include "worker/engine/quant/quantized_tensor.h"
#include "worker/engine/quant/rtn.h"
#include "worker/engine/recipe/awq_scaling.h"

namespace compress::engine {
namespace {

AwqOptions Options(int bits, int64_t group_size) {
  AwqOptions options;
  options.grid.bits = bits;
  options.grid.group_size = group_size;
  return options;
}

at::Tensor RtnRoundTrip(const at::Tensor& w, const RtnOptions& grid) {
  return Dequantize(*QuantizeRtn(w, grid, "w"), at::kFloat);
}

// Calibration inputs whose first channels carry much larger activations
// than the rest: the case AWQ is made for.
struct Inputs {
  at::Tensor x;  // [tokens, in]
  at::Tensor hessian;
  at::Tensor mean_abs;
};

Inputs OutlierInputs(int64_t tokens, int64_t in, int64_t outliers, double magnitude) {
  at::Tensor x = at::randn({tokens, in});
  x.narrow(1, 0, outliers).mul_(magnitude);
  return {x, x.t().mm(x), x.abs().mean(0)};
}

// sum_l tr(dW_l H dW_l^T) at scales s, computed here the plain way.
double ErrorAt(const std::vector<at::Tensor>& weights, const at::Tensor& s, const at::Tensor& h,
               const RtnOptions& grid) {
  double total = 0;
  for (const at::Tensor& w : weights) {
    total += OutputSquaredError(w, RtnRoundTrip(w * s, grid) / s, h);
  }
  return total;
}

TEST(AwqScaleSearch, BeatsPlainRoundingWhenFewChannelsCarryTheActivations) {
  at::manual_seed(1);
  const Inputs inputs = OutlierInputs(512, 128, 4, 30.0);
  const std::vector<at::Tensor> weights = {at::randn({96, 128}), at::randn({32, 128})};
  for (int bits : {3, 4}) {
    for (int64_t group : {int64_t{-1}, int64_t{32}}) {
      SCOPED_TRACE(::testing::Message() << bits << " bits, group " << group);
      const AwqOptions options = Options(bits, group);
      absl::StatusOr<AwqScales> found = SearchAwqScales(
          weights, inputs.mean_abs, options, "attention", LinearOutputError(weights, inputs.hessian));
      ASSERT_TRUE(found.ok()) << found.status();
      EXPECT_GT(found->exponent, 0.0);
      EXPECT_LT(found->error, 0.8 * found->unscaled_error);
      // Both figures are the output error the test computes itself.
      const at::Tensor ones = at::ones({128});
      EXPECT_NEAR(found->unscaled_error, ErrorAt(weights, ones, inputs.hessian, options.grid),
                  1e-3 * found->unscaled_error);
      EXPECT_NEAR(found->error, ErrorAt(weights, found->scales, inputs.hessian, options.grid),
                  1e-3 * found->error);
      // The outlier channels are scaled up relative to the others.
      EXPECT_GT(found->scales.narrow(0, 0, 4).min().item<float>(),
                found->scales.narrow(0, 4, 124).max().item<float>());
      // The scales are AutoAWQ's formula at the chosen exponent.
      const double a = found->exponent;
      const at::Tensor w_abs = at::cat(weights).abs();
      const at::Tensor grouped = w_abs.reshape({-1, group > 0 ? group : 128});
      const at::Tensor w_mean =
          (grouped / grouped.amax({1}, true)).reshape(w_abs.sizes()).mean(0);
      at::Tensor s = (inputs.mean_abs.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp_min(1e-4);
      s = s / (s.max() * s.min()).sqrt();
      EXPECT_TRUE(at::allclose(found->scales, s, 1e-5, 1e-6));
      // No exponent of the grid does better.
      for (int i = 0; i < options.grid_points; ++i) {
        const double b = static_cast<double>(i) / options.grid_points;
        at::Tensor t = (inputs.mean_abs.pow(b) / (w_mean.pow(1 - b) + 1e-4)).clamp_min(1e-4);
        t = t / (t.max() * t.min()).sqrt();
        EXPECT_GE(ErrorAt(weights, t, inputs.hessian, options.grid), found->error * (1 - 1e-4)) << b;
      }
    }
  }
}

TEST(AwqScaleSearch, KeepsPlainRoundingWhenNoScalingHelps) {
  at::manual_seed(2);
  // Every channel alike and weights that RTN represents exactly (codes
  // times a power of two): nothing beats no scaling.
  const at::Tensor x = at::randn({256, 64});
  const at::Tensor w = (at::randint(0, 16, {16, 64}).to(at::kFloat) - 8) * 0.125;
  w.select(1, 0).fill_(-1.0);  // every row spans -8..7 codes exactly
  w.select(1, 1).fill_(0.875);
  absl::StatusOr<AwqScales> found = SearchAwqScales({w}, x.abs().mean(0), Options(4, -1), "exact",
                                                    LinearOutputError({w}, x.t().mm(x)));
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->unscaled_error, 0.0);
  EXPECT_EQ(found->exponent, -1);
  EXPECT_TRUE(found->scales.equal(at::ones({64})));
}

TEST(AwqScaleSearch, RejectsMismatchedShapesAndBadOptions) {
  const at::Tensor h = at::eye(8);
  const at::Tensor mean = at::ones({8});
  auto search = [&](const std::vector<at::Tensor>& weights, const at::Tensor& mean_abs,
                    const AwqOptions& options) {
    return SearchAwqScales(weights, mean_abs, options, "x", LinearOutputError(weights, h))
        .status()
        .code();
  };
  EXPECT_EQ(search({at::randn({4, 8}), at::randn({4, 6})}, mean, Options(4, -1)),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(search({at::randn({4, 8})}, at::ones({6}), Options(4, -1)),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(search({at::randn({4, 8})}, mean, Options(4, 3)), absl::StatusCode::kInvalidArgument);
  at::Tensor nan = at::randn({4, 8});
  nan[0][0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(search({nan}, mean, Options(4, -1)), absl::StatusCode::kInvalidArgument);
  AwqOptions bad = Options(4, -1);
  bad.grid_points = 0;
  EXPECT_EQ(search({at::randn({4, 8})}, mean, bad), absl::StatusCode::kInvalidArgument);
  // The caller's error function decides; its failure is the search's.
  EXPECT_EQ(SearchAwqScales({at::randn({4, 8})}, mean, Options(4, -1), "x",
                            [](const std::vector<at::Tensor>&) -> absl::StatusOr<double> {
                              return absl::CancelledError("stop");
                            })
                .status()
                .code(),
            absl::StatusCode::kCancelled);
}

TEST(AwqClipSearch, PicksTheBestRatioOfEveryGroupAsABruteForceDoes) {
  at::manual_seed(3);
  const int64_t out = 6, in = 64, group = 16;
  at::Tensor w = at::randn({out, in});
  w.index_put_({at::indexing::Slice(), 5}, 6.0);  // an outlier in one group of every row
  const Inputs inputs = OutlierInputs(300, in, 2, 5.0);
  const AwqOptions options = Options(3, group);
  absl::StatusOr<at::Tensor> clipped = SearchAwqClip(w, inputs.hessian, options, "w");
  ASSERT_TRUE(clipped.ok()) << clipped.status();
  ASSERT_EQ(clipped->sizes(), w.sizes());

  // Brute force: every row and group on its own, every ratio.
  bool some_clipped = false;
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t g = 0; g < in / group; ++g) {
      const at::Tensor wg = w[r].narrow(0, g * group, group);
      const at::Tensor hg = inputs.hessian.narrow(0, g * group, group).narrow(1, g * group, group);
      const double max_abs = wg.abs().max().item<double>();
      auto group_error = [&](const at::Tensor& c) {
        // The row's other groups do not change this group's codes.
        at::Tensor row = w[r].clone();
        row.narrow(0, g * group, group).copy_(c);
        const at::Tensor q =
            RtnRoundTrip(row.unsqueeze(0), options.grid)[0].narrow(0, g * group, group);
        return OutputSquaredError((wg - q).unsqueeze(0), at::zeros({1, group}), hg);
      };
      double best = std::numeric_limits<double>::infinity();
      for (int i = 0; i < 10; ++i) {
        const double limit = max_abs * (1.0 - i / 20.0);
        best = std::min(best, group_error(wg.clamp(-limit, limit)));
      }
      const at::Tensor chosen = (*clipped)[r].narrow(0, g * group, group);
      EXPECT_LE(group_error(chosen), best * (1 + 1e-4) + 1e-9) << "row " << r << " group " << g;
      EXPECT_LE(chosen.abs().max().item<double>(), max_abs);
      some_clipped = some_clipped || !chosen.equal(wg);
    }
  }
  EXPECT_TRUE(some_clipped) << "the outlier groups are worth clipping";
  // Less output error than the unclipped rounding.
  EXPECT_LT(OutputSquaredError(w, RtnRoundTrip(*clipped, options.grid), inputs.hessian),
            OutputSquaredError(w, RtnRoundTrip(w, options.grid), inputs.hessian));
}

// ------------------------------------------------------------------ folding

struct BlockFixture {
  LlamaConfig config;
  DecoderBlockWeights block;
};

BlockFixture LoadBlock(const testing::TempDir& dir, RandomModelOptions options) {
  options.num_layers = 1;
  const std::string path = dir / "model";
  EXPECT_TRUE(WriteRandomLlamaModel(options, path).ok());
  BlockFixture fixture{*ReadLlamaConfig(path), {}};
  const SafetensorsCheckpoint checkpoint = *SafetensorsCheckpoint::Open(path);
  const at::ScalarType dtype = options.dtype == SafetensorsDtype::kBF16 ? at::kBFloat16 : at::kFloat;
  fixture.block = *LoadDecoderBlock(checkpoint, fixture.config, 0, at::kCPU, dtype);
  return fixture;
}

at::Tensor BlockOutput(const BlockFixture& f, const at::Tensor& hidden) {
  const RotaryCache rope = *MakeRotaryCache(f.config, 0, hidden.size(1), at::kCPU, at::kFloat);
  absl::StatusOr<at::Tensor> out = DecoderBlockForward(f.config, f.block, hidden, rope, nullptr, nullptr);
  EXPECT_TRUE(out.ok()) << out.status();
  return *out;
}

at::Tensor RandomScales(int64_t n) { return at::exp(at::randn({n})); }  // spread over ~e^±2

TEST(AwqFolding, LeavesTheBlocksFunctionUnchanged) {
  c10::InferenceMode inference;
  at::manual_seed(4);
  testing::TempDir dir;
  RandomModelOptions options;
  options.num_kv_heads = options.num_heads;  // every input can be scaled, v_proj -> o_proj too
  options.model_type = "qwen2";              // v_proj has a bias
  options.init_std = 0.2;
  BlockFixture f = LoadBlock(dir, options);
  const at::Tensor hidden = at::randn({2, 7, f.config.hidden_size});
  const at::Tensor before = BlockOutput(f, hidden);
  const DecoderBlockWeights original = f.block;
  for (const AwqScaledInput& input : AwqScaledInputs()) {
    SCOPED_TRACE(input.producer);
    ASSERT_TRUE(AwqInputApplies(f.config, input));
    const int64_t channels = absl::string_view(input.producer) == "mlp.up_proj"
                                 ? f.config.intermediate_size
                                 : f.config.hidden_size;
    absl::StatusOr<std::vector<std::string>> changed =
        FoldAwqScales(f.block, input, RandomScales(channels));
    ASSERT_TRUE(changed.ok()) << changed.status();
    EXPECT_EQ(changed->size(), input.consumers.size() + 1 +
                                   (absl::string_view(input.producer) == "self_attn.v_proj"));
  }
  EXPECT_FALSE(f.block.input_layernorm.equal(original.input_layernorm));
  EXPECT_FALSE(f.block.down_proj.weight.equal(original.down_proj.weight));
  EXPECT_FALSE(f.block.v_proj.bias.equal(original.v_proj.bias));
  const at::Tensor after = BlockOutput(f, hidden);
  EXPECT_TRUE(at::allclose(after, before, 1e-4, 1e-5))
      << (after - before).abs().max().item<float>();
}

TEST(AwqFolding, ABf16NormIsCompensatedForItsRounding) {
  c10::InferenceMode inference;
  at::manual_seed(5);
  testing::TempDir dir;
  RandomModelOptions options;
  options.dtype = SafetensorsDtype::kBF16;
  BlockFixture f = LoadBlock(dir, options);
  const at::Tensor g = f.block.input_layernorm.to(at::kFloat);
  const at::Tensor q = f.block.q_proj.weight.to(at::kFloat);
  const at::Tensor s = RandomScales(f.config.hidden_size);
  ASSERT_TRUE(FoldAwqScales(f.block, AwqScaledInputs()[0], s).ok());
  EXPECT_EQ(f.block.input_layernorm.scalar_type(), at::kBFloat16);
  EXPECT_EQ(f.block.q_proj.weight.scalar_type(), at::kBFloat16);
  // The consumers are scaled by what the rounded norm really divides by.
  const at::Tensor applied = g / f.block.input_layernorm.to(at::kFloat);
  EXPECT_TRUE(at::allclose(f.block.q_proj.weight.to(at::kFloat), q * applied, 1e-2, 1e-3));
  // g * q is what the block computes with; it survives up to bf16 rounding.
  EXPECT_TRUE(at::allclose(f.block.input_layernorm.to(at::kFloat) * f.block.q_proj.weight.to(at::kFloat),
                           g * q, 1e-2, 1e-4));
}

TEST(AwqFolding, GroupedQueryAttentionLeavesOProjUnscaled) {
  LlamaConfig config;
  config.num_attention_heads = 8;
  config.num_key_value_heads = 2;
  EXPECT_FALSE(AwqInputApplies(config, AwqScaledInputs()[1]));
  EXPECT_TRUE(AwqInputApplies(config, AwqScaledInputs()[0]));
  EXPECT_TRUE(AwqInputApplies(config, AwqScaledInputs()[3]));
  config.num_key_value_heads = 8;
  EXPECT_TRUE(AwqInputApplies(config, AwqScaledInputs()[1]));
}

}  // namespace
}  // namespace compress::engine
