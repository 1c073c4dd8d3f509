#include "worker/engine/model/llama_model.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/files.h"
#include "common/status_macros.h"
#include "worker/engine/model/safetensors_writer.h"
#include "worker/engine/model/tensor_dtype.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {

namespace {

namespace fs = std::filesystem;

// Indexes into kBlockLinears.
enum LinearIndex { kQ = 0, kK, kV, kO, kGate, kUp, kDown };
constexpr int kFirstMlpLinear = kGate;  // post_attention_layernorm precedes it

enum class Dim { kHidden, kQ, kKv, kIntermediate };
enum class Bias { kNone, kQkv, kO };

// Shapes of kBlockLinears, row for row: weight [out, in], optional bias [out].
struct LinearShape {
  Dim out;
  Dim in;
  Bias bias;
};
constexpr LinearShape kLinearShapes[] = {
    {Dim::kQ, Dim::kHidden, Bias::kQkv},              // q_proj
    {Dim::kKv, Dim::kHidden, Bias::kQkv},             // k_proj
    {Dim::kKv, Dim::kHidden, Bias::kQkv},             // v_proj
    {Dim::kHidden, Dim::kQ, Bias::kO},                // o_proj
    {Dim::kIntermediate, Dim::kHidden, Bias::kNone},  // gate_proj
    {Dim::kIntermediate, Dim::kHidden, Bias::kNone},  // up_proj
    {Dim::kHidden, Dim::kIntermediate, Bias::kNone},  // down_proj
};
static_assert(std::size(kLinearShapes) == kNumBlockLinears);

int64_t Size(const LlamaConfig& c, Dim dim) {
  switch (dim) {
    case Dim::kQ:
      return c.q_dim();
    case Dim::kKv:
      return c.kv_dim();
    case Dim::kIntermediate:
      return c.intermediate_size;
    case Dim::kHidden:
      break;
  }
  return c.hidden_size;
}

bool HasBias(const LlamaConfig& c, Bias bias) {
  return (bias == Bias::kQkv && c.qkv_bias) || (bias == Bias::kO && c.o_bias);
}

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// One tensor slot of a block: a norm weight, or a linear's weight or bias.
struct Slot {
  std::string name;                                 // inside the block
  at::Tensor DecoderBlockWeights::*norm = nullptr;  // a norm, or
  int linear = -1;                                  // kBlockLinears[linear]'s
  bool bias = false;                                // weight or bias
};

// Every slot, biases included, in checkpoint order: input_layernorm, the
// attention linears, post_attention_layernorm, the MLP linears; each
// linear's weight then its bias. Built once (names from kBlockLinears).
const std::vector<Slot>& BlockSlots() {
  static const std::vector<Slot>* const slots = [] {
    auto* s = new std::vector<Slot>();
    for (int i = 0; i < kNumBlockLinears; ++i) {
      if (i == 0) s->push_back({"input_layernorm.weight", &DecoderBlockWeights::input_layernorm});
      if (i == kFirstMlpLinear) {
        s->push_back(
            {"post_attention_layernorm.weight", &DecoderBlockWeights::post_attention_layernorm});
      }
      s->push_back({absl::StrCat(kBlockLinears[i].name, ".weight"), nullptr, i, false});
      s->push_back({absl::StrCat(kBlockLinears[i].name, ".bias"), nullptr, i, true});
    }
    return s;
  }();
  return *slots;
}

// The slot's tensor in `block` (const or not).
template <typename Block>
auto& SlotTensor(Block& block, const Slot& slot) {
  if (slot.norm != nullptr) return block.*(slot.norm);
  auto& linear = block.*(kBlockLinears[slot.linear].member);
  return slot.bias ? linear.bias : linear.weight;
}

// The shape `c` gives the slot's tensor; nullopt for a bias it lacks.
std::optional<std::vector<int64_t>> ExpectedShape(const LlamaConfig& c, const Slot& slot) {
  if (slot.norm != nullptr) return std::vector<int64_t>{c.hidden_size};
  const LinearShape& s = kLinearShapes[slot.linear];
  if (!slot.bias) return std::vector<int64_t>{Size(c, s.out), Size(c, s.in)};
  if (!HasBias(c, s.bias)) return std::nullopt;
  return std::vector<int64_t>{Size(c, s.out)};
}

const char* TorchDtypeName(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    default:
      return "float32";
  }
}

