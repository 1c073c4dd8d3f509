// The Llama-family runtime (config, model, KV cache, generation) against a
// deliberately naive reference written here from the formulas: one token at
// a time, plain loops in float64, explicit per-head attention over the
// previous positions, its own RMSNorm and rotary embedding. It shares no code
// with the runtime but the checkpoint reader.
#include "worker/engine/model/llama_model.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "tests/engine/test_util.h"
#include "worker/engine/model/generate.h"
#include "worker/engine/model/llama_config.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/model/safetensors_reader.h"

namespace compress::engine {
namespace {

namespace fs = std::filesystem;
using testing::ExpectInvalidArgument;
using testing::ReadBytes;
using testing::TempDir;
using testing::WriteBytes;
using Json = nlohmann::json;

// ------------------------------------------------------------------ reference

// What the reference knows of a model, written down by each test from the
// options it generated the checkpoint with (never read from LlamaConfig).
struct RefSpec {
  int64_t hidden = 64;
  int64_t intermediate = 128;
  int64_t layers = 2;
  int64_t heads = 4;
  int64_t kv_heads = 2;
  int64_t head_dim = 16;
  int64_t vocab = 128;
  double eps = 1e-5;  // what WriteRandomLlamaModel writes
  double theta = 10000.0;
  std::string rope_type = "default";  // "linear", "llama3"
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  double original_max_positions = 8192;
  bool interleaved_rope = false;  // GPT-J pairing (2i, 2i+1): a wrong convention, for one test
  bool qkv_bias = false;
  bool o_bias = false;
  bool tied = false;
  int64_t window = 0;              // attend to j with t - window < j <= t ...
  int64_t first_window_layer = 0;  // ... in the layers from this one on
};

RefSpec SpecFromOptions(const RandomModelOptions& o) {
  RefSpec s;
  s.hidden = o.hidden_size;
  s.intermediate = o.intermediate_size;
  s.layers = o.num_layers;
  s.heads = o.num_heads;
  s.kv_heads = o.num_kv_heads;
  s.head_dim = o.head_dim > 0 ? o.head_dim : o.hidden_size / o.num_heads;
  s.vocab = o.vocab_size;
  s.theta = o.rope_theta;
  s.qkv_bias = o.attention_bias || o.model_type == "qwen2";
  s.o_bias = o.attention_bias;
  s.tied = o.tie_word_embeddings;
  return s;
}

using Vec = std::vector<double>;
struct Mat {
  int64_t rows = 0;
  int64_t cols = 0;
  Vec data;  // row-major
};

Vec ReadVec(const SafetensorsCheckpoint& checkpoint, const std::string& name) {
  absl::StatusOr<at::Tensor> t = checkpoint.Load(name, at::kCPU);
  EXPECT_TRUE(t.ok()) << t.status();
  if (!t.ok()) return {};
  const at::Tensor d = t->to(at::kDouble).contiguous();
  return Vec(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

Mat ReadMat(const SafetensorsCheckpoint& checkpoint, const std::string& name) {
  const CheckpointTensor* info = checkpoint.Find(name);
  EXPECT_NE(info, nullptr) << name;
  if (info == nullptr) return {};
  return Mat{info->info.shape[0], info->info.shape[1], ReadVec(checkpoint, name)};
}

Vec MatVec(const Mat& m, const Vec& x) {
  Vec y(static_cast<size_t>(m.rows), 0.0);
  for (int64_t r = 0; r < m.rows; ++r) {
    double sum = 0;
    for (int64_t c = 0; c < m.cols; ++c) sum += m.data[r * m.cols + c] * x[c];
    y[r] = sum;
  }
  return y;
}

void AddTo(Vec& x, const Vec& y) {
  for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
}

Vec RmsNormRef(const Vec& x, const Vec& w, double eps) {
  double sum_sq = 0;
  for (double v : x) sum_sq += v * v;
  const double scale = 1.0 / std::sqrt(sum_sq / static_cast<double>(x.size()) + eps);
  Vec y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * scale * w[i];
  return y;
}

class NaiveLlama {
 public:
  NaiveLlama(RefSpec spec, const std::string& dir) : s_(std::move(spec)) {
    absl::StatusOr<SafetensorsCheckpoint> checkpoint = SafetensorsCheckpoint::Open(dir);
    EXPECT_TRUE(checkpoint.ok()) << checkpoint.status();
    if (!checkpoint.ok()) return;
    embed_ = ReadMat(*checkpoint, "model.embed_tokens.weight");
    for (int64_t l = 0; l < s_.layers; ++l) {
      auto name = [&](const std::string& suffix) {
        return "model.layers." + std::to_string(l) + "." + suffix;
      };
      Layer layer;
      layer.in_norm = ReadVec(*checkpoint, name("input_layernorm.weight"));
      layer.post_norm = ReadVec(*checkpoint, name("post_attention_layernorm.weight"));
      layer.q = ReadMat(*checkpoint, name("self_attn.q_proj.weight"));
      layer.k = ReadMat(*checkpoint, name("self_attn.k_proj.weight"));
      layer.v = ReadMat(*checkpoint, name("self_attn.v_proj.weight"));
      layer.o = ReadMat(*checkpoint, name("self_attn.o_proj.weight"));
      if (s_.qkv_bias) {
        layer.bq = ReadVec(*checkpoint, name("self_attn.q_proj.bias"));
        layer.bk = ReadVec(*checkpoint, name("self_attn.k_proj.bias"));
        layer.bv = ReadVec(*checkpoint, name("self_attn.v_proj.bias"));
      }
      if (s_.o_bias) layer.bo = ReadVec(*checkpoint, name("self_attn.o_proj.bias"));
      layer.gate = ReadMat(*checkpoint, name("mlp.gate_proj.weight"));
      layer.up = ReadMat(*checkpoint, name("mlp.up_proj.weight"));
      layer.down = ReadMat(*checkpoint, name("mlp.down_proj.weight"));
      layers_.push_back(std::move(layer));
    }
    norm_ = ReadVec(*checkpoint, "model.norm.weight");
    lm_head_ = s_.tied ? embed_ : ReadMat(*checkpoint, "lm_head.weight");
  }

  // The logits at every position of one sequence, computed token by token.
  std::vector<Vec> Logits(const std::vector<int64_t>& tokens) const {
    const int64_t d = s_.head_dim;
    const int64_t group = s_.heads / s_.kv_heads;
    // keys[layer][position]: that position's k (all kv heads), after rotation.
    std::vector<std::vector<Vec>> keys(s_.layers), values(s_.layers);
    std::vector<Vec> logits;
    for (size_t t = 0; t < tokens.size(); ++t) {
      Vec x(embed_.data.begin() + tokens[t] * embed_.cols,
            embed_.data.begin() + (tokens[t] + 1) * embed_.cols);
      for (int64_t l = 0; l < s_.layers; ++l) {
        const Layer& w = layers_[l];
        const Vec h = RmsNormRef(x, w.in_norm, s_.eps);
        Vec q = MatVec(w.q, h), k = MatVec(w.k, h), v = MatVec(w.v, h);
        if (s_.qkv_bias) {
          AddTo(q, w.bq);
          AddTo(k, w.bk);
          AddTo(v, w.bv);
        }
        for (int64_t head = 0; head < s_.heads; ++head) Rotate(&q[head * d], t);
        for (int64_t head = 0; head < s_.kv_heads; ++head) Rotate(&k[head * d], t);
        keys[l].push_back(k);
        values[l].push_back(v);

        const int64_t window = s_.window > 0 && l >= s_.first_window_layer ? s_.window : 0;
        const int64_t first =
            window > 0 ? std::max<int64_t>(0, static_cast<int64_t>(t) - window + 1) : 0;
        Vec attended(static_cast<size_t>(s_.heads * d), 0.0);
        for (int64_t head = 0; head < s_.heads; ++head) {
          const int64_t kv = head / group;
          Vec scores;
          double max_score = -1e300;
          for (int64_t j = first; j <= static_cast<int64_t>(t); ++j) {
            double dot = 0;
            for (int64_t i = 0; i < d; ++i) dot += q[head * d + i] * keys[l][j][kv * d + i];
            scores.push_back(dot / std::sqrt(static_cast<double>(d)));
            max_score = std::max(max_score, scores.back());
          }
          double total = 0;
          for (double& score : scores) total += (score = std::exp(score - max_score));
          for (int64_t j = first; j <= static_cast<int64_t>(t); ++j) {
            const double p = scores[j - first] / total;
            for (int64_t i = 0; i < d; ++i) attended[head * d + i] += p * values[l][j][kv * d + i];
          }
        }
        Vec o = MatVec(w.o, attended);
        if (s_.o_bias) AddTo(o, w.bo);
        AddTo(x, o);

        const Vec m = RmsNormRef(x, w.post_norm, s_.eps);
        const Vec gate = MatVec(w.gate, m), up = MatVec(w.up, m);
        Vec act(gate.size());
        for (size_t i = 0; i < act.size(); ++i)
          act[i] = gate[i] / (1.0 + std::exp(-gate[i])) * up[i];
        AddTo(x, MatVec(w.down, act));
      }
      logits.push_back(MatVec(lm_head_, RmsNormRef(x, norm_, s_.eps)));
    }
    return logits;
  }

 private:
  struct Layer {
    Vec in_norm, post_norm;
    Mat q, k, v, o, gate, up, down;
    Vec bq, bk, bv, bo;
  };

  // transformers' rope init functions, written out for one frequency.
  double InverseFrequency(int64_t i) const {
    const double base = 1.0 / std::pow(s_.theta, 2.0 * i / s_.head_dim);
    if (s_.rope_type == "linear") return base / s_.factor;
    if (s_.rope_type != "llama3") return base;
    const double wavelen = 2 * M_PI / base;
    if (wavelen < s_.original_max_positions / s_.high_freq_factor) return base;
    if (wavelen > s_.original_max_positions / s_.low_freq_factor) return base / s_.factor;
    const double smooth = (s_.original_max_positions / wavelen - s_.low_freq_factor) /
                          (s_.high_freq_factor - s_.low_freq_factor);
    return (1 - smooth) * base / s_.factor + smooth * base;
  }

  // Rotates one head's vector to `position`: pair (i, i + d/2) turns by
  // position * inv_freq(i) (or (2i, 2i + 1) for the wrong convention).
  void Rotate(double* x, size_t position) const {
    const int64_t half = s_.head_dim / 2;
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(position) * InverseFrequency(i);
      const int64_t a = s_.interleaved_rope ? 2 * i : i;
      const int64_t b = s_.interleaved_rope ? 2 * i + 1 : i + half;
      const double x1 = x[a], x2 = x[b];
      x[a] = x1 * std::cos(angle) - x2 * std::sin(angle);
      x[b] = x2 * std::cos(angle) + x1 * std::sin(angle);
    }
  }

  RefSpec s_;
  Mat embed_, lm_head_;
  Vec norm_;
  std::vector<Layer> layers_;
};

// ------------------------------------------------------------------ helpers

// The largest |actual - expected| / max(1, |expected|): below 1e-5 means
// within 1e-5 absolute for logits below 1 and relative above.
double MaxError(const at::Tensor& actual, const at::Tensor& expected) {
  const at::Tensor a = actual.detach().to(at::kDouble);
  const at::Tensor e = expected.detach().to(at::kDouble);
  EXPECT_EQ(a.sizes(), e.sizes());
  if (!a.sizes().equals(e.sizes())) return 1e9;
  return ((a - e).abs() / e.abs().clamp_min(1.0)).max().item<double>();
}

at::Tensor ToTensor(const std::vector<Vec>& rows) {
  std::vector<double> flat;
  for (const Vec& row : rows) flat.insert(flat.end(), row.begin(), row.end());
  return at::tensor(flat, at::kDouble).reshape({static_cast<int64_t>(rows.size()), -1});
}

// [batch, seq] int64 ids, deterministic for a seed.
at::Tensor RandomIds(int64_t batch, int64_t seq, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> ids(static_cast<size_t>(batch * seq));
  for (int64_t& id : ids) id = static_cast<int64_t>(rng() % static_cast<uint32_t>(vocab));
  return at::tensor(ids, at::kLong).reshape({batch, seq});
}

std::vector<int64_t> Row(const at::Tensor& ids, int64_t row) {
  const at::Tensor r = ids.select(0, row).contiguous();
  return std::vector<int64_t>(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
}

// The small model most tests use: Llama with GQA, larger weights than
// Llama's init so that attention is far from uniform and errors show.
RandomModelOptions SmallOptions() {
  RandomModelOptions o;
  o.hidden_size = 64;
  o.intermediate_size = 128;
  o.num_layers = 2;
  o.num_heads = 4;
  o.num_kv_heads = 2;
  o.vocab_size = 128;
  o.init_std = 0.1;
  o.seed = 7;
  return o;
}

LlamaModel LoadOrDie(const std::string& dir, LlamaLoadOptions options = {}) {
  absl::StatusOr<LlamaModel> model = LlamaModel::Load(dir, options);
  if (!model.ok()) {
    ADD_FAILURE() << model.status();
    std::abort();
  }
  return std::move(model).value();
}

at::Tensor ForwardOrDie(const LlamaModel& model, const at::Tensor& ids, KvCache* cache = nullptr,
                        LinearHook* hook = nullptr) {
  absl::StatusOr<at::Tensor> logits = model.Forward(ids, cache, hook);
  EXPECT_TRUE(logits.ok()) << logits.status();
  return logits.ok() ? *logits : at::Tensor();
}

void EditConfig(const std::string& dir, const std::function<void(Json&)>& edit) {
  Json config = Json::parse(ReadBytes(dir + "/config.json"));
  edit(config);
  WriteBytes(dir + "/config.json", config.dump(2));
}

// ------------------------------------------------------------------ config

Json BaseConfig() {
  return {{"architectures", {"LlamaForCausalLM"}},
          {"model_type", "llama"},
          {"hidden_size", 64},
          {"intermediate_size", 128},
          {"num_hidden_layers", 2},
          {"num_attention_heads", 4},
          {"vocab_size", 128}};
}

// BaseConfig as another family (with the key/value heads given: the
// transformers defaults of mistral (8) and qwen2 (32) do not fit 4 heads).
Json FamilyConfig(const std::string& model_type, const std::string& architecture) {
  Json j = BaseConfig();
  j["model_type"] = model_type;
  j["architectures"] = {architecture};
  j["num_key_value_heads"] = 2;
  return j;
}

absl::StatusOr<LlamaConfig> Parse(const Json& config) {
  return ParseLlamaConfig(config.dump(), "test/config.json");
}

TEST(LlamaConfig, AppliesTransformersDefaults) {
  absl::StatusOr<LlamaConfig> c = Parse(BaseConfig());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->family, LlamaFamily::kLlama);
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_FALSE(c->tie_word_embeddings || c->qkv_bias || c->o_bias);
  EXPECT_EQ(c->sliding_window, 0);

  Json mistral = FamilyConfig("mistral", "MistralForCausalLM");
  c = Parse(mistral);  // MistralConfig's sliding_window defaults to 4096 ...
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sliding_window, 4096);
  EXPECT_EQ(c->SlidingWindow(0), 4096);
  mistral["sliding_window"] = nullptr;  // ... and null means none
  EXPECT_EQ(Parse(mistral)->sliding_window, 0);
  mistral.erase("num_key_value_heads");  // MistralConfig's default: 8
  mistral["hidden_size"] = 256;
  mistral["num_attention_heads"] = 16;
  EXPECT_EQ(Parse(mistral)->num_key_value_heads, 8);
  mistral["num_attention_heads"] = 4;
  ExpectInvalidArgument(Parse(mistral).status(), {"num_key_value_heads", "mistral's default 8"});

  Json qwen = FamilyConfig("qwen2", "Qwen2ForCausalLM");
  qwen["sliding_window"] = 8;
  c = Parse(qwen);  // use_sliding_window defaults to false
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->qkv_bias);
  EXPECT_FALSE(c->o_bias);
  EXPECT_EQ(c->sliding_window, 0);
  qwen["use_sliding_window"] = true;
  qwen["max_window_layers"] = 1;
  c = Parse(qwen);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->SlidingWindow(0), 0);
  EXPECT_EQ(c->SlidingWindow(1), 8);
}

