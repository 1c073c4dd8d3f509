// A random Llama-shaped checkpoint (Hugging Face LlamaForCausalLM layout) for
// tests and benchmarks: config.json plus safetensors, single or sharded.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/safetensors_header.h"

namespace compress::engine {

struct RandomModelOptions {
  int64_t hidden_size = 64;
  int64_t intermediate_size = 128;
  int64_t num_layers = 2;
  int64_t num_heads = 4;
  int64_t num_kv_heads = 2;
  int64_t vocab_size = 256;
  SafetensorsDtype dtype = SafetensorsDtype::kF32;  // kF32, kF16 or kBF16
  uint64_t seed = 0;
  // 0: one model.safetensors. Otherwise shards of at most this many data
  // bytes (a larger tensor gets a shard of its own) plus an index.
  int64_t max_shard_bytes = 0;

  // Variants of the family. The defaults write the plain Llama checkpoint
  // described here, byte for byte.
  std::string model_type = "llama";  // "llama", "mistral" or "qwen2" (q/k/v biases)
  bool attention_bias = false;       // llama only: q/k/v/o_proj biases
  bool tie_word_embeddings = false;  // no lm_head.weight
  int64_t head_dim = 0;              // 0: hidden_size / num_heads
  double rope_theta = 10000.0;
  double init_std = 0.02;  // of linear weights, biases, embeddings; norms 1 + N(0, init_std^2)
  // A JSON object whose fields are written into config.json last, replacing
  // any of the same name, e.g. {"rope_scaling": {...}, "sliding_window": 4}.
  std::string extra_config_json;
};

// Names and shapes in the order they are written:
// model.embed_tokens.weight, then per layer N
//   model.layers.N.input_layernorm.weight,
//   model.layers.N.self_attn.{q,k,v,o}_proj.weight (each followed by its
//     .bias where the variant has one: q/k/v for qwen2, all four for
//     llama with attention_bias),
//   model.layers.N.post_attention_layernorm.weight,
//   model.layers.N.mlp.{gate,up,down}_proj.weight,
// then model.norm.weight, lm_head.weight (not when tie_word_embeddings).
// Linear weights are [out, in].
std::vector<SafetensorsTensorSpec> LlamaTensorSpecs(const RandomModelOptions& options);

// Writes config.json and the weights into `dir` (created if missing). The
// values depend only on (seed, tensor name, element index), never on
// LibTorch's generator, so a seed gives the same bytes on every build:
// linear and embedding weights and biases ~ N(0, init_std^2), norm weights
// 1 + N(0, init_std^2). INVALID_ARGUMENT for inconsistent sizes (hidden_size
// not a multiple of num_heads without a head_dim, num_heads not a multiple
// of num_kv_heads, a size < 1), a dtype other than F32/F16/BF16, an unknown
// model_type, attention_bias outside llama, or extra_config_json that is not
// a JSON object.
absl::Status WriteRandomLlamaModel(const RandomModelOptions& options, const std::string& dir);

}  // namespace compress::engine