absl::Status CheckComputeDtype(at::ScalarType dtype) {
  if (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("compute dtype ", c10::toString(dtype), " is not float32, float16 or bfloat16"));
}

// Whether this LibTorch can multiply matrices of `dtype` on `device` (1.13
// has no float16 matmul on the CPU): refused at load time rather than at
// the first forward pass.
absl::Status CheckComputeSupported(const at::Device& device, at::ScalarType dtype) {
  const absl::Status probe = CatchTorchErrors("probe", [&]() -> absl::Status {
    const at::Tensor x = at::ones({1, 2}, at::TensorOptions().dtype(dtype).device(device));
    at::linear(x, x);
    return absl::OkStatus();
  });
  if (probe.ok()) return probe;
  return absl::InvalidArgumentError(absl::StrCat("compute dtype ", c10::toString(dtype),
                                                 " is not supported on ", device.str(),
                                                 " by this LibTorch (", probe.message(), ")"));
}

}  // namespace

absl::Status ValidateLlamaCheckpoint(const LlamaConfig& config,
                                     const SafetensorsCheckpoint& checkpoint) {
  std::set<std::string> expected;
  for (const SafetensorsTensorSpec& spec : LlamaCheckpointSpecs(config, SafetensorsDtype::kF32)) {
    expected.insert(spec.name);
    const CheckpointTensor* t = checkpoint.Find(spec.name);
    if (t == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(checkpoint.folder(), ": tensor ", spec.name,
                                                     " is missing (config.json implies shape ",
                                                     ShapeString(spec.shape), ")"));
    }
    const std::string& file = checkpoint.shards()[t->shard]->path();
    if (t->info.shape != spec.shape) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": tensor ", spec.name, " has shape ", ShapeString(t->info.shape),
                       ", config.json implies ", ShapeString(spec.shape)));
    }
    if (!IsWeightDtype(t->info.dtype)) {
      return absl::InvalidArgumentError(absl::StrCat(file, ": tensor ", spec.name, " has dtype ",
                                                     DtypeName(t->info.dtype),
                                                     "; the runtime reads F32, F16 or BF16"));
    }
  }
  for (const CheckpointTensor& t : checkpoint.tensors()) {
    const std::string& name = t.info.name;
    if (expected.count(name) > 0) continue;
    // Buffers some old checkpoints saved; transformers recomputes them too.
    if (absl::EndsWith(name, ".rotary_emb.inv_freq")) continue;
    // transformers ties lm_head to the embeddings whatever the file holds.
    if (config.tie_word_embeddings && name == "lm_head.weight") continue;
    return absl::InvalidArgumentError(
        absl::StrCat(checkpoint.shards()[t.shard]->path(), ": tensor ", name, " ",
                     ShapeString(t.info.shape), " is not part of a ", ModelTypeName(config.family),
                     " model with this config.json (another variant, or a quantized checkpoint?)"));
  }
  return absl::OkStatus();
}

// ------------------------------------------------------------------ weights

std::vector<std::pair<std::string, at::Tensor*>> DecoderBlockWeights::NamedTensors() {
  std::vector<std::pair<std::string, at::Tensor*>> named;
  for (const Slot& slot : BlockSlots()) {
    at::Tensor& tensor = SlotTensor(*this, slot);
    if (tensor.defined()) named.emplace_back(slot.name, &tensor);
  }
  return named;
}

std::vector<std::pair<std::string, const at::Tensor*>> DecoderBlockWeights::NamedTensors() const {
  std::vector<std::pair<std::string, const at::Tensor*>> named;
  for (const Slot& slot : BlockSlots()) {
    const at::Tensor& tensor = SlotTensor(*this, slot);
    if (tensor.defined()) named.emplace_back(slot.name, &tensor);
  }
  return named;
}

std::string BlockTensorName(int64_t layer, absl::string_view suffix) {
  return absl::StrCat("model.layers.", layer, ".", suffix);
}