TEST(LlamaConfig, ParsesLlama3AndRoundTrips) {
  Json j = BaseConfig();
  j["num_key_value_heads"] = 2;
  j["head_dim"] = 32;  // q_proj is then [128, 64]
  j["rope_theta"] = 500000.0;
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  j["attention_bias"] = true;
  j["tie_word_embeddings"] = true;
  j["bos_token_id"] = 1;
  j["eos_token_id"] = {2, 3};
  j["torch_dtype"] = "bfloat16";
  j["initializer_range"] = 0.02;  // not modelled: kept verbatim
  absl::StatusOr<LlamaConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_EQ(c->q_dim(), 128);
  EXPECT_EQ(c->kv_dim(), 64);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(c->rope_scaling.factor, 8.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_TRUE(c->qkv_bias && c->o_bias && c->tie_word_embeddings);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(c->torch_dtype, "bfloat16");

  const std::string written = LlamaConfigJson(*c);
  EXPECT_EQ(Json::parse(written)["initializer_range"], 0.02);
  absl::StatusOr<LlamaConfig> again = ParseLlamaConfig(written, "again");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->head_dim, c->head_dim);
  EXPECT_EQ(again->num_key_value_heads, c->num_key_value_heads);
  EXPECT_EQ(again->rope_theta, c->rope_theta);
  EXPECT_TRUE(again->rope_scaling == c->rope_scaling);
  EXPECT_EQ(again->qkv_bias, c->qkv_bias);
  EXPECT_EQ(again->o_bias, c->o_bias);
  EXPECT_EQ(again->tie_word_embeddings, c->tie_word_embeddings);
  EXPECT_EQ(again->eos_token_ids, c->eos_token_ids);
  EXPECT_EQ(again->rms_norm_eps, c->rms_norm_eps);

  // Qwen2 with a window from layer 1 on, and v5's rope_parameters.
  Json qwen = FamilyConfig("qwen2", "Qwen2ForCausalLM");
  qwen["use_sliding_window"] = true;
  qwen["sliding_window"] = 5;
  qwen["max_window_layers"] = 28;  // layer_types decides
  qwen["layer_types"] = {"full_attention", "sliding_attention"};
  qwen["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1000000.0}};
  c = Parse(qwen);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_theta, 1000000.0);
  EXPECT_EQ(c->first_sliding_layer, 1);
  again = ParseLlamaConfig(LlamaConfigJson(*c), "again");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->rope_theta, 1000000.0);
  EXPECT_EQ(again->sliding_window, 5);
  EXPECT_EQ(again->first_sliding_layer, 1);
}

