#include "worker/engine/model/random_model.h"

#include <ATen/ATen.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status_macros.h"
#include "worker/engine/model/safetensors_reader.h"
#include "worker/engine/model/safetensors_writer.h"
#include "worker/engine/model/tensor_dtype.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t Fnv1a(absl::string_view s) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001B3ull;
  return h;
}

// A counter-based generator: element i of a tensor depends on (seed, name, i)
// only, so values do not change with tensor order, sharding or threads.
at::Tensor RandomValues(const SafetensorsTensorSpec& spec, uint64_t seed, double init_std) {
  at::Tensor values = at::empty(spec.shape, at::kFloat);
  float* out = values.data_ptr<float>();
  const int64_t n = values.numel();
  const uint64_t stream = SplitMix64(seed ^ Fnv1a(spec.name));
  const bool is_norm = absl::EndsWith(spec.name, "norm.weight");
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t bits = SplitMix64(stream + static_cast<uint64_t>(i));
    // Box-Muller from two 24-bit uniforms in (0, 1).
    const double u1 = (static_cast<double>(bits >> 40) + 0.5) / 16777216.0;
    const double u2 = (static_cast<double>(bits & 0xFFFFFF) + 0.5) / 16777216.0;
    const double normal = std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
    out[i] = static_cast<float>((is_norm ? 1.0 : 0.0) + init_std * normal);
  }
  return values;
}

const char* TorchDtypeName(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::kF16:
      return "float16";
    case SafetensorsDtype::kBF16:
      return "bfloat16";
    default:
      return "float32";
  }
}

// One row per variant.
struct Variant {
  const char* model_type;
  const char* architecture;
  bool qkv_bias;  // always (qwen2)
};
constexpr Variant kVariants[] = {
    {"llama", "LlamaForCausalLM", false},
    {"mistral", "MistralForCausalLM", false},
    {"qwen2", "Qwen2ForCausalLM", true},
};

const Variant* FindVariant(const std::string& model_type) {
  for (const Variant& v : kVariants) {
    if (model_type == v.model_type) return &v;
  }
  return nullptr;
}

int64_t HeadDim(const RandomModelOptions& o) {
  return o.head_dim > 0 ? o.head_dim : o.hidden_size / std::max<int64_t>(o.num_heads, 1);
}

// Call after ValidateOptions.
std::string ConfigJson(const RandomModelOptions& o) {
  const Variant& variant = *FindVariant(o.model_type);
  nlohmann::ordered_json config = {
      {"architectures", {variant.architecture}},
      {"model_type", variant.model_type},
      {"hidden_size", o.hidden_size},
      {"intermediate_size", o.intermediate_size},
      {"num_hidden_layers", o.num_layers},
      {"num_attention_heads", o.num_heads},
      {"num_key_value_heads", o.num_kv_heads},
      {"vocab_size", o.vocab_size},
      {"hidden_act", "silu"},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", o.rope_theta},
      {"max_position_embeddings", 2048},
      {"initializer_range", o.init_std},
      {"tie_word_embeddings", o.tie_word_embeddings},
      {"torch_dtype", TorchDtypeName(o.dtype)},
  };
  // Fields only the variants write, so that the default bytes stay as they were.
  if (o.head_dim > 0) config["head_dim"] = o.head_dim;
  if (o.attention_bias) config["attention_bias"] = true;
  if (o.model_type == "mistral") config["sliding_window"] = nullptr;
  if (o.model_type == "qwen2") {
    config["use_sliding_window"] = false;
    config["sliding_window"] = nullptr;
    config["max_window_layers"] = o.num_layers;
  }
  if (!o.extra_config_json.empty()) {
    config.update(nlohmann::ordered_json::parse(o.extra_config_json));
  }
  return config.dump(2) + "\n";
}

absl::Status ValidateOptions(const RandomModelOptions& o) {
  if (o.hidden_size < 1 || o.intermediate_size < 1 || o.num_layers < 1 || o.num_heads < 1 ||
      o.num_kv_heads < 1 || o.vocab_size < 1 || o.max_shard_bytes < 0) {
    return absl::InvalidArgumentError("random model: every size must be at least 1");
  }
  if (o.head_dim < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("random model: head_dim ", o.head_dim, " is negative"));
  }
  if (o.head_dim == 0 && o.hidden_size % o.num_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("random model: hidden_size ", o.hidden_size,
                                                   " is not a multiple of num_heads ",
                                                   o.num_heads));
  }
  if (o.num_heads % o.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("random model: num_heads ", o.num_heads,
                                                   " is not a multiple of num_kv_heads ",
                                                   o.num_kv_heads));
  }
  const Variant* variant = FindVariant(o.model_type);
  if (variant == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("random model: model_type \"", o.model_type,
                                                   "\" is not llama, mistral or qwen2"));
  }
  if (!std::isfinite(o.init_std) || o.init_std < 0 || !std::isfinite(o.rope_theta) ||
      o.rope_theta <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("random model: init_std ", o.init_std, " and rope_theta ", o.rope_theta,
                     " must be finite, init_std >= 0, rope_theta > 0"));
  }
  if (o.attention_bias && o.model_type != "llama") {
    return absl::InvalidArgumentError("random model: attention_bias is a llama option");
  }
  if (!o.extra_config_json.empty()) {
    const nlohmann::json extra =
        nlohmann::json::parse(o.extra_config_json, nullptr, /*allow_exceptions=*/false);
    if (extra.is_discarded() || !extra.is_object()) {
      return absl::InvalidArgumentError("random model: extra_config_json is not a JSON object");
    }
  }
  if (!IsWeightDtype(o.dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("random model: dtype ", DtypeName(o.dtype), " is not F32, F16 or BF16"));
  }
  return absl::OkStatus();
}