std::vector<SafetensorsTensorSpec> LlamaCheckpointSpecs(const LlamaConfig& config,
                                                        SafetensorsDtype dtype) {
  std::vector<SafetensorsTensorSpec> specs;
  specs.push_back({"model.embed_tokens.weight", dtype, {config.vocab_size, config.hidden_size}});
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    for (const Slot& slot : BlockSlots()) {
      std::optional<std::vector<int64_t>> shape = ExpectedShape(config, slot);
      if (shape.has_value()) specs.push_back({BlockTensorName(layer, slot.name), dtype, *shape});
    }
  }
  specs.push_back({"model.norm.weight", dtype, {config.hidden_size}});
  if (!config.tie_word_embeddings) {
    specs.push_back({"lm_head.weight", dtype, {config.vocab_size, config.hidden_size}});
  }
  return specs;
}

absl::Status ValidateBlockWeights(const LlamaConfig& config, const DecoderBlockWeights& block) {
  if (block.layer < 0 || block.layer >= config.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("block layer ", block.layer,
                                                   " is outside [0, num_hidden_layers ",
                                                   config.num_hidden_layers, ")"));
  }
  // Names are built only for messages: this runs before every block forward.
  const at::Tensor& reference = block.q_proj.weight;
  for (const Slot& slot : BlockSlots()) {
    const at::Tensor& tensor = SlotTensor(block, slot);
    const std::optional<std::vector<int64_t>> expected = ExpectedShape(config, slot);
    if (!expected.has_value()) {
      if (!tensor.defined()) continue;
      return absl::InvalidArgumentError(
          absl::StrCat(BlockTensorName(block.layer, slot.name), " ", ShapeString(tensor.sizes()),
                       " is set but a block of this config has no such tensor"));
    }
    if (!tensor.defined()) {
      return absl::InvalidArgumentError(absl::StrCat(BlockTensorName(block.layer, slot.name),
                                                     " is missing (expected shape ",
                                                     ShapeString(*expected), ")"));
    }
    if (!tensor.sizes().equals(*expected)) {
      return absl::InvalidArgumentError(absl::StrCat(BlockTensorName(block.layer, slot.name),
                                                     " has shape ", ShapeString(tensor.sizes()),
                                                     ", expected ", ShapeString(*expected)));
    }
    if (tensor.scalar_type() != reference.scalar_type() || tensor.device() != reference.device()) {
      return absl::InvalidArgumentError(
          absl::StrCat(BlockTensorName(block.layer, slot.name), " is ",
                       c10::toString(tensor.scalar_type()), " on ", tensor.device().str(), " but ",
                       BlockTensorName(block.layer, "self_attn.q_proj.weight"), " is ",
                       c10::toString(reference.scalar_type()), " on ", reference.device().str()));
    }
  }
  return absl::OkStatus();
}

// ------------------------------------------------------------------ kernels

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor x32 = x.to(at::kFloat);
  const at::Tensor normed = x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * normed.to(x.scalar_type());
}

at::Tensor ApplyRotaryEmbedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

at::Tensor RepeatKv(const at::Tensor& x, int64_t repeats) {
  if (repeats == 1) return x;
  const int64_t batch = x.size(0), heads = x.size(1), seq = x.size(2), dim = x.size(3);
  return x.unsqueeze(2)
      .expand({batch, heads, repeats, seq, dim})
      .reshape({batch, heads * repeats, seq, dim});
}

at::Tensor RotaryInverseFrequencies(const LlamaConfig& config) {
  const int64_t half = config.head_dim / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  const RopeScaling& s = config.rope_scaling;
  for (int64_t i = 0; i < half; ++i) {
    double f = 1.0 / std::pow(config.rope_theta,
                              static_cast<double>(2 * i) / static_cast<double>(config.head_dim));
    if (s.type == RopeScaling::Type::kLinear) {
      f /= s.factor;
    } else if (s.type == RopeScaling::Type::kLlama3) {
      const double original = static_cast<double>(s.original_max_position_embeddings);
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > original / s.low_freq_factor) {
        f /= s.factor;
      } else if (wavelen >= original / s.high_freq_factor) {
        const double smooth =
            (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = (1.0 - smooth) * f / s.factor + smooth * f;
      }
    }
    inv_freq[static_cast<size_t>(i)] = f;
  }
  return at::tensor(inv_freq, at::TensorOptions().dtype(at::kDouble));
}

// ------------------------------------------------------------------ pieces