TEST(LlamaConfig, RejectsWhatTheRuntimeDoesNotImplementNamingTheField) {
  struct Case {
    std::function<void(Json&)> edit;
    std::vector<std::string> fragments;
  };
  const std::vector<Case> cases = {
      {[](Json& j) { j["hidden_act"] = "gelu"; }, {"test/config.json", "hidden_act", "gelu"}},
      {[](Json& j) {
         j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
       },
       {"rope_scaling.rope_type", "yarn"}},
      {[](Json& j) {
         j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
       },
       {"rope_scaling.type", "dynamic"}},
      {[](Json& j) {
         j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
       },
       {"rope_scaling.low_freq_factor", "missing"}},
      {[](Json& j) { j["architectures"] = {"LlamaForSequenceClassification"}; },
       {"architectures", "LlamaForSequenceClassification"}},
      {[](Json& j) { j["architectures"] = {"MistralForCausalLM"}; },
       {"architectures", "MistralForCausalLM", "model_type"}},
      {[](Json& j) { j["model_type"] = "gemma"; }, {"model_type", "gemma"}},
      {[](Json& j) { j["num_attention_heads"] = 5; },
       {"hidden_size", "64", "num_attention_heads 5"}},
      {[](Json& j) { j["num_key_value_heads"] = 3; }, {"num_key_value_heads", "3"}},
      {[](Json& j) { j["head_dim"] = 15; }, {"head_dim", "15"}},
      {[](Json& j) { j["mlp_bias"] = true; }, {"mlp_bias"}},
      {[](Json& j) { j.erase("hidden_size"); }, {"hidden_size", "missing"}},
      {[](Json& j) { j["vocab_size"] = "128"; }, {"vocab_size", "\"128\"", "integer"}},
      {[](Json& j) { j["intermediate_size"] = 0; }, {"intermediate_size", "0"}},
      {[](Json& j) { j["rms_norm_eps"] = -1; }, {"rms_norm_eps", "-1"}},
      {[](Json& j) {
         j = FamilyConfig("qwen2", "Qwen2ForCausalLM");
         j["use_sliding_window"] = true;
         j["sliding_window"] = 4;
         j["layer_types"] = {"sliding_attention", "full_attention"};
       },
       {"layer_types", "layer 1"}},
  };
  for (const Case& c : cases) {
    Json j = BaseConfig();
    c.edit(j);
    SCOPED_TRACE(j.dump());
    const absl::Status status = Parse(j).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    for (const std::string& fragment : c.fragments) {
      EXPECT_THAT(std::string(status.message()), ::testing::HasSubstr(fragment));
    }
  }
  ExpectInvalidArgument(ParseLlamaConfig("{not json", "x/config.json").status(), {"x/config.json"});
  TempDir dir;
  EXPECT_EQ(ReadLlamaConfig(dir.path()).status().code(), absl::StatusCode::kNotFound);
}

