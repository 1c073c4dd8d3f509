#include "worker/engine/gguf/gguf_export.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/engine/gguf/gguf_llama.h"
#include "worker/engine/gguf/gguf_presets.h"
#include "worker/engine/gguf/gguf_quants.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

constexpr uint32_t kQuantizationVersion = 2;  // ggml's GGML_QNT_VERSION
constexpr char kRopeFreqs[] = "rope_freqs.weight";

// The heads a query or key projection's rows hold when the architecture
// reorders them for its rope; 0 for other tensors and architectures.
int64_t RotaryHeads(absl::string_view gguf_name, const LlamaConfig& config) {
  if (!GgufArchitectureOf(config.family).reorders_rotary_rows) return 0;
  if (absl::StrContains(gguf_name, ".attn_q.")) return config.num_attention_heads;
  if (absl::StrContains(gguf_name, ".attn_k.")) return config.num_key_value_heads;
  return 0;
}

// What llama.cpp's loader for the family's architecture cannot express:
// INVALID_ARGUMENT with the reason, before anything is written.
absl::Status CheckArchitectureFits(const LlamaConfig& config) {
  if (config.family != LlamaFamily::kQwen2) return absl::OkStatus();
  // LLM_ARCH_QWEN2 declares attn_q and attn_output as n_embd x n_embd.
  if (config.q_dim() != config.hidden_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GGUF export: llama.cpp's qwen2 architecture needs num_attention_heads * head_dim (",
        config.num_attention_heads, " * ", config.head_dim, " = ", config.q_dim(),
        ") to equal hidden_size (", config.hidden_size, ")"));
  }
  // Its loader has no rope_freqs tensor, which is how llama3 scaling travels.
  if (config.rope_scaling.type == RopeScaling::Type::kLlama3) {
    return absl::InvalidArgumentError(
        "GGUF export: llama.cpp's qwen2 architecture has no llama3 rope scaling (rope_freqs)");
  }
  return absl::OkStatus();
}

