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
};

// Names and shapes in the order they are written:
// model.embed_tokens.weight, then per layer N
//   model.layers.N.input_layernorm.weight,
//   model.layers.N.self_attn.{q,k,v,o}_proj.weight,
//   model.layers.N.post_attention_layernorm.weight,
//   model.layers.N.mlp.{gate,up,down}_proj.weight,
// then model.norm.weight, lm_head.weight. Linear weights are [out, in].
std::vector<SafetensorsTensorSpec> LlamaTensorSpecs(const RandomModelOptions& options);

// Writes config.json and the weights into `dir` (created if missing). The
// values depend only on (seed, tensor name, element index), never on
// LibTorch's generator, so a seed gives the same bytes on every build:
// linear and embedding weights ~ N(0, 0.02^2), norm weights 1 + N(0, 0.02^2).
// INVALID_ARGUMENT for inconsistent sizes (hidden_size not a multiple of
// num_heads, num_heads not a multiple of num_kv_heads, a size < 1) or a dtype
// other than F32/F16/BF16.
absl::Status WriteRandomLlamaModel(const RandomModelOptions& options, const std::string& dir);

}  // namespace compress::engine