absl::StatusOr<RotaryCache> MakeRotaryCache(const LlamaConfig& config, int64_t start,
                                            int64_t length, const at::Device& device,
                                            at::ScalarType dtype) {
  if (start < 0 || length < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rotary positions [", start, ", ", start + length, ") are negative"));
  }
  return CatchTorchErrors("rotary cache", [&]() -> absl::StatusOr<RotaryCache> {
    const at::TensorOptions f64 = at::TensorOptions().dtype(at::kDouble).device(device);
    const at::Tensor inv_freq = RotaryInverseFrequencies(config).to(device);
    const at::Tensor positions = at::arange(start, start + length, f64);
    const at::Tensor angles = at::outer(positions, inv_freq);  // [length, head_dim / 2]
    const at::Tensor both = at::cat({angles, angles}, -1);     // [length, head_dim]
    return RotaryCache{start, both.cos().to(dtype), both.sin().to(dtype)};
  });
}

KvCache::KvCache(int64_t num_layers, int64_t reserve_tokens)
    : layers_(static_cast<size_t>(std::max<int64_t>(num_layers, 0))),
      reserve_tokens_(std::max<int64_t>(reserve_tokens, 0)) {}

int64_t KvCache::length(int64_t layer) const {
  return layer >= 0 && layer < num_layers() ? layers_[static_cast<size_t>(layer)].length : 0;
}

void KvCache::Clear() {
  for (Layer& layer : layers_) layer = Layer();
}

void KvCache::Truncate(int64_t length) {
  for (Layer& layer : layers_) layer.length = std::min(layer.length, std::max<int64_t>(length, 0));
}

absl::StatusOr<std::pair<at::Tensor, at::Tensor>> KvCache::Append(int64_t index,
                                                                  const at::Tensor& keys,
                                                                  const at::Tensor& values) {
  if (index < 0 || index >= num_layers()) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv cache: layer ", index, " is outside [0, ", num_layers(), ")"));
  }
  if (!keys.defined() || !values.defined() || keys.dim() != 4 ||
      !keys.sizes().equals(values.sizes()) || keys.scalar_type() != values.scalar_type() ||
      keys.device() != values.device()) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv cache: layer ", index, ": keys ",
                     keys.defined() ? ShapeString(keys.sizes()) : "(undefined)", " and values ",
                     values.defined() ? ShapeString(values.sizes()) : "(undefined)",
                     " must be [batch, kv_heads, tokens, head_dim] of one dtype and device"));
  }
  if (c10::GradMode::is_enabled() && (keys.requires_grad() || values.requires_grad())) {
    return absl::FailedPreconditionError(
        "kv cache: keys require grad; the cache is for inference (use c10::InferenceMode or "
        "at::NoGradGuard)");
  }
  Layer& layer = layers_[static_cast<size_t>(index)];
  if (layer.keys.defined()) {
    const bool same = keys.size(0) == layer.keys.size(0) && keys.size(1) == layer.keys.size(1) &&
                      keys.size(3) == layer.keys.size(3) &&
                      keys.scalar_type() == layer.keys.scalar_type() &&
                      keys.device() == layer.keys.device();
    if (!same) {
      return absl::InvalidArgumentError(absl::StrCat(
          "kv cache: layer ", index, ": keys ", ShapeString(keys.sizes()), " ",
          c10::toString(keys.scalar_type()), " do not continue the cached ",
          ShapeString(layer.keys.sizes()), " ", c10::toString(layer.keys.scalar_type()),
          " (batch, kv_heads and head_dim must stay the same)"));
    }
  }
  return CatchTorchErrors("kv cache", [&]() -> absl::StatusOr<std::pair<at::Tensor, at::Tensor>> {
    const int64_t added = keys.size(2);
    const int64_t needed = layer.length + added;
    const int64_t capacity = layer.keys.defined() ? layer.keys.size(2) : 0;
    if (needed > capacity) {
      const int64_t grown = std::max({needed, 2 * capacity, reserve_tokens_});
      at::Tensor new_keys =
          at::empty({keys.size(0), keys.size(1), grown, keys.size(3)}, keys.options());
      at::Tensor new_values = at::empty_like(new_keys);
      if (layer.length > 0) {
        new_keys.narrow(2, 0, layer.length).copy_(layer.keys.narrow(2, 0, layer.length));
        new_values.narrow(2, 0, layer.length).copy_(layer.values.narrow(2, 0, layer.length));
      }
      layer.keys = std::move(new_keys);
      layer.values = std::move(new_values);
    }
    layer.keys.narrow(2, layer.length, added).copy_(keys);
    layer.values.narrow(2, layer.length, added).copy_(values);
    layer.length = needed;
    return std::make_pair(layer.keys.narrow(2, 0, needed), layer.values.narrow(2, 0, needed));
  });
}