// ------------------------------------------------------------------ forward

struct ForwardCase {
  std::string name;
  RandomModelOptions options;
  RefSpec ref;
  int64_t batch = 2;
  int64_t seq = 12;
};

std::vector<ForwardCase> ForwardCases() {
  std::vector<ForwardCase> cases;
  {
    ForwardCase c{"LlamaGqa", SmallOptions(), {}, 3, 11};
    c.ref = SpecFromOptions(c.options);
    cases.push_back(c);
  }
  {
    // Llama 3.1's rope scaling; an original context of 64 puts the head's
    // frequencies in all three bands (kept, interpolated, divided). MQA.
    ForwardCase c{"Llama3RopeScaling", SmallOptions(), {}, 2, 16};
    c.options.num_kv_heads = 1;
    c.options.rope_theta = 500000.0;
    c.options.extra_config_json = R"({"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})";
    c.ref = SpecFromOptions(c.options);
    c.ref.rope_type = "llama3";
    c.ref.factor = 8;
    c.ref.low_freq_factor = 1;
    c.ref.high_freq_factor = 4;
    c.ref.original_max_positions = 64;
    cases.push_back(c);
  }
  {
    // attention_bias (q/k/v/o), tied embeddings, a head_dim that is not
    // hidden / heads, and linear scaling under the older "type" key.
    ForwardCase c{"LlamaBiasTiedHeadDim", SmallOptions(), {}, 2, 10};
    c.options.attention_bias = true;
    c.options.tie_word_embeddings = true;
    c.options.head_dim = 24;
    c.options.extra_config_json = R"({"rope_scaling": {"type": "linear", "factor": 2.0}})";
    c.ref = SpecFromOptions(c.options);
    c.ref.rope_type = "linear";
    c.ref.factor = 2;
    cases.push_back(c);
  }
  {
    ForwardCase c{"MistralSlidingWindowBf16", SmallOptions(), {}, 2, 12};
    c.options.model_type = "mistral";
    c.options.dtype = SafetensorsDtype::kBF16;
    c.options.extra_config_json = R"({"sliding_window": 4})";
    c.ref = SpecFromOptions(c.options);
    c.ref.window = 4;
    cases.push_back(c);
  }
  {
    ForwardCase c{"Qwen2BiasWindowTiedF16", SmallOptions(), {}, 2, 12};
    c.options.model_type = "qwen2";
    c.options.dtype = SafetensorsDtype::kF16;
    c.options.tie_word_embeddings = true;
    c.options.rope_theta = 1000000.0;
    c.options.extra_config_json =
        R"({"use_sliding_window": true, "sliding_window": 3, "max_window_layers": 1})";
    c.ref = SpecFromOptions(c.options);
    c.ref.window = 3;
    c.ref.first_window_layer = 1;
    cases.push_back(c);
  }
  return cases;
}

void PrintTo(const ForwardCase& c, std::ostream* os) { *os << c.name; }

class LlamaForward : public ::testing::TestWithParam<ForwardCase> {};

TEST_P(LlamaForward, BatchedForwardMatchesNaiveReference) {
  const ForwardCase& c = GetParam();
  TempDir dir;
  ASSERT_TRUE(WriteRandomLlamaModel(c.options, dir.path()).ok());
  const LlamaModel model = LoadOrDie(dir.path());
  const at::Tensor ids = RandomIds(c.batch, c.seq, c.options.vocab_size, 1234);
  const at::Tensor logits = ForwardOrDie(model, ids);
  ASSERT_EQ(logits.sizes(), (std::vector<int64_t>{c.batch, c.seq, c.options.vocab_size}));
  EXPECT_EQ(logits.scalar_type(), at::kFloat);

  const NaiveLlama reference(c.ref, dir.path());
  for (int64_t b = 0; b < c.batch; ++b) {
    SCOPED_TRACE(b);
    const at::Tensor expected = ToTensor(reference.Logits(Row(ids, b)));
    EXPECT_LT(MaxError(logits.select(0, b), expected), 1e-5);
    EXPECT_GT(expected.abs().max().item<double>(), 0.3);  // logits are not all near 0
  }
}

INSTANTIATE_TEST_SUITE_P(Llama, LlamaForward, ::testing::ValuesIn(ForwardCases()),
                         [](const auto& info) { return info.param.name; });

// The comparison above can tell the rotary conventions and scalings apart.
TEST(LlamaForwardReference, DetectsAWrongRopeConventionOrScaling) {
  const ForwardCase c = ForwardCases()[1];  // Llama3RopeScaling
  TempDir dir;
  ASSERT_TRUE(WriteRandomLlamaModel(c.options, dir.path()).ok());
  const LlamaModel model = LoadOrDie(dir.path());
  const at::Tensor ids = RandomIds(1, c.seq, c.options.vocab_size, 99);
  const at::Tensor logits = ForwardOrDie(model, ids).select(0, 0);

  RefSpec interleaved = c.ref;
  interleaved.interleaved_rope = true;
  RefSpec unscaled = c.ref;
  unscaled.rope_type = "default";
  EXPECT_LT(MaxError(logits, ToTensor(NaiveLlama(c.ref, dir.path()).Logits(Row(ids, 0)))), 1e-5);
  EXPECT_GT(MaxError(logits, ToTensor(NaiveLlama(interleaved, dir.path()).Logits(Row(ids, 0)))),
            1e-3);
  EXPECT_GT(MaxError(logits, ToTensor(NaiveLlama(unscaled, dir.path()).Logits(Row(ids, 0)))), 1e-3);
}

// ------------------------------------------------------------------ blocks and hooks

