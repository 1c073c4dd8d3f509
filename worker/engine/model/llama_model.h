// The decoder runtime of the Llama family (Llama 1-3, Mistral, Qwen2): RMSNorm,
// rotary position embedding (transformers' rotate_half convention, linear and
// llama3 frequency scaling), grouped-query attention with an optional sliding
// window, SwiGLU MLP, optional q/k/v (and o) biases, tied embeddings.
//
// Three layers of API, from the bottom:
//   1. Tensor kernels (RmsNorm, ApplyRotaryEmbedding, RepeatKv): pure ATen
//      math with ATen's contract: they throw c10::Error on misuse, like any
//      ATen op, so call them inside CatchTorchErrors (util/torch_status.h).
//   2. Checked pieces over plain tensors for the layer-wise runner: Embed,
//      MakeRotaryCache, DecoderBlockForward, OutputLogits. They validate
//      their inputs and return absl::Status naming the tensor and shapes; no
//      exception leaves them.
//   3. LlamaModel: a checkpoint folder (config.json + safetensors, single or
//      sharded) with its weights either all resident or loaded block by
//      block on demand (LoadBlock), Forward, and SaveHuggingFace.
//
// Numerics follow transformers' eager implementation: RMSNorm and softmax in
// float32 whatever the compute dtype; cos/sin computed in float64 and
// rounded to the compute dtype; attention scores scaled by 1/sqrt(head_dim).
//
// Sequences in a batch are independent and have the same length and
// positions (0.. for a fresh forward, continuing after a KvCache): there is
// no padding mask. Batch sequences of equal length, or run them one by one.
//
// Gradients: outside c10::InferenceMode every entry point is differentiable.
// Resident weights are leaf tensors (requires_grad false until a trainer sets
// it via NamedParameters). Load the model outside InferenceMode if it will be
// trained: tensors created inside InferenceMode can never join autograd.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/safetensors_header.h"
#include "worker/engine/model/llama_config.h"
#include "worker/engine/model/safetensors_reader.h"

namespace compress::engine {

// ------------------------------------------------------------------ weights

// A linear layer y = x W^T + b; W is [out_features, in_features] (the
// checkpoint's layout), b is [out_features] or undefined.
struct LinearWeights {
  at::Tensor weight;
  at::Tensor bias;
};

// One decoder block's tensors, named as in transformers' state dict under
// "model.layers.<layer>.".
struct DecoderBlockWeights {
  int64_t layer = 0;
  at::Tensor input_layernorm;           // [hidden]
  LinearWeights q_proj;                 // [heads * head_dim, hidden]
  LinearWeights k_proj;                 // [kv_heads * head_dim, hidden]
  LinearWeights v_proj;                 // [kv_heads * head_dim, hidden]
  LinearWeights o_proj;                 // [hidden, heads * head_dim]
  at::Tensor post_attention_layernorm;  // [hidden]
  LinearWeights gate_proj;              // [intermediate, hidden]
  LinearWeights up_proj;                // [intermediate, hidden]
  LinearWeights down_proj;              // [hidden, intermediate]