absl::StatusOr<at::Tensor> Embed(const at::Tensor& embed_tokens, const at::Tensor& input_ids) {
  if (!embed_tokens.defined() || embed_tokens.dim() != 2) {
    return absl::InvalidArgumentError("model.embed_tokens.weight must be [vocab, hidden]");
  }
  if (!input_ids.defined() || input_ids.dim() != 2 || input_ids.numel() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("input_ids must be a non-empty [batch, seq] tensor, got ",
                     input_ids.defined() ? ShapeString(input_ids.sizes()) : "an undefined tensor"));
  }
  if (input_ids.scalar_type() != at::kLong && input_ids.scalar_type() != at::kInt) {
    return absl::InvalidArgumentError(absl::StrCat("input_ids must be int32 or int64, got ",
                                                   c10::toString(input_ids.scalar_type())));
  }
  return CatchTorchErrors("embed", [&]() -> absl::StatusOr<at::Tensor> {
    const int64_t vocab = embed_tokens.size(0);
    const int64_t lo = input_ids.min().item<int64_t>();
    const int64_t hi = input_ids.max().item<int64_t>();
    if (lo < 0 || hi >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat("input_ids holds token id ", lo < 0 ? lo : hi,
                                                     ", outside the vocabulary [0, ", vocab, ")"));
    }
    return at::embedding(embed_tokens, input_ids.to(embed_tokens.device(), at::kLong));
  });
}

namespace {
bool IsComputeDtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}
}  // namespace