TEST(LlamaModel, LazyBlocksChainedByHandEqualForward) {
  TempDir dir;
  RandomModelOptions options = SmallOptions();
  options.model_type = "qwen2";  // biases travel through LoadBlock too
  ASSERT_TRUE(WriteRandomLlamaModel(options, dir.path()).ok());
  const LlamaModel resident = LoadOrDie(dir.path());
  LlamaLoadOptions lazy_options;
  lazy_options.resident = false;
  const LlamaModel lazy = LoadOrDie(dir.path(), lazy_options);
  EXPECT_TRUE(lazy.blocks().empty());
  EXPECT_EQ(resident.blocks().size(), 2u);

  const at::Tensor ids = RandomIds(2, 9, options.vocab_size, 5);
  const at::Tensor expected = ForwardOrDie(resident, ids);
  EXPECT_TRUE(ForwardOrDie(lazy, ids).equal(expected));
  RandomModelOptions sharded = options;  // the same weights in shards with an index
  sharded.max_shard_bytes = 40000;
  ASSERT_TRUE(WriteRandomLlamaModel(sharded, dir / "sharded").ok());
  EXPECT_TRUE(ForwardOrDie(LoadOrDie(dir / "sharded", lazy_options), ids).equal(expected));

  // What the layer-wise runner does: one block resident at a time.
  const LlamaConfig& config = lazy.config();
  absl::StatusOr<at::Tensor> hidden = Embed(lazy.embed_tokens(), ids);
  ASSERT_TRUE(hidden.ok()) << hidden.status();
  absl::StatusOr<RotaryCache> rope = MakeRotaryCache(config, 0, 9, at::kCPU, at::kFloat);
  ASSERT_TRUE(rope.ok()) << rope.status();
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    absl::StatusOr<DecoderBlockWeights> block = lazy.LoadBlock(layer);
    ASSERT_TRUE(block.ok()) << block.status();
    EXPECT_EQ(block->NamedTensors().size(), 12u);  // 2 norms, 7 weights, 3 biases
    hidden = DecoderBlockForward(config, *block, *hidden, *rope, nullptr, nullptr);
    ASSERT_TRUE(hidden.ok()) << hidden.status();
  }
  absl::StatusOr<at::Tensor> logits = OutputLogits(config, lazy.norm(), lazy.lm_head(), *hidden);
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_TRUE(logits->equal(expected));

  // A block held in bfloat16 computes in the hidden states' float32: the
  // same as its float32 copy, exactly.
  {
    const at::Tensor h = at::randn({2, 9, 64});
    DecoderBlockWeights narrow = *lazy.LoadBlock(0);
    DecoderBlockWeights wide = narrow;
    for (auto& [name, tensor] : narrow.NamedTensors()) *tensor = tensor->to(at::kBFloat16);
    for (auto& [name, tensor] : wide.NamedTensors()) *tensor = tensor->to(at::kBFloat16).to(at::kFloat);
    absl::StatusOr<at::Tensor> from_narrow = DecoderBlockForward(config, narrow, h, *rope, nullptr, nullptr);
    absl::StatusOr<at::Tensor> from_wide = DecoderBlockForward(config, wide, h, *rope, nullptr, nullptr);
    ASSERT_TRUE(from_narrow.ok() && from_wide.ok()) << from_narrow.status();
    EXPECT_EQ(from_narrow->scalar_type(), at::kFloat);
    EXPECT_TRUE(from_narrow->equal(*from_wide));
  }

  // Misuse is a status naming the tensor and both shapes, not an exception.
  absl::StatusOr<DecoderBlockWeights> block = lazy.LoadBlock(1);
  ASSERT_TRUE(block.ok()) << block.status();
  const at::Tensor input = at::randn({2, 9, 64});
  auto run = [&](const DecoderBlockWeights& w, const at::Tensor& h, const RotaryCache& r) {
    return DecoderBlockForward(config, w, h, r, nullptr, nullptr).status();
  };
  DecoderBlockWeights broken = *block;
  broken.gate_proj.weight = broken.gate_proj.weight.narrow(0, 0, 100);
  ExpectInvalidArgument(run(broken, input, *rope),
                        {"model.layers.1.mlp.gate_proj.weight", "[100, 64]", "[128, 64]"});
  broken = *block;
  broken.q_proj.bias = at::Tensor();
  ExpectInvalidArgument(run(broken, input, *rope),
                        {"model.layers.1.self_attn.q_proj.bias", "missing", "[64]"});
  broken = *block;
  broken.o_proj.bias = at::zeros({64});
  ExpectInvalidArgument(run(broken, input, *rope),
                        {"model.layers.1.self_attn.o_proj.bias", "no such tensor"});
  broken = *block;
  broken.down_proj.weight = broken.down_proj.weight.to(at::kDouble);
  ExpectInvalidArgument(run(broken, input, *rope),
                        {"model.layers.1.mlp.down_proj.weight", "Double"});
  ExpectInvalidArgument(run(*block, at::zeros({2, 9, 32}), *rope), {"hidden states", "[2, 9, 32]"});
  ExpectInvalidArgument(run(*block, input, *MakeRotaryCache(config, 3, 9, at::kCPU, at::kFloat)),
                        {"rotary", "[3, 12)", "[0, 9)"});
  ExpectInvalidArgument(Embed(lazy.embed_tokens(), at::full({1, 2}, 128, at::kLong)).status(),
                        {"input_ids", "128", "[0, 128)"});
  ExpectInvalidArgument(Embed(lazy.embed_tokens(), at::zeros({4}, at::kLong)).status(),
                        {"input_ids", "[4]"});
  ExpectInvalidArgument(lazy.LoadBlock(2).status(), {"layer 2"});
}

// Records every call; optionally fails at one.
class RecordingHook : public LinearHook {
 public:
  struct Call {
    int64_t layer;
    std::string linear;
    std::vector<int64_t> shape;
    at::Tensor input;
  };
  absl::Status OnLinearInput(int64_t layer, absl::string_view linear,
                             const at::Tensor& input) override {
    calls.push_back({layer, std::string(linear), input.sizes().vec(), input});
    if (fail_at_call == static_cast<int>(calls.size())) return absl::CancelledError("stop here");
    return absl::OkStatus();
  }
  std::vector<Call> calls;
  int fail_at_call = -1;
};