  // Every defined tensor with its name inside the block
  // ("self_attn.q_proj.weight", ...) in checkpoint order. The pointers
  // refer into this struct: replace or edit a tensor through them.
  std::vector<std::pair<std::string, at::Tensor*>> NamedTensors();
  std::vector<std::pair<std::string, const at::Tensor*>> NamedTensors() const;
};

// The seven linears of a block: their module names inside the block, in the
// order the forward pass applies them, and where each lives in the struct.
// The one table that the forward pass, the loader, the hook and the writer
// share.
struct BlockLinear {
  const char* name;  // "self_attn.q_proj", ..., "mlp.down_proj"
  LinearWeights DecoderBlockWeights::*member;
};
inline constexpr int kNumBlockLinears = 7;
inline constexpr std::array<BlockLinear, kNumBlockLinears> kBlockLinears = {{
    {"self_attn.q_proj", &DecoderBlockWeights::q_proj},
    {"self_attn.k_proj", &DecoderBlockWeights::k_proj},
    {"self_attn.v_proj", &DecoderBlockWeights::v_proj},
    {"self_attn.o_proj", &DecoderBlockWeights::o_proj},
    {"mlp.gate_proj", &DecoderBlockWeights::gate_proj},
    {"mlp.up_proj", &DecoderBlockWeights::up_proj},
    {"mlp.down_proj", &DecoderBlockWeights::down_proj},
}};

// The row of kBlockLinears named `name` ("mlp.up_proj"); nullptr for others.
inline const BlockLinear* FindBlockLinear(absl::string_view name) {
  for (const BlockLinear& linear : kBlockLinears) {
    if (name == linear.name) return &linear;
  }
  return nullptr;
}

// Checkpoint names, shapes and the dtype `dtype` of every tensor a model of
// `config` has, in the order SaveHuggingFace writes them: embeddings, each
// block (input_layernorm, q/k/v/o_proj with their biases, post-attention
// norm, gate/up/down_proj), model.norm.weight, lm_head.weight (absent when
// tied).
std::vector<SafetensorsTensorSpec> LlamaCheckpointSpecs(const LlamaConfig& config,
                                                        SafetensorsDtype dtype);

// The tensor names of block `layer`: "model.layers.<layer>." + `suffix`.
std::string BlockTensorName(int64_t layer, absl::string_view suffix);

// INVALID_ARGUMENT naming the tensor (full checkpoint name) and both shapes
// when a tensor of `block` is missing, has the wrong shape, or a bias is
// present or absent against `config`; also when tensors differ in dtype or
// device from the block's q_proj weight.
absl::Status ValidateBlockWeights(const LlamaConfig& config, const DecoderBlockWeights& block);

// Names, shapes and dtypes of `checkpoint` against `config`, from the
// headers alone: INVALID_ARGUMENT naming the file, tensor and both shapes for
// a missing or mis-shaped tensor, a dtype other than F32/F16/BF16, or a
// tensor the config does not explain (biases of another variant, quantized
// tensors). Rotary inv_freq buffers of old checkpoints are allowed, as is
// lm_head.weight when the embeddings are tied.
absl::Status ValidateLlamaCheckpoint(const LlamaConfig& config,
                                     const SafetensorsCheckpoint& checkpoint);

// Block `layer` of `checkpoint` as fresh tensors in `dtype` on `device`; the
// mapping's pages are released as each tensor is read, so only the block
// stays resident.
absl::StatusOr<DecoderBlockWeights> LoadDecoderBlock(const SafetensorsCheckpoint& checkpoint,
                                                     const LlamaConfig& config, int64_t layer,
                                                     const at::Device& device,
                                                     at::ScalarType dtype);

// ------------------------------------------------------------------ kernels
// ATen semantics: these throw c10::Error on misuse.

// transformers' LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast
// back to x's dtype, times weight.
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps);

// x: [batch, heads, seq, head_dim]; cos, sin: [seq, head_dim] (as in
// RotaryCache). x * cos + rotate_half(x) * sin, where rotate_half(x) =
// cat(-x[..., d/2:], x[..., :d/2]): dimension i pairs with i + d/2.
at::Tensor ApplyRotaryEmbedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// [batch, kv_heads, seq, d] -> [batch, kv_heads * repeats, seq, d]: query
// head h reads key/value head h / repeats (transformers' repeat_kv).
at::Tensor RepeatKv(const at::Tensor& x, int64_t repeats);

// The inverse frequencies of `config`'s rotary embedding, with its
// rope_scaling applied: [head_dim / 2] float64 on the CPU.
at::Tensor RotaryInverseFrequencies(const LlamaConfig& config);

// ------------------------------------------------------------------ pieces

// cos/sin of the positions [start, start + length) for a head_dim:
// angle(p, i) = p * inv_freq[i mod head_dim/2], cos and sin [length,
// head_dim], computed in float64 and rounded to the compute dtype.
struct RotaryCache {
  int64_t start = 0;
  at::Tensor cos;
  at::Tensor sin;
  int64_t length() const { return cos.defined() ? cos.size(0) : 0; }
};

absl::StatusOr<RotaryCache> MakeRotaryCache(const LlamaConfig& config, int64_t start,
                                            int64_t length, const at::Device& device,
                                            at::ScalarType dtype);