absl::StatusOr<at::Tensor> DecoderBlockForward(const LlamaConfig& config,
                                               const DecoderBlockWeights& w,
                                               const at::Tensor& hidden, const RotaryCache& rope,
                                               KvCache* cache, LinearHook* hook) {
  RETURN_IF_ERROR(ValidateBlockWeights(config, w));
  const at::Tensor& reference = w.q_proj.weight;
  if (!hidden.defined() || hidden.dim() != 3 || hidden.size(1) == 0 ||
      hidden.size(2) != config.hidden_size || !IsComputeDtype(hidden.scalar_type()) ||
      hidden.device() != reference.device()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block ", w.layer, ": hidden states must be [batch, seq >= 1, ", config.hidden_size,
        "] float32, float16 or bfloat16 on ", reference.device().str(), ", got ",
        hidden.defined()
            ? absl::StrCat(ShapeString(hidden.sizes()), " ", c10::toString(hidden.scalar_type()),
                           " on ", hidden.device().str())
            : "an undefined tensor"));
  }
  if (cache != nullptr && cache->num_layers() <= w.layer) {
    return absl::InvalidArgumentError(absl::StrCat("block ", w.layer, ": the kv cache has only ",
                                                   cache->num_layers(), " layers"));
  }
  const int64_t batch = hidden.size(0);
  const int64_t seq = hidden.size(1);
  const int64_t past = cache != nullptr ? cache->length(w.layer) : 0;
  if (rope.start != past || rope.length() != seq || rope.cos.dim() != 2 ||
      rope.cos.size(1) != config.head_dim || !rope.sin.defined() ||
      !rope.sin.sizes().equals(rope.cos.sizes()) ||
      rope.cos.scalar_type() != hidden.scalar_type() || rope.cos.device() != hidden.device()) {
    return absl::InvalidArgumentError(
        absl::StrCat("block ", w.layer, ": the rotary cache covers positions [", rope.start, ", ",
                     rope.start + rope.length(), ") but the tokens sit at [", past, ", ",
                     past + seq, ") (or its cos/sin are not [seq, ", config.head_dim,
                     "] in the hidden states' dtype and device)"));
  }

  return CatchTorchErrors(absl::StrCat("block ", w.layer), [&]() -> absl::StatusOr<at::Tensor> {
    const int64_t heads = config.num_attention_heads;
    const int64_t kv_heads = config.num_key_value_heads;
    const int64_t head_dim = config.head_dim;
    auto linear = [&](int index, const at::Tensor& x) -> absl::StatusOr<at::Tensor> {
      const BlockLinear& l = kBlockLinears[index];
      if (hook != nullptr) RETURN_IF_ERROR(hook->OnLinearInput(w.layer, l.name, x));
      const LinearWeights& weights = w.*(l.member);
      // Weights stored in another dtype are converted for this use only.
      const at::ScalarType dtype = x.scalar_type();
      return at::linear(x, weights.weight.to(dtype),
                        weights.bias.defined() ? weights.bias.to(dtype) : weights.bias);
    };
    const at::ScalarType dtype = hidden.scalar_type();

    // Attention. [batch, seq, heads * d] -> [batch, heads, seq, d].
    const at::Tensor normed =
        RmsNorm(hidden, w.input_layernorm.to(dtype), config.rms_norm_eps);
    ASSIGN_OR_RETURN(at::Tensor q, linear(kQ, normed));
    ASSIGN_OR_RETURN(at::Tensor k, linear(kK, normed));
    ASSIGN_OR_RETURN(at::Tensor v, linear(kV, normed));
    q = ApplyRotaryEmbedding(q.view({batch, seq, heads, head_dim}).transpose(1, 2), rope.cos,
                             rope.sin);
    k = ApplyRotaryEmbedding(k.view({batch, seq, kv_heads, head_dim}).transpose(1, 2), rope.cos,
                             rope.sin);
    v = v.view({batch, seq, kv_heads, head_dim}).transpose(1, 2);
    if (cache != nullptr) {
      ASSIGN_OR_RETURN(std::tie(k, v), cache->Append(w.layer, k, v));
    }
    const int64_t total = k.size(2);  // past + seq
    k = RepeatKv(k, heads / kv_heads);
    v = RepeatKv(v, heads / kv_heads);
    at::Tensor scores =
        at::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(static_cast<double>(head_dim)));
    // Query i (position past + i) sees key j iff j <= past + i, and with a
    // window W also past + i - j < W.
    // A single new token outside any window sees every key: no mask.
    const int64_t window = config.SlidingWindow(w.layer);
    if (seq > 1 || (window > 0 && total > window)) {
      const at::TensorOptions long_options =
          at::TensorOptions().dtype(at::kLong).device(hidden.device());
      const at::Tensor query_pos = at::arange(past, past + seq, long_options).unsqueeze(1);
      const at::Tensor key_pos = at::arange(0, total, long_options).unsqueeze(0);
      at::Tensor blocked = key_pos > query_pos;  // [seq, total]
      if (window > 0) blocked = blocked.logical_or(query_pos - key_pos >= window);
      scores = scores.masked_fill(blocked, -std::numeric_limits<double>::infinity());
    }
    const at::Tensor probs = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
    const at::Tensor attended =
        at::matmul(probs, v).transpose(1, 2).reshape({batch, seq, heads * head_dim});
    ASSIGN_OR_RETURN(const at::Tensor attention_out, linear(kO, attended));
    const at::Tensor after_attention = hidden + attention_out;

    // SwiGLU MLP.
    const at::Tensor mlp_in =
        RmsNorm(after_attention, w.post_attention_layernorm.to(dtype), config.rms_norm_eps);
    ASSIGN_OR_RETURN(at::Tensor gate, linear(kGate, mlp_in));
    ASSIGN_OR_RETURN(at::Tensor up, linear(kUp, mlp_in));
    at::Tensor product;
    if (gate.requires_grad() || up.requires_grad()) {
      product = at::silu(gate) * up;  // training: autograd needs both inputs as they were
    } else {
      // Inference: in place, so that the widest activations exist once.
      product = at::silu_(gate).mul_(up);
      up = at::Tensor();
    }
    gate = at::Tensor();
    ASSIGN_OR_RETURN(const at::Tensor down, linear(kDown, product));
    return after_attention + down;
  });
}