TEST(LlamaModel, HookSeesEveryLinearInputInOrder) {
  TempDir dir;
  RandomModelOptions options = SmallOptions();
  options.head_dim = 24;  // so that o_proj's input (heads * 24 = 96) differs from hidden
  ASSERT_TRUE(WriteRandomLlamaModel(options, dir.path()).ok());
  const LlamaModel model = LoadOrDie(dir.path());
  const at::Tensor ids = RandomIds(3, 5, options.vocab_size, 8);
  RecordingHook hook;
  const at::Tensor with_hook = ForwardOrDie(model, ids, nullptr, &hook);
  EXPECT_TRUE(with_hook.equal(ForwardOrDie(model, ids)));  // observing changes nothing

  const std::vector<std::pair<std::string, int64_t>> expected = {
      {"self_attn.q_proj", 64}, {"self_attn.k_proj", 64}, {"self_attn.v_proj", 64},
      {"self_attn.o_proj", 96}, {"mlp.gate_proj", 64},    {"mlp.up_proj", 64},
      {"mlp.down_proj", 128}};
  ASSERT_EQ(hook.calls.size(), 2 * expected.size());
  for (size_t i = 0; i < hook.calls.size(); ++i) {
    const RecordingHook::Call& call = hook.calls[i];
    SCOPED_TRACE(call.linear);
    EXPECT_EQ(call.layer, static_cast<int64_t>(i / 7));
    EXPECT_EQ(call.linear, expected[i % 7].first);
    EXPECT_EQ(call.linear, kBlockLinears[i % 7].name);
    EXPECT_EQ(call.shape, (std::vector<int64_t>{3, 5, expected[i % 7].second}));
  }
  // q/k/v share one input, as do gate/up (a hook may skip repeated work).
  EXPECT_TRUE(hook.calls[0].input.is_same(hook.calls[1].input));
  EXPECT_TRUE(hook.calls[0].input.is_same(hook.calls[2].input));
  EXPECT_TRUE(hook.calls[4].input.is_same(hook.calls[5].input));
  // The q_proj input is the normed hidden state: q_proj of it is what attention uses.
  EXPECT_FALSE(hook.calls[0].input.is_same(hook.calls[7].input));

  // A failing hook stops the pass with its status, and leaves a cache as it was.
  c10::InferenceMode inference;
  KvCache cache(2);
  ASSERT_TRUE(model.Forward(ids, &cache).ok());
  RecordingHook failing;
  failing.fail_at_call = 9;  // layer 1, k_proj: layer 0 already appended
  const absl::Status status = model.Forward(ids.narrow(1, 0, 1), &cache, &failing).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled) << status;
  EXPECT_EQ(cache.length(0), 5);
  EXPECT_EQ(cache.length(1), 5);
  EXPECT_TRUE(model.Forward(ids.narrow(1, 0, 1), &cache).ok());
}

// ------------------------------------------------------------------ training, saving

TEST(LlamaModel, GradientsReachEveryParameter) {
  TempDir dir;
  RandomModelOptions options = SmallOptions();
  options.model_type = "qwen2";  // biases too
  options.tie_word_embeddings = true;
  ASSERT_TRUE(WriteRandomLlamaModel(options, dir.path()).ok());
  const LlamaModel model = LoadOrDie(dir.path());
  const std::vector<std::pair<std::string, at::Tensor>> params = model.NamedParameters();
  EXPECT_EQ(params.size(), 1u + 2u * 12u + 1u);  // tied: no lm_head.weight
  for (const auto& [name, tensor] : params) {
    EXPECT_TRUE(tensor.is_leaf()) << name;
    EXPECT_FALSE(tensor.requires_grad()) << name;
    tensor.set_requires_grad(true);
  }
  EXPECT_TRUE(model.lm_head().requires_grad());  // the same tensor as the embeddings

  const at::Tensor ids = RandomIds(2, 8, options.vocab_size, 3);
  const at::Tensor logits = ForwardOrDie(model, ids.narrow(1, 0, 7));
  const at::Tensor targets = ids.narrow(1, 1, 7);
  const at::Tensor loss =
      at::cross_entropy_loss(logits.reshape({-1, options.vocab_size}), targets.reshape({-1}));
  loss.backward();
  for (const auto& [name, tensor] : params) {
    ASSERT_TRUE(tensor.grad().defined()) << name;
    EXPECT_GT(tensor.grad().abs().sum().item<double>(), 0.0) << name;
    EXPECT_TRUE(at::isfinite(tensor.grad()).all().item<bool>()) << name;
  }
}

TEST(LlamaModel, SaveHuggingFaceReloadsToIdenticalLogits) {
  TempDir dir;
  RandomModelOptions options = SmallOptions();
  options.model_type = "mistral";
  options.dtype = SafetensorsDtype::kBF16;
  options.extra_config_json = R"({"sliding_window": 4, "bos_token_id": 1, "eos_token_id": 2})";
  ASSERT_TRUE(WriteRandomLlamaModel(options, dir / "in").ok());
  const LlamaModel model = LoadOrDie(dir / "in");
  {
    // Training changes resident weights in place; the save must carry that.
    at::NoGradGuard no_grad;
    model.blocks()[0].up_proj.weight.mul_(1.5);
  }
  const at::Tensor ids = RandomIds(2, 10, options.vocab_size, 4);
  const at::Tensor expected = ForwardOrDie(model, ids);

  ASSERT_TRUE(model.SaveHuggingFace(dir / "out").ok());
  const LlamaModel reloaded = LoadOrDie(dir / "out");
  EXPECT_TRUE(ForwardOrDie(reloaded, ids).equal(expected));
  const Json config = Json::parse(ReadBytes(dir / "out/config.json"));
  EXPECT_EQ(config["torch_dtype"], "float32");
  EXPECT_EQ(config["model_type"], "mistral");
  EXPECT_EQ(config["sliding_window"], 4);
  EXPECT_EQ(config["eos_token_id"], 2);
  EXPECT_EQ(config["initializer_range"], 0.1);  // kept from the input

  // A lazy model saves the checkpoint's weights, block by block, here as BF16:
  // the bytes of the input (the BF16 -> F32 -> BF16 round trip is exact).
  LlamaLoadOptions lazy;
  lazy.resident = false;
  const LlamaModel lazy_model = LoadOrDie(dir / "in", lazy);
  ASSERT_TRUE(lazy_model.SaveHuggingFace(dir / "lazy", at::kBFloat16).ok());
  absl::StatusOr<SafetensorsCheckpoint> in = SafetensorsCheckpoint::Open(dir / "in");
  absl::StatusOr<SafetensorsCheckpoint> out = SafetensorsCheckpoint::Open(dir / "lazy");
  ASSERT_TRUE(in.ok() && out.ok());
  ASSERT_EQ(in->tensors().size(), out->tensors().size());
  for (const CheckpointTensor& t : in->tensors()) {
    EXPECT_EQ(*in->RawBytes(t.info.name), *out->RawBytes(t.info.name)) << t.info.name;
  }
  EXPECT_EQ(Json::parse(ReadBytes(dir / "lazy/config.json"))["torch_dtype"], "bfloat16");

  // A folder whose index would shadow the file is refused; NaN is never written.
  WriteBytes(dir / "indexed/model.safetensors.index.json", "{}");
  EXPECT_EQ(model.SaveHuggingFace(dir / "indexed").code(), absl::StatusCode::kFailedPrecondition);
  {
    at::NoGradGuard no_grad;
    model.norm().fill_(std::nan(""));
  }
  const absl::Status nan_status = model.SaveHuggingFace(dir / "nan");
  EXPECT_EQ(nan_status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(nan_status.message()), ::testing::HasSubstr("model.norm.weight"));
  EXPECT_FALSE(fs::exists(dir / "nan/model.safetensors"));
}