// Keys (after the rotary embedding) and values of every token seen so far,
// per layer, for incremental decoding: prefill with the prompt, then one
// token (or a chunk) at a time. Each layer's buffer is [batch, kv_heads,
// capacity, head_dim] and grows by doubling, so appending is amortized O(new
// tokens). Every token stays cached, also under a sliding window (which the
// attention mask applies; there is no rolling buffer). For inference only: use it under
// c10::InferenceMode or at::NoGradGuard (appending a tensor that requires grad is
// FAILED_PRECONDITION, since the in-place growth would break backward).
class KvCache {
 public:
  // `reserve_tokens`: the capacity allocated on the first append (the
  // prompt plus the tokens to generate avoids any regrowth).
  explicit KvCache(int64_t num_layers, int64_t reserve_tokens = 0);

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  // Tokens cached in `layer`; length() is layer 0's, which is every layer's
  // after a whole forward pass.
  int64_t length(int64_t layer) const;
  int64_t length() const { return layers_.empty() ? 0 : length(0); }

  // Appends keys and values ([batch, kv_heads, new, head_dim]) to `layer`
  // and returns views of all of them so far ([batch, kv_heads, length,
  // head_dim]). INVALID_ARGUMENT if batch, heads, head_dim, dtype or device
  // differ from what the layer holds.
  absl::StatusOr<std::pair<at::Tensor, at::Tensor>> Append(int64_t layer, const at::Tensor& keys,
                                                           const at::Tensor& values);
  // Forgets every token from position `length` on (in every layer), keeping
  // the buffers: LlamaModel::Forward uses it to undo a failed pass.
  void Truncate(int64_t length);
  void Clear();

 private:
  struct Layer {
    at::Tensor keys;  // [batch, kv_heads, capacity, head_dim]
    at::Tensor values;
    int64_t length = 0;
  };
  std::vector<Layer> layers_;
  int64_t reserve_tokens_ = 0;
};

// Observes the input of every linear of a decoder block just before the
// linear runs: calibration accumulates its statistics here (X^T X for GPTQ
// and SparseGPT, per-channel norms for Wanda, AWQ and ASVD).
class LinearHook {
 public:
  virtual ~LinearHook() = default;
  // `layer`: the block's index; `linear`: its name inside the block (one of
  // kBlockLinears' names); `input`: [batch, seq, in_features] in the compute
  // dtype on the compute device. q/k/v_proj receive the same tensor, as do
  // gate_proj and up_proj: a hook may skip repeated work when
  // input.is_same(previous_input). The hook must not modify `input`. A
  // non-OK status stops the forward pass, which returns it (a failed
  // accumulation, a cancelled job).
  virtual absl::Status OnLinearInput(int64_t layer, absl::string_view linear,
                                     const at::Tensor& input) = 0;
};

// Token embeddings: input_ids [batch, seq] (int32 or int64, any device) ->
// [batch, seq, hidden] on embed_tokens' device and dtype. INVALID_ARGUMENT
// for another shape or type, or an id outside [0, vocab) (checked before the
// lookup: on CUDA an out-of-range index would poison the context).
absl::StatusOr<at::Tensor> Embed(const at::Tensor& embed_tokens, const at::Tensor& input_ids);

// One decoder block: hidden [batch, seq, hidden] -> [batch, seq, hidden],
// computed in the hidden states' dtype (float32, float16 or bfloat16). The
// block's weights may be held in another dtype (the checkpoint's, to keep
// one block small) and are converted as each is used.
//   attention: x = h + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)),
//              v_proj(n))) with n = RmsNorm(h, input_layernorm), causal (and
//              windowed where config.SlidingWindow(w.layer) > 0)
//   MLP:       y = x + down_proj(silu(gate_proj(m)) * up_proj(m)) with
//              m = RmsNorm(x, post_attention_layernorm)
// The new tokens sit at positions [past, past + seq), past being
// cache->length(w.layer) (0 without a cache); `rope` must cover exactly
// those positions. With a cache, the block's keys and values are appended
// to it and the queries attend to everything cached. `hook`, if not null,
// sees each linear's input. INVALID_ARGUMENT (naming tensors and shapes)
// for mismatched weights, hidden states, rope or cache.
absl::StatusOr<at::Tensor> DecoderBlockForward(const LlamaConfig& config,
                                               const DecoderBlockWeights& w,
                                               const at::Tensor& hidden, const RotaryCache& rope,
                                               KvCache* cache, LinearHook* hook);

// The head: RmsNorm(hidden, norm) @ lm_head^T -> logits [batch, seq, vocab]
// in the compute dtype.
absl::StatusOr<at::Tensor> OutputLogits(const LlamaConfig& config, const at::Tensor& norm,
                                        const at::Tensor& lm_head, const at::Tensor& hidden);

// ------------------------------------------------------------------ model