absl::StatusOr<at::Tensor> OutputLogits(const LlamaConfig& config, const at::Tensor& norm,
                                        const at::Tensor& lm_head, const at::Tensor& hidden) {
  const std::vector<int64_t> norm_shape = {config.hidden_size};
  const std::vector<int64_t> head_shape = {config.vocab_size, config.hidden_size};
  if (!norm.defined() || norm.sizes().vec() != norm_shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.norm.weight has shape ", norm.defined() ? ShapeString(norm.sizes()) : "(undefined)",
        ", expected ", ShapeString(norm_shape)));
  }
  if (!lm_head.defined() || lm_head.sizes().vec() != head_shape) {
    return absl::InvalidArgumentError(
        absl::StrCat("lm_head.weight has shape ",
                     lm_head.defined() ? ShapeString(lm_head.sizes()) : "(undefined)",
                     ", expected ", ShapeString(head_shape)));
  }
  if (!hidden.defined() || hidden.dim() != 3 || hidden.size(2) != config.hidden_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("hidden states must be [batch, seq, ", config.hidden_size, "], got ",
                     hidden.defined() ? ShapeString(hidden.sizes()) : "an undefined tensor"));
  }
  return CatchTorchErrors("lm_head", [&]() -> absl::StatusOr<at::Tensor> {
    return at::linear(RmsNorm(hidden, norm, config.rms_norm_eps), lm_head);
  });
}

// ------------------------------------------------------------------ model

absl::StatusOr<LlamaModel> LlamaModel::Load(const std::string& path,
                                            const LlamaLoadOptions& options) {
  RETURN_IF_ERROR(CheckComputeDtype(options.dtype));
  RETURN_IF_ERROR(CheckComputeSupported(options.device, options.dtype));
  ASSIGN_OR_RETURN(SafetensorsCheckpoint checkpoint, SafetensorsCheckpoint::Open(path));
  ASSIGN_OR_RETURN(LlamaConfig config, ReadLlamaConfig(checkpoint.folder()));
  RETURN_IF_ERROR(ValidateLlamaCheckpoint(config, checkpoint));
  LlamaModel model(std::move(config), options, std::move(checkpoint));
  ASSIGN_OR_RETURN(model.embed_tokens_, model.LoadTensor("model.embed_tokens.weight"));
  ASSIGN_OR_RETURN(model.norm_, model.LoadTensor("model.norm.weight"));
  if (model.config_.tie_word_embeddings) {
    model.lm_head_ = model.embed_tokens_;
  } else {
    ASSIGN_OR_RETURN(model.lm_head_, model.LoadTensor("lm_head.weight"));
  }
  if (options.resident) {
    model.blocks_.reserve(static_cast<size_t>(model.config_.num_hidden_layers));
    for (int64_t layer = 0; layer < model.config_.num_hidden_layers; ++layer) {
      ASSIGN_OR_RETURN(DecoderBlockWeights block, model.LoadBlock(layer));
      model.blocks_.push_back(std::move(block));
    }
  }
  return model;
}

absl::StatusOr<at::Tensor> LlamaModel::LoadTensor(const std::string& name) const {
  return checkpoint_.Load(name, options_.device, options_.dtype);
}

absl::StatusOr<DecoderBlockWeights> LoadDecoderBlock(const SafetensorsCheckpoint& checkpoint,
                                                     const LlamaConfig& config, int64_t layer,
                                                     const at::Device& device,
                                                     at::ScalarType dtype) {
  if (layer < 0 || layer >= config.num_hidden_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " is outside [0, ", config.num_hidden_layers, ")"));
  }
  DecoderBlockWeights block;
  block.layer = layer;
  for (const Slot& slot : BlockSlots()) {
    if (!ExpectedShape(config, slot).has_value()) continue;  // a bias this variant lacks
    ASSIGN_OR_RETURN(SlotTensor(block, slot),
                     checkpoint.Load(BlockTensorName(layer, slot.name), device, dtype));
  }
  RETURN_IF_ERROR(ValidateBlockWeights(config, block));
  return block;
}

absl::StatusOr<DecoderBlockWeights> LlamaModel::LoadBlock(int64_t layer) const {
  return LoadDecoderBlock(checkpoint_, config_, layer, options_.device, options_.dtype);
}