// A bfloat16 compute dtype runs the same math (norms and softmax in float32)
// to bfloat16's precision.
TEST(LlamaModel, ComputesInBfloat16) {
  TempDir dir;
  ASSERT_TRUE(WriteRandomLlamaModel(SmallOptions(), dir.path()).ok());
  LlamaLoadOptions bf16;
  bf16.dtype = at::kBFloat16;
  const LlamaModel model = LoadOrDie(dir.path(), bf16);
  EXPECT_EQ(model.embed_tokens().scalar_type(), at::kBFloat16);
  const at::Tensor ids = RandomIds(2, 8, 128, 6);
  const at::Tensor logits = ForwardOrDie(model, ids);
  EXPECT_EQ(logits.scalar_type(), at::kBFloat16);
  const at::Tensor reference = ForwardOrDie(LoadOrDie(dir.path()), ids);
  EXPECT_LT(MaxError(logits, reference), 0.05);
  EXPECT_GT(MaxError(logits, reference), 0.0);  // it did not quietly run in float32

  // float16: LibTorch 1.13 has no CPU matmul for it, 2.x has. Either it
  // works, or loading says so (never a failure at the first forward).
  LlamaLoadOptions f16;
  f16.dtype = at::kHalf;
  absl::StatusOr<LlamaModel> half = LlamaModel::Load(dir.path(), f16);
  if (half.ok()) {
    EXPECT_LT(MaxError(ForwardOrDie(*half, ids), reference), 0.01);
  } else {
    ExpectInvalidArgument(half.status(), {"Half", "not supported on cpu"});
  }
}

TEST(LlamaModel, RejectsCheckpointsThatDoNotMatchTheConfig) {
  TempDir dir;
  const RandomModelOptions options = SmallOptions();
  ASSERT_TRUE(WriteRandomLlamaModel(options, dir / "shape").ok());
  EditConfig(dir / "shape", [](Json& j) { j["intermediate_size"] = 96; });
  ExpectInvalidArgument(
      LlamaModel::Load(dir / "shape").status(),
      {"model.safetensors", "model.layers.0.mlp.gate_proj.weight", "[128, 64]", "[96, 64]"});

  RandomModelOptions tied = options;
  tied.tie_word_embeddings = true;
  ASSERT_TRUE(WriteRandomLlamaModel(tied, dir / "missing").ok());
  EditConfig(dir / "missing", [](Json& j) { j["tie_word_embeddings"] = false; });
  ExpectInvalidArgument(LlamaModel::Load(dir / "missing").status(),
                        {"lm_head.weight", "missing", "[128, 64]"});

  RandomModelOptions qwen = options;
  qwen.model_type = "qwen2";
  ASSERT_TRUE(WriteRandomLlamaModel(qwen, dir / "unexpected").ok());
  EditConfig(dir / "unexpected", [](Json& j) {
    j["model_type"] = "llama";
    j["architectures"] = {"LlamaForCausalLM"};
  });
  ExpectInvalidArgument(LlamaModel::Load(dir / "unexpected").status(),
                        {"model.layers.0.self_attn.q_proj.bias", "not part of a llama model"});

  ASSERT_TRUE(WriteRandomLlamaModel(options, dir / "ok").ok());
  LlamaLoadOptions f64;
  f64.dtype = at::kDouble;
  ExpectInvalidArgument(LlamaModel::Load(dir / "ok", f64).status(), {"compute dtype", "Double"});
  EditConfig(dir / "ok", [](Json& j) { j["hidden_act"] = "gelu_pytorch_tanh"; });
  ExpectInvalidArgument(LlamaModel::Load(dir / "ok").status(),
                        {"config.json", "hidden_act", "gelu_pytorch_tanh"});
  fs::remove(dir / "ok/config.json");
  EXPECT_EQ(LlamaModel::Load(dir / "ok").status().code(), absl::StatusCode::kNotFound);
}

// ------------------------------------------------------------------ kv cache

// Prefill, a chunk, then single tokens: the logits of the new positions equal
// a full forward over the sequence so far, with a sliding window shorter
// than the sequence and a batch of two.
TEST(LlamaKvCache, IncrementalLogitsMatchFullForward) {
  TempDir dir;
  RandomModelOptions options = SmallOptions();
  options.model_type = "mistral";
  options.extra_config_json = R"({"sliding_window": 4})";
  ASSERT_TRUE(WriteRandomLlamaModel(options, dir.path()).ok());
  const LlamaModel model = LoadOrDie(dir.path());
  c10::InferenceMode inference;
  const at::Tensor ids = RandomIds(2, 14, options.vocab_size, 21);
  KvCache cache(2, /*reserve_tokens=*/3);  // small: the buffers must grow
  int64_t done = 0;
  for (const int64_t chunk : {5, 3, 1, 1, 1, 1, 1, 1}) {
    SCOPED_TRACE(done);
    const at::Tensor step = ForwardOrDie(model, ids.narrow(1, done, chunk), &cache);
    done += chunk;
    EXPECT_EQ(cache.length(), done);
    const at::Tensor full = ForwardOrDie(model, ids.narrow(1, 0, done));
    EXPECT_LT(MaxError(step, full.narrow(1, done - chunk, chunk)), 1e-5);
  }
  cache.Clear();
  EXPECT_EQ(cache.length(), 0);
}

TEST(LlamaKvCache, RefusesMismatchedAppends) {
  KvCache cache(2);
  {
    c10::InferenceMode inference;
    ASSERT_TRUE(cache.Append(0, at::zeros({1, 2, 3, 8}), at::zeros({1, 2, 3, 8})).ok());
    ExpectInvalidArgument(
        cache.Append(0, at::zeros({1, 4, 1, 8}), at::zeros({1, 4, 1, 8})).status(),
        {"layer 0", "[1, 4, 1, 8]", "[1, 2, 3, 8]"});
    ExpectInvalidArgument(
        cache.Append(2, at::zeros({1, 2, 1, 8}), at::zeros({1, 2, 1, 8})).status(), {"layer 2"});
    ExpectInvalidArgument(
        cache.Append(1, at::zeros({1, 2, 1, 8}), at::zeros({1, 2, 2, 8})).status(),
        {"[1, 2, 1, 8]", "[1, 2, 2, 8]"});
    absl::StatusOr<std::pair<at::Tensor, at::Tensor>> grown =
        cache.Append(0, at::ones({1, 2, 2, 8}), at::ones({1, 2, 2, 8}));
    ASSERT_TRUE(grown.ok());
    EXPECT_EQ(grown->first.sizes(), (std::vector<int64_t>{1, 2, 5, 8}));
    EXPECT_EQ(grown->first.sum().item<double>(), 2 * 2 * 8);
  }
  const at::Tensor grad = at::zeros({1, 2, 1, 8}).set_requires_grad(true);
  EXPECT_EQ(cache.Append(1, grad, grad).status().code(), absl::StatusCode::kFailedPrecondition);
}