struct LlamaLoadOptions {
  at::Device device = at::kCPU;  // explicit: nothing assumes CUDA
  // Compute dtype: kFloat, kHalf or kBFloat16 (INVALID_ARGUMENT at load if
  // this LibTorch cannot multiply it on the device: 1.13 has no CPU float16).
  at::ScalarType dtype = at::kFloat;
  // true: every block is loaded once and kept (evaluation, training, small
  // models). false: only the embeddings, final norm and lm_head are kept;
  // Forward loads each block from the mmapped checkpoint as it goes, and
  // the layer-wise runner calls LoadBlock (one block resident at a time).
  bool resident = true;
};

class LlamaModel {
 public:
  // `path`: a folder with config.json and model.safetensors (or shards with
  // model.safetensors.index.json). Checks every tensor's presence, shape
  // and dtype (F32, F16, BF16) from the headers before loading anything:
  // INVALID_ARGUMENT naming the tensor and both shapes for a missing or
  // mis-shaped one, and for a tensor the config does not explain (biases of
  // another variant, quantized tensors) rather than ignoring it. Rotary
  // inv_freq buffers of old checkpoints are ignored, as is lm_head.weight
  // when the embeddings are tied.
  static absl::StatusOr<LlamaModel> Load(const std::string& path,
                                         const LlamaLoadOptions& options = {});

  LlamaModel(LlamaModel&&) = default;
  LlamaModel& operator=(LlamaModel&&) = default;
  LlamaModel(const LlamaModel&) = delete;
  LlamaModel& operator=(const LlamaModel&) = delete;

  const LlamaConfig& config() const { return config_; }
  const at::Device& device() const { return options_.device; }
  at::ScalarType dtype() const { return options_.dtype; }
  bool resident() const { return options_.resident; }
  const SafetensorsCheckpoint& checkpoint() const { return checkpoint_; }

  // Block `layer` read from the checkpoint (not the resident copy, which
  // training may have changed): fresh tensors in the compute dtype on the
  // device, owned by the caller.
  absl::StatusOr<DecoderBlockWeights> LoadBlock(int64_t layer) const;
  // The resident blocks; empty when not resident.
  const std::vector<DecoderBlockWeights>& blocks() const { return blocks_; }
  const at::Tensor& embed_tokens() const { return embed_tokens_; }
  const at::Tensor& norm() const { return norm_; }
  // The same tensor as embed_tokens() when tied.
  const at::Tensor& lm_head() const { return lm_head_; }

  // input_ids [batch, seq] -> logits [batch, seq, vocab] in the compute
  // dtype: causal over the sequence, continuing after `cache` if given
  // (whose every layer then grows by seq). `hook` sees every linear input.
  absl::StatusOr<at::Tensor> Forward(const at::Tensor& input_ids, KvCache* cache = nullptr,
                                     LinearHook* hook = nullptr) const;

  // The resident weights under their checkpoint names, sharing storage with
  // the model (set requires_grad, update in place under NoGradGuard). A tied
  // lm_head appears once, as model.embed_tokens.weight. When not resident,
  // only the embeddings, final norm and lm_head.
  std::vector<std::pair<std::string, at::Tensor>> NamedParameters() const;

  // Writes `dir`/model.safetensors and then `dir`/config.json (LlamaConfigJson
  // with torch_dtype set), each atomically (temp file, fsync, rename), in
  // `dtype` (default: the compute dtype). Resident weights as they are now;
  // otherwise the checkpoint's, block by block. FAILED_PRECONDITION if `dir`
  // holds a model.safetensors.index.json, which readers would prefer to the
  // file written here.
  absl::Status SaveHuggingFace(const std::string& dir,
                               std::optional<at::ScalarType> dtype = std::nullopt) const;

 private:
  LlamaModel(LlamaConfig config, LlamaLoadOptions options, SafetensorsCheckpoint checkpoint)
      : config_(std::move(config)), options_(options), checkpoint_(std::move(checkpoint)) {}

  absl::StatusOr<at::Tensor> LoadTensor(const std::string& name) const;

  LlamaConfig config_;
  LlamaLoadOptions options_;
  SafetensorsCheckpoint checkpoint_;
  at::Tensor embed_tokens_;
  at::Tensor norm_;
  at::Tensor lm_head_;
  std::vector<DecoderBlockWeights> blocks_;
};

}  // namespace compress::engine