absl::StatusOr<at::Tensor> LlamaModel::Forward(const at::Tensor& input_ids, KvCache* cache,
                                               LinearHook* hook) const {
  if (cache != nullptr && cache->num_layers() != config_.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("the kv cache has ", cache->num_layers(),
                                                   " layers, the model ",
                                                   config_.num_hidden_layers));
  }
  const int64_t past = cache != nullptr ? cache->length() : 0;
  auto run = [&]() -> absl::StatusOr<at::Tensor> {
    ASSIGN_OR_RETURN(at::Tensor hidden, Embed(embed_tokens_, input_ids));
    ASSIGN_OR_RETURN(const RotaryCache rope, MakeRotaryCache(config_, past, hidden.size(1),
                                                             options_.device, options_.dtype));
    for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
      DecoderBlockWeights loaded;
      if (!options_.resident) {
        ASSIGN_OR_RETURN(loaded, LoadBlock(layer));
      }
      const DecoderBlockWeights& block =
          options_.resident ? blocks_[static_cast<size_t>(layer)] : loaded;
      ASSIGN_OR_RETURN(hidden, DecoderBlockForward(config_, block, hidden, rope, cache, hook));
    }
    return OutputLogits(config_, norm_, lm_head_, hidden);
  };
  absl::StatusOr<at::Tensor> logits = run();
  // All or nothing: a failed pass leaves the cache as it found it.
  if (!logits.ok() && cache != nullptr) cache->Truncate(past);
  return logits;
}

std::vector<std::pair<std::string, at::Tensor>> LlamaModel::NamedParameters() const {
  std::vector<std::pair<std::string, at::Tensor>> params;
  params.emplace_back("model.embed_tokens.weight", embed_tokens_);
  for (const DecoderBlockWeights& block : blocks_) {
    for (const auto& [name, tensor] : block.NamedTensors()) {
      params.emplace_back(BlockTensorName(block.layer, name), *tensor);
    }
  }
  params.emplace_back("model.norm.weight", norm_);
  if (!config_.tie_word_embeddings) params.emplace_back("lm_head.weight", lm_head_);
  return params;
}

absl::Status LlamaModel::SaveHuggingFace(const std::string& dir,
                                         std::optional<at::ScalarType> dtype) const {
  const at::ScalarType out_dtype = dtype.value_or(options_.dtype);
  RETURN_IF_ERROR(CheckComputeDtype(out_dtype));
  ASSIGN_OR_RETURN(const SafetensorsDtype stored_dtype, FromScalarType(out_dtype));
  std::error_code ec;
  if (fs::exists(fs::path(dir) / kSafetensorsIndexFileName, ec)) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir, " holds a ", kSafetensorsIndexFileName,
                     ", which readers would prefer to the model.safetensors written here; use "
                     "an empty folder"));
  }
  RETURN_IF_ERROR(MakeDirs(dir));
  ASSIGN_OR_RETURN(SafetensorsWriter writer,
                   SafetensorsWriter::Open((fs::path(dir) / kSingleSafetensorsFileName).string(),
                                           LlamaCheckpointSpecs(config_, stored_dtype)));
  // Writes in LlamaCheckpointSpecs' order; the writer refuses any other.
  auto write = [&](const std::string& name, const at::Tensor& tensor) -> absl::Status {
    ASSIGN_OR_RETURN(const at::Tensor converted,
                     CatchTorchErrors(name, [&]() -> absl::StatusOr<at::Tensor> {
                       at::Tensor t = tensor.detach().to(out_dtype);
                       if (!at::isfinite(t).all().item<bool>()) {
                         return absl::FailedPreconditionError(
                             absl::StrCat(name, " holds NaN or Inf; not writing it"));
                       }
                       return t;
                     }));
    return writer.WriteTensor(name, converted);
  };
  RETURN_IF_ERROR(write("model.embed_tokens.weight", embed_tokens_));
  for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
    DecoderBlockWeights loaded;
    if (!options_.resident) {
      ASSIGN_OR_RETURN(loaded, LoadBlock(layer));
    }
    const DecoderBlockWeights& block =
        options_.resident ? blocks_[static_cast<size_t>(layer)] : loaded;
    for (const auto& [name, tensor] : block.NamedTensors()) {
      RETURN_IF_ERROR(write(BlockTensorName(layer, name), *tensor));
    }
  }
  RETURN_IF_ERROR(write("model.norm.weight", norm_));
  if (!config_.tie_word_embeddings) RETURN_IF_ERROR(write("lm_head.weight", lm_head_));
  RETURN_IF_ERROR(writer.Commit());

  LlamaConfig saved = config_;
  saved.torch_dtype = TorchDtypeName(out_dtype);
  return WriteFileAtomic((fs::path(dir) / "config.json").string(), LlamaConfigJson(saved));
}

}  // namespace compress::engine