// ------------------------------------------------------------------ generation

class LlamaGenerate : public ::testing::Test {
 protected:
  void SetUp() override {
    RandomModelOptions options = SmallOptions();
    options.model_type = "qwen2";
    ASSERT_TRUE(WriteRandomLlamaModel(options, dir_.path()).ok());
    model_ = std::make_unique<LlamaModel>(LoadOrDie(dir_.path()));
  }

  TempDir dir_;
  std::unique_ptr<LlamaModel> model_;
  const std::vector<int32_t> prompt_ = {5, 17, 99, 3, 64};
};

// Greedy decoding with the cache chooses the argmax of a full forward over
// the growing sequence at every step, from the same logits.
TEST_F(LlamaGenerate, GreedyMatchesFullForwardsStepByStep) {
  std::vector<at::Tensor> step_logits;
  GenerateOptions options;
  options.max_new_tokens = 10;
  options.on_token = [&](int32_t, const at::Tensor& logits) {
    step_logits.push_back(logits.clone());
    return absl::OkStatus();
  };
  absl::StatusOr<GenerateResult> result = Generate(*model_, prompt_, options);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->tokens.size(), 10u);
  EXPECT_FALSE(result->stopped);
  EXPECT_EQ(result->prompt_tokens, 5);
  EXPECT_GT(result->prefill_tokens_per_second(), 0);
  EXPECT_GT(result->decode_tokens_per_second(), 0);

  c10::InferenceMode inference;
  std::vector<int64_t> sequence(prompt_.begin(), prompt_.end());
  for (size_t step = 0; step < result->tokens.size(); ++step) {
    SCOPED_TRACE(step);
    const at::Tensor full = ForwardOrDie(*model_, at::tensor(sequence, at::kLong).unsqueeze(0))
                                .select(0, 0)
                                .select(0, -1);
    EXPECT_LT(MaxError(step_logits[step], full), 1e-5);
    EXPECT_EQ(result->tokens[step], full.argmax().item<int64_t>());
    sequence.push_back(result->tokens[step]);
  }
}

TEST_F(LlamaGenerate, SamplingIsReproducibleForASeedAndTinyTopPIsGreedy) {
  GenerateOptions options;
  options.max_new_tokens = 12;
  options.temperature = 1.5;
  options.seed = 42;
  absl::StatusOr<GenerateResult> a = Generate(*model_, prompt_, options);
  absl::StatusOr<GenerateResult> b = Generate(*model_, prompt_, options);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens, b->tokens);
  options.seed = 43;
  absl::StatusOr<GenerateResult> c = Generate(*model_, prompt_, options);
  ASSERT_TRUE(c.ok());
  EXPECT_NE(a->tokens, c->tokens);  // 12 draws over 128 tokens at temperature 1.5

  GenerateOptions greedy;
  greedy.max_new_tokens = 12;
  absl::StatusOr<GenerateResult> expected = Generate(*model_, prompt_, greedy);
  options.top_p = 1e-9;
  absl::StatusOr<GenerateResult> nucleus = Generate(*model_, prompt_, options);
  ASSERT_TRUE(expected.ok() && nucleus.ok());
  EXPECT_EQ(nucleus->tokens, expected->tokens);
}

TEST_F(LlamaGenerate, StopsAtAStopTokenAndValidatesItsInputs) {
  GenerateOptions options;
  options.max_new_tokens = 10;
  absl::StatusOr<GenerateResult> full = Generate(*model_, prompt_, options);
  ASSERT_TRUE(full.ok());
  options.stop_token_ids = {full->tokens[3]};
  absl::StatusOr<GenerateResult> stopped = Generate(*model_, prompt_, options);
  ASSERT_TRUE(stopped.ok());
  EXPECT_TRUE(stopped->stopped);
  const auto first = std::find(full->tokens.begin(), full->tokens.end(), full->tokens[3]);
  EXPECT_EQ(stopped->tokens, std::vector<int32_t>(full->tokens.begin(), first + 1));

  options.stop_token_ids.clear();
  options.on_token = [](int32_t, const at::Tensor&) { return absl::CancelledError("enough"); };
  EXPECT_EQ(Generate(*model_, prompt_, options).status().code(), absl::StatusCode::kCancelled);
  options.on_token = nullptr;
  options.max_new_tokens = 0;
  EXPECT_TRUE(Generate(*model_, prompt_, options)->tokens.empty());

  ExpectInvalidArgument(Generate(*model_, {}, options).status(), {"prompt"});
  ExpectInvalidArgument(Generate(*model_, {1, 128}, options).status(), {"prompt token 1", "128"});
  options.max_new_tokens = 1;
  options.top_p = 0;
  ExpectInvalidArgument(Generate(*model_, prompt_, options).status(), {"top_p"});
  options.top_p = 1;
  options.temperature = -1;
  ExpectInvalidArgument(Generate(*model_, prompt_, options).status(), {"temperature"});
}

// The sampler draws from softmax(logits / T), restricted to the nucleus.
TEST(LlamaSampler, FollowsTheDistributionAndTheNucleus) {
  const at::Tensor logits = at::log(at::tensor(std::vector<double>{0.1, 0.2, 0.3, 0.4}));
  TokenSampler sampler(/*temperature=*/1.0, /*top_p=*/1.0, /*seed=*/1);
  std::vector<int> counts(4, 0);
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++counts[*sampler.Next(logits)];
  for (int t = 0; t < 4; ++t) EXPECT_NEAR(counts[t] / double(n), 0.1 * (t + 1), 0.015) << t;

  // top_p 0.65: the nucleus is {3, 2} (0.4 + 0.3 >= 0.65), renormalized.
  TokenSampler nucleus(1.0, 0.65, 2);
  counts.assign(4, 0);
  for (int i = 0; i < n; ++i) ++counts[*nucleus.Next(logits)];
  EXPECT_EQ(counts[0] + counts[1], 0);
  EXPECT_NEAR(counts[3] / double(n), 4.0 / 7.0, 0.015);

  TokenSampler greedy(0.0, 1.0, 0);
  EXPECT_EQ(*greedy.Next(logits), 3);
  EXPECT_EQ(*greedy.Next(at::zeros({5})), 0);  // ties: the lowest id
  EXPECT_EQ(sampler.Next(at::tensor(std::vector<double>{0.0, std::nan("")})).status().code(),
            absl::StatusCode::kInternal);
  ExpectInvalidArgument(sampler.Next(at::zeros({2, 2})).status(), {"[vocab]"});
}

}  // namespace
}  // namespace compress::engine