uint64_t SpecBytes(const SafetensorsTensorSpec& spec) {
  uint64_t n = static_cast<uint64_t>(DtypeBytes(spec.dtype));
  for (int64_t d : spec.shape) n *= static_cast<uint64_t>(d);
  return n;
}

}  // namespace

std::vector<SafetensorsTensorSpec> LlamaTensorSpecs(const RandomModelOptions& o) {
  const int64_t head_dim = HeadDim(o);
  const int64_t q_dim = head_dim * o.num_heads;
  const int64_t kv_dim = head_dim * o.num_kv_heads;
  const Variant* variant = FindVariant(o.model_type);
  const bool qkv_bias = o.attention_bias || (variant != nullptr && variant->qkv_bias);
  std::vector<SafetensorsTensorSpec> specs;
  auto add = [&](std::string name, std::vector<int64_t> shape) {
    specs.push_back(SafetensorsTensorSpec{std::move(name), o.dtype, std::move(shape)});
  };
  add("model.embed_tokens.weight", {o.vocab_size, o.hidden_size});
  for (int64_t layer = 0; layer < o.num_layers; ++layer) {
    const std::string p = absl::StrCat("model.layers.", layer, ".");
    add(p + "input_layernorm.weight", {o.hidden_size});
    add(p + "self_attn.q_proj.weight", {q_dim, o.hidden_size});
    if (qkv_bias) add(p + "self_attn.q_proj.bias", {q_dim});
    add(p + "self_attn.k_proj.weight", {kv_dim, o.hidden_size});
    if (qkv_bias) add(p + "self_attn.k_proj.bias", {kv_dim});
    add(p + "self_attn.v_proj.weight", {kv_dim, o.hidden_size});
    if (qkv_bias) add(p + "self_attn.v_proj.bias", {kv_dim});
    add(p + "self_attn.o_proj.weight", {o.hidden_size, q_dim});
    if (o.attention_bias) add(p + "self_attn.o_proj.bias", {o.hidden_size});
    add(p + "post_attention_layernorm.weight", {o.hidden_size});
    add(p + "mlp.gate_proj.weight", {o.intermediate_size, o.hidden_size});
    add(p + "mlp.up_proj.weight", {o.intermediate_size, o.hidden_size});
    add(p + "mlp.down_proj.weight", {o.hidden_size, o.intermediate_size});
  }
  add("model.norm.weight", {o.hidden_size});
  if (!o.tie_word_embeddings) add("lm_head.weight", {o.vocab_size, o.hidden_size});
  return specs;
}

absl::Status WriteRandomLlamaModel(const RandomModelOptions& options, const std::string& dir) {
  RETURN_IF_ERROR(ValidateOptions(options));
  RETURN_IF_ERROR(MakeDirs(dir));
  const std::vector<SafetensorsTensorSpec> specs = LlamaTensorSpecs(options);

  // Greedy sharding in write order, as transformers' save_pretrained does.
  std::vector<std::vector<SafetensorsTensorSpec>> shards(1);
  uint64_t shard_bytes = 0;
  uint64_t total_bytes = 0;
  for (const SafetensorsTensorSpec& spec : specs) {
    const uint64_t bytes = SpecBytes(spec);
    if (options.max_shard_bytes > 0 && !shards.back().empty() &&
        shard_bytes + bytes > static_cast<uint64_t>(options.max_shard_bytes)) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(spec);
    shard_bytes += bytes;
    total_bytes += bytes;
  }

  const at::ScalarType dtype = *ToScalarType(options.dtype);
  std::vector<std::pair<std::string, std::string>> weight_map;
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file_name =
        options.max_shard_bytes == 0
            ? std::string(kSingleSafetensorsFileName)
            : ShardFileName(static_cast<int>(s), static_cast<int>(shards.size()));
    const std::string path = (std::filesystem::path(dir) / file_name).string();
    ASSIGN_OR_RETURN(SafetensorsWriter writer, SafetensorsWriter::Open(path, shards[s]));
    for (const SafetensorsTensorSpec& spec : shards[s]) {
      ASSIGN_OR_RETURN(at::Tensor values,
                       CatchTorchErrors(spec.name, [&]() -> absl::StatusOr<at::Tensor> {
                         return RandomValues(spec, options.seed, options.init_std).to(dtype);
                       }));
      RETURN_IF_ERROR(writer.WriteTensor(spec.name, values));
      weight_map.emplace_back(spec.name, file_name);
    }
    RETURN_IF_ERROR(writer.Commit());
  }
  if (options.max_shard_bytes > 0) {
    RETURN_IF_ERROR(
        WriteFileAtomic((std::filesystem::path(dir) / kSafetensorsIndexFileName).string(),
                        SafetensorsIndexJson(weight_map, total_bytes)));
  }
  return WriteFileAtomic((std::filesystem::path(dir) / "config.json").string(),
                         ConfigJson(options));
}

}  // namespace compress::engine