std::vector<GgufKeyValue> ModelMetadata(const LlamaConfig& config, const GgufVocabulary& vocabulary,
                                        const GgufExportOptions& options) {
  auto u32 = [](int64_t v) { return GgufValue::Uint32(static_cast<uint32_t>(v)); };
  const std::string arch = GgufArchitectureOf(config.family).name;
  auto key = [&](absl::string_view name) { return absl::StrCat(arch, ".", name); };
  std::vector<GgufKeyValue> kv = {
      {"general.architecture", GgufValue::String(arch)},
      {"general.name", GgufValue::String(options.model_name)},
      {"general.file_type", GgufValue::Uint32(options.preset.file_type)},
      {"general.quantization_version", GgufValue::Uint32(kQuantizationVersion)},
      {key("vocab_size"), u32(config.vocab_size)},
      {key("context_length"), u32(config.max_position_embeddings)},
      {key("embedding_length"), u32(config.hidden_size)},
      {key("block_count"), u32(config.num_hidden_layers)},
      {key("feed_forward_length"), u32(config.intermediate_size)},
      {key("rope.dimension_count"), u32(config.head_dim)},
      {key("attention.head_count"), u32(config.num_attention_heads)},
      {key("attention.head_count_kv"), u32(config.num_key_value_heads)},
      {key("attention.key_length"), u32(config.head_dim)},
      {key("attention.value_length"), u32(config.head_dim)},
      {key("attention.layer_norm_rms_epsilon"),
       GgufValue::Float32(static_cast<float>(config.rms_norm_eps))},
      {key("rope.freq_base"), GgufValue::Float32(static_cast<float>(config.rope_theta))},
  };
  if (config.rope_scaling.type == RopeScaling::Type::kLinear) {
    kv.push_back({key("rope.scaling.type"), GgufValue::String("linear")});
    kv.push_back({key("rope.scaling.factor"),
                  GgufValue::Float32(static_cast<float>(config.rope_scaling.factor))});
  }
  kv.push_back({"tokenizer.ggml.model", GgufValue::String(vocabulary.model)});
  kv.push_back({"tokenizer.ggml.pre", GgufValue::String(vocabulary.pre)});
  kv.push_back({"tokenizer.ggml.tokens", GgufValue::Array(vocabulary.tokens)});
  if (!vocabulary.scores.empty()) {
    kv.push_back({"tokenizer.ggml.scores", GgufValue::Array(vocabulary.scores)});
  }
  kv.push_back({"tokenizer.ggml.token_type", GgufValue::Array(vocabulary.token_types)});
  if (!vocabulary.merges.empty()) {
    kv.push_back({"tokenizer.ggml.merges", GgufValue::Array(vocabulary.merges)});
  }
  if (vocabulary.model == "llama") {
    kv.push_back({"tokenizer.ggml.add_space_prefix", GgufValue::Bool(vocabulary.add_space_prefix)});
  }
  if (vocabulary.unknown_id) {
    kv.push_back({"tokenizer.ggml.unknown_token_id", u32(*vocabulary.unknown_id)});
  }
  // BOS/EOS the tokenizer does not name come from config.json, as
  // convert_hf_to_gguf.py takes them (Qwen2: bos_token null in
  // tokenizer_config.json, bos_token_id <|endoftext|> in config.json).
  std::optional<int64_t> bos_id = vocabulary.bos_id;
  if (!bos_id) bos_id = config.bos_token_id;
  std::optional<int64_t> eos_id = vocabulary.eos_id;
  if (!eos_id && !config.eos_token_ids.empty()) eos_id = config.eos_token_ids.front();
  auto in_vocabulary = [&](std::optional<int64_t> id) {
    return id && *id >= 0 && *id < static_cast<int64_t>(vocabulary.tokens.size());
  };
  if (in_vocabulary(bos_id)) kv.push_back({"tokenizer.ggml.bos_token_id", u32(*bos_id)});
  if (in_vocabulary(eos_id)) kv.push_back({"tokenizer.ggml.eos_token_id", u32(*eos_id)});
  if (vocabulary.padding_id) {
    kv.push_back({"tokenizer.ggml.padding_token_id", u32(*vocabulary.padding_id)});
  }
  kv.push_back({"tokenizer.ggml.add_bos_token", GgufValue::Bool(vocabulary.add_bos)});
  kv.push_back({"tokenizer.ggml.add_eos_token", GgufValue::Bool(false)});
  if (!vocabulary.chat_template.empty()) {
    kv.push_back({"tokenizer.chat_template", GgufValue::String(vocabulary.chat_template)});
  }
  return kv;
}

}  // namespace

absl::StatusOr<GgufModelWriter> GgufModelWriter::Open(const std::string& path,
                                                      const LlamaConfig& config,
                                                      const GgufVocabulary& vocabulary,
                                                      const std::vector<GgufSourceTensor>& tensors,
                                                      const GgufExportOptions& options) {
  RETURN_IF_ERROR(CheckArchitectureFits(config));
  const char* arch = GgufArchitectureOf(config.family).name;
  std::vector<GgufTensorSpec> specs;
  // llama3 rope scaling travels as llama.cpp's rope_freqs tensor: per
  // frequency, the factor that divides the unscaled one.
  std::string rope_freqs;
  if (config.rope_scaling.type == RopeScaling::Type::kLlama3) {
    ASSIGN_OR_RETURN(rope_freqs, CatchTorchErrors("rope_freqs", [&]() -> absl::StatusOr<std::string> {
                       LlamaConfig unscaled = config;
                       unscaled.rope_scaling = RopeScaling();
                       const at::Tensor factors = (RotaryInverseFrequencies(unscaled) /
                                                   RotaryInverseFrequencies(config))
                                                      .to(at::kFloat)
                                                      .contiguous();
                       return std::string(static_cast<const char*>(factors.data_ptr()), factors.nbytes());
                     }));
    specs.push_back({kRopeFreqs, {config.head_dim / 2}, GgufType::kF32});
  }
  for (const GgufSourceTensor& t : tensors) {
    const std::optional<std::string> gguf_name = GgufTensorName(t.name);
    if (!gguf_name) {
      if (absl::StrContains(t.name, "rotary_emb")) continue;  // llama.cpp recomputes these
      return absl::InvalidArgumentError(absl::StrCat(
          "GGUF export: tensor '", t.name, "' has no name in llama.cpp's ", arch, " architecture"));
    }
    GgufTensorRole role;
    role.name = *gguf_name;
    role.shape = t.shape;
    role.layer = GgufLayerOf(*gguf_name);
    role.num_layers = config.num_hidden_layers;
    role.gqa = config.num_attention_heads / std::max<int64_t>(config.num_key_value_heads, 1);
    role.tied_output = config.tie_word_embeddings;
    specs.push_back({*gguf_name, GgufNeFromTorchShape(t.shape), GgufTypeForTensor(options.preset, role)});
  }
  ASSIGN_OR_RETURN(GgufWriter writer,
                   GgufWriter::Open(path, ModelMetadata(config, vocabulary, options), specs));
  GgufModelWriter model_writer(std::move(writer), std::move(specs), config);
  if (!rope_freqs.empty()) {
    RETURN_IF_ERROR(model_writer.writer_.WriteTensor(kRopeFreqs, rope_freqs));
    model_writer.next_ = 1;
  }
  return model_writer;
}

