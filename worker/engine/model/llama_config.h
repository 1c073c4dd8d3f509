// The Hugging Face `config.json` of a Llama-family decoder (LlamaForCausalLM,
// MistralForCausalLM, Qwen2ForCausalLM), parsed into the one struct the
// runtime reads. No LibTorch here.
//
// Parsing is strict on everything that changes the math: an architecture,
// model_type, hidden_act or rope_scaling type the runtime does not implement,
// a bias it lacks (mlp_bias), or sizes that do not fit together are
// INVALID_ARGUMENT naming the field and its value, never a silently different
// model. Fields that do not change the forward pass (initializer_range,
// use_cache, pretraining_tp, transformers_version, ...) are ignored and kept
// verbatim when the config is written back.
//
// Supported subset (what transformers does for these model types):
//   llama    q/k/v/o biases iff attention_bias; rope_scaling null, "default",
//            "linear" or "llama3".
//   mistral  no biases; sliding_window (every layer) when set and
//            use_sliding_window is not false.
//   qwen2    q/k/v biases, none on o_proj; sliding_window only when
//            use_sliding_window is true, and only in the layers from
//            max_window_layers on (the first max_window_layers use full
//            attention), as transformers' layer_types does.
// A sliding window of W lets query position i attend to key positions j with
// i - W < j <= i (W tokens including itself), as transformers' masks do.
// Transformers v5's `rope_parameters` object (rope_type, rope_theta, scaling
// fields) is read like rope_scaling plus rope_theta.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace compress::engine {

enum class LlamaFamily { kLlama, kMistral, kQwen2 };

// "llama", "mistral", "qwen2": the config's model_type.
const char* ModelTypeName(LlamaFamily family);
// "LlamaForCausalLM", ...: the one architecture each family supports.
const char* ArchitectureName(LlamaFamily family);

// Rotary frequency scaling (transformers' ROPE_INIT_FUNCTIONS), applied to the
// inverse frequencies inv_freq[i] = rope_theta^(-2i / head_dim):
//   kLinear  inv_freq / factor
//   kLlama3  with wavelen = 2 pi / inv_freq, low = original / low_freq_factor,
//            high = original / high_freq_factor:
//              wavelen < high: unchanged; wavelen > low: inv_freq / factor;
//              otherwise (1 - s) inv_freq / factor + s inv_freq with
//              s = (original / wavelen - low_freq_factor)
//                  / (high_freq_factor - low_freq_factor).
// Both keep the attention scaling at 1.
struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;                     // kLlama3
  double high_freq_factor = 4.0;                    // kLlama3
  int64_t original_max_position_embeddings = 8192;  // kLlama3

  bool operator==(const RopeScaling& other) const;
};

struct LlamaConfig {
  LlamaFamily family = LlamaFamily::kLlama;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // default: num_attention_heads
  int64_t head_dim = 0;             // default: hidden_size / num_attention_heads
  int64_t vocab_size = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 0;  // informational: longer inputs still run
  bool tie_word_embeddings = false;     // lm_head shares model.embed_tokens.weight
  bool qkv_bias = false;                // q/k/v_proj have a bias
  bool o_bias = false;                  // o_proj has a bias
  // 0: full causal attention everywhere. Otherwise the window W of the layers
  // from first_sliding_layer on.
  int64_t sliding_window = 0;
  int64_t first_sliding_layer = 0;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // eos_token_id: one id or a list
  std::string torch_dtype;             // as written ("bfloat16", ...); empty if absent
  // The JSON this config was parsed from (empty for one built in code):
  // LlamaConfigJson keeps the fields this struct does not model.
  std::string source_json;

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
  // The sliding window of `layer`, 0 for full attention.
  int64_t SlidingWindow(int64_t layer) const {
    return sliding_window > 0 && layer >= first_sliding_layer ? sliding_window : 0;
  }
};

// Parses config.json text. `source` names it in error messages (a path).
absl::StatusOr<LlamaConfig> ParseLlamaConfig(absl::string_view json, absl::string_view source);

// Reads and parses `<model_folder>/config.json`: NOT_FOUND if it is missing.
absl::StatusOr<LlamaConfig> ReadLlamaConfig(const std::string& model_folder);

// The checks ParseLlamaConfig applies after reading the fields, for a config
// built or changed in code (e.g. a student with fewer layers): positive
// sizes, heads divisible by key/value heads, an even head_dim, consistent
// rope scaling.
absl::Status ValidateLlamaConfig(const LlamaConfig& config);

// config.json text for `config`: its source_json with every field the struct
// models overwritten (and fields of the family's transformers config only;
// e.g. no attention_bias for qwen2). ParseLlamaConfig gives back an equal
// config (source_json aside).
std::string LlamaConfigJson(const LlamaConfig& config);

}  // namespace compress::engine