bool GgufModelWriter::Includes(const std::string& hf_name) const {
  return GgufTensorName(hf_name).has_value();
}

absl::Status GgufModelWriter::Write(const std::string& hf_name, const at::Tensor& values,
                                    const at::Tensor& importance) {
  const std::optional<std::string> gguf_name = GgufTensorName(hf_name);
  if (!gguf_name) return absl::OkStatus();  // not in the file
  if (next_ >= specs_.size() || specs_[next_].name != *gguf_name) {
    return absl::InternalError(absl::StrCat("GGUF export: '", hf_name, "' written out of order"));
  }
  const GgufTensorSpec& spec = specs_[next_];
  at::Tensor rows = values;
  if (const int64_t heads = RotaryHeads(spec.name, config_); heads > 0) {
    ASSIGN_OR_RETURN(rows, PermuteRotaryRowsForGguf(values, heads, hf_name));
  }
  // Importance weights apply to a matrix's columns; vectors have none.
  const at::Tensor weights = values.dim() == 2 ? importance : at::Tensor();
  ASSIGN_OR_RETURN(std::string bytes, QuantizeGgufTensor(rows, spec.type, weights, hf_name));
  RETURN_IF_ERROR(writer_.WriteTensor(spec.name, std::move(bytes)));
  ++next_;
  return absl::OkStatus();
}

absl::Status GgufModelWriter::Commit() { return writer_.Commit(); }

absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> ReadGgufAsLlamaTensors(
    const std::string& path, const LlamaConfig& config) {
  ASSIGN_OR_RETURN(const GgufMappedFile file, GgufMappedFile::Open(path));
  // The rows' order depends on the architecture: the file must have the
  // one this config's family is written as.
  const char* arch = GgufArchitectureOf(config.family).name;
  const GgufValue* found_arch = file.header().FindMetadata("general.architecture");
  const std::string* file_arch = found_arch == nullptr ? nullptr : found_arch->Get<std::string>();
  if (file_arch == nullptr || *file_arch != arch) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": general.architecture is ",
        file_arch == nullptr ? "missing" : absl::StrCat("'", *file_arch, "'"), ", not '", arch,
        "' (what a ", ModelTypeName(config.family), " model is written as)"));
  }
  // GGUF name -> Hugging Face name, over every name a Llama checkpoint has.
  std::map<std::string, std::string> hf_names;
  for (const SafetensorsTensorSpec& spec : LlamaCheckpointSpecs(config, SafetensorsDtype::kF32)) {
    if (const std::optional<std::string> name = GgufTensorName(spec.name)) hf_names[*name] = spec.name;
  }
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const GgufTensorInfo& info : file.header().tensors) {
    if (info.name == kRopeFreqs) continue;  // derived from the config, not a checkpoint tensor
    auto found = hf_names.find(info.name);
    if (found == hf_names.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor '", info.name, "' is not part of a Llama checkpoint"));
    }
    ASSIGN_OR_RETURN(at::Tensor values, DequantizeGgufTensor(file.TensorBytes(info), info.type,
                                                             info.TorchShape(), info.name));
    if (const int64_t heads = RotaryHeads(info.name, config); heads > 0) {
      ASSIGN_OR_RETURN(values, UnpermuteRotaryRowsFromGguf(values, heads, info.name));
    }
    tensors.emplace_back(found->second, std::move(values));
  }
  return tensors;
}

}  // namespace compress::engine
