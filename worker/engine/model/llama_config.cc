#include "worker/engine/model/llama_config.h"

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/files.h"
#include "common/status_macros.h"

namespace compress::engine {
namespace {

using Json = nlohmann::json;

// One row per supported family: the table is the spec of what each
// transformers config class defaults to when a field is absent.
struct FamilyInfo {
  LlamaFamily family;
  const char* model_type;
  const char* architecture;
  int64_t default_max_position_embeddings;
  int64_t default_num_key_value_heads;  // 0: num_attention_heads
};

constexpr FamilyInfo kFamilies[] = {
    {LlamaFamily::kLlama, "llama", "LlamaForCausalLM", 2048, 0},
    {LlamaFamily::kMistral, "mistral", "MistralForCausalLM", 4096 * 32, 8},
    {LlamaFamily::kQwen2, "qwen2", "Qwen2ForCausalLM", 32768, 32},
};

// MistralConfig's and Qwen2Config's sliding_window when the key is absent
// (null means none).
constexpr int64_t kDefaultSlidingWindow = 4096;
// Qwen2Config's max_window_layers when the key is absent.
constexpr int64_t kQwen2DefaultMaxWindowLayers = 28;

const FamilyInfo& Info(LlamaFamily family) {
  for (const FamilyInfo& info : kFamilies) {
    if (info.family == family) return info;
  }
  return kFamilies[0];  // unreachable: every enumerator has a row
}

std::string SupportedList(const char* FamilyInfo::*field) {
  std::vector<std::string> names;
  for (const FamilyInfo& info : kFamilies) names.push_back(info.*field);
  return absl::StrJoin(names, ", ");
}

const char* RopeTypeName(RopeScaling::Type type) {
  switch (type) {
    case RopeScaling::Type::kLinear:
      return "linear";
    case RopeScaling::Type::kLlama3:
      return "llama3";
    case RopeScaling::Type::kNone:
      break;
  }
  return "default";
}

// Typed access to a JSON object's fields; every error names the source, the
// field (with its path, e.g. "rope_scaling.factor") and the value. Absent
// and null are the same ("not set") except where a caller asks.
class Fields {
 public:
  Fields(const Json& object, std::string source, std::string prefix = "")
      : object_(object), source_(std::move(source)), prefix_(std::move(prefix)) {}

  bool Has(const char* name) const { return object_.contains(name) && !object_[name].is_null(); }
  bool HasKey(const char* name) const { return object_.contains(name); }
  const Json& Get(const char* name) const { return object_[name]; }
  std::string Path(const char* name) const { return prefix_ + name; }

  absl::Status Invalid(const char* name, absl::string_view problem) const {
    return absl::InvalidArgumentError(absl::StrCat(
        source_, ": ", Path(name), " ", object_.contains(name) ? object_[name].dump() : "",
        object_.contains(name) ? " " : "", problem));
  }

  absl::StatusOr<std::optional<int64_t>> OptionalInt(const char* name) const {
    if (!Has(name)) return std::nullopt;
    const Json& v = object_[name];
    if (v.is_number_integer()) return v.get<int64_t>();
    // 4096.0 is an integer too (some exporters write floats).
    if (v.is_number_float() && std::isfinite(v.get<double>()) &&
        v.get<double>() == std::trunc(v.get<double>()) && std::fabs(v.get<double>()) < 9e15) {
      return static_cast<int64_t>(v.get<double>());
    }
    return Invalid(name, "is not an integer");
  }

  absl::StatusOr<int64_t> PositiveInt(const char* name, std::optional<int64_t> fallback) const {
    ASSIGN_OR_RETURN(std::optional<int64_t> value, OptionalInt(name));
    if (!value.has_value()) {
      if (fallback.has_value()) return *fallback;
      return absl::InvalidArgumentError(absl::StrCat(source_, ": ", Path(name), " is missing"));
    }
    if (*value < 1) return Invalid(name, "must be at least 1");
    return *value;
  }

  absl::StatusOr<double> PositiveDouble(const char* name, std::optional<double> fallback) const {
    if (!Has(name)) {
      if (fallback.has_value()) return *fallback;
      return absl::InvalidArgumentError(absl::StrCat(source_, ": ", Path(name), " is missing"));
    }
    const Json& v = object_[name];
    if (!v.is_number()) return Invalid(name, "is not a number");
    const double value = v.get<double>();
    if (!std::isfinite(value) || value <= 0) return Invalid(name, "must be a positive number");
    return value;
  }

  absl::StatusOr<bool> Bool(const char* name, bool fallback) const {
    if (!Has(name)) return fallback;
    if (!object_[name].is_boolean()) return Invalid(name, "is not true or false");
    return object_[name].get<bool>();
  }

  absl::StatusOr<std::optional<std::string>> OptionalString(const char* name) const {
    if (!Has(name)) return std::nullopt;
    if (!object_[name].is_string()) return Invalid(name, "is not a string");
    return object_[name].get<std::string>();
  }

  const std::string& source() const { return source_; }

 private:
  const Json& object_;
  std::string source_;
  std::string prefix_;
};

absl::StatusOr<LlamaFamily> ParseFamily(const Fields& f) {
  ASSIGN_OR_RETURN(std::optional<std::string> model_type, f.OptionalString("model_type"));
  if (!model_type.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat(f.source(), ": model_type is missing"));
  }
  const FamilyInfo* family = nullptr;
  for (const FamilyInfo& info : kFamilies) {
    if (*model_type == info.model_type) family = &info;
  }
  if (family == nullptr) {
    return f.Invalid(
        "model_type",
        absl::StrCat("is not supported (supported: ", SupportedList(&FamilyInfo::model_type), ")"));
  }
  // Absent architectures: the model_type decides. Present: every entry must
  // be the causal-LM head of that family (a sequence classifier has no lm_head).
  if (f.Has("architectures")) {
    const Json& archs = f.Get("architectures");
    if (!archs.is_array()) return f.Invalid("architectures", "is not a list");
    for (const Json& arch : archs) {
      if (!arch.is_string() || arch.get<std::string>() != family->architecture) {
        bool known = false;
        for (const FamilyInfo& info : kFamilies) {
          known = known || (arch.is_string() && arch.get<std::string>() == info.architecture);
        }
        return f.Invalid("architectures",
                         known ? absl::StrCat("does not match model_type \"", *model_type,
                                              "\" (expected ", family->architecture, ")")
                               : absl::StrCat("is not supported (supported: ",
                                              SupportedList(&FamilyInfo::architecture), ")"));
      }
    }
  }
  return family->family;
}

// rope_scaling (or v5's rope_parameters) into `scaling`; a rope_theta inside
// rope_parameters into `theta`.
absl::Status ParseRope(const Fields& root, const char* key, RopeScaling* scaling, double* theta) {
  if (!root.Has(key)) return absl::OkStatus();
  const Json& object = root.Get(key);
  if (!object.is_object()) return root.Invalid(key, "is not an object or null");
  const Fields f(object, root.source(), absl::StrCat(key, "."));
  if (f.Has("rope_theta")) {
    ASSIGN_OR_RETURN(*theta, f.PositiveDouble("rope_theta", std::nullopt));
  }
  // transformers reads "rope_type", falling back to the older "type".
  const char* type_key = f.Has("rope_type") ? "rope_type" : "type";
  ASSIGN_OR_RETURN(std::optional<std::string> type, f.OptionalString(type_key));
  if (!type.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat(root.source(), ": ", key, ".rope_type is missing"));
  }
  *scaling = RopeScaling();
  if (*type == "default") return absl::OkStatus();
  if (*type == "linear") {
    scaling->type = RopeScaling::Type::kLinear;
    ASSIGN_OR_RETURN(scaling->factor, f.PositiveDouble("factor", std::nullopt));
    return absl::OkStatus();
  }
  if (*type == "llama3") {
    scaling->type = RopeScaling::Type::kLlama3;
    ASSIGN_OR_RETURN(scaling->factor, f.PositiveDouble("factor", std::nullopt));
    ASSIGN_OR_RETURN(scaling->low_freq_factor, f.PositiveDouble("low_freq_factor", std::nullopt));
    ASSIGN_OR_RETURN(scaling->high_freq_factor, f.PositiveDouble("high_freq_factor", std::nullopt));
    ASSIGN_OR_RETURN(scaling->original_max_position_embeddings,
                     f.PositiveInt("original_max_position_embeddings", std::nullopt));
    return absl::OkStatus();
  }
  return f.Invalid(type_key, "is not supported (supported: default, linear, llama3)");
}

// sliding_window, use_sliding_window, max_window_layers and layer_types, as
// each family's transformers config reads them.
absl::Status ParseSlidingWindow(const Fields& f, LlamaConfig* c) {
  if (c->family == LlamaFamily::kLlama) return absl::OkStatus();  // llama has none
  int64_t window = kDefaultSlidingWindow;                         // absent; null means none
  if (f.HasKey("sliding_window")) {
    ASSIGN_OR_RETURN(std::optional<int64_t> value, f.OptionalInt("sliding_window"));
    if (value.has_value() && *value < 1) return f.Invalid("sliding_window", "must be at least 1");
    window = value.value_or(0);
  }
  // Mistral has no use_sliding_window field (a window, when set, is used);
  // Qwen2Config's default is false.
  ASSIGN_OR_RETURN(const bool use_window,
                   f.Bool("use_sliding_window", c->family == LlamaFamily::kMistral));
  c->sliding_window = use_window ? window : 0;
  c->first_sliding_layer = 0;
  if (c->family != LlamaFamily::kQwen2) return absl::OkStatus();

  ASSIGN_OR_RETURN(std::optional<int64_t> max_window_layers, f.OptionalInt("max_window_layers"));
  if (max_window_layers.has_value() && *max_window_layers < 0) {
    return f.Invalid("max_window_layers", "must not be negative");
  }
  c->first_sliding_layer = max_window_layers.value_or(kQwen2DefaultMaxWindowLayers);
  if (!f.Has("layer_types") || c->sliding_window == 0) return absl::OkStatus();
  // transformers >= 4.53 lists each layer's kind, and that list decides
  // (max_window_layers only fills its default). This runtime expresses full
  // attention first, then sliding: any other pattern is refused.
  const Json& types = f.Get("layer_types");
  if (!types.is_array() || static_cast<int64_t>(types.size()) != c->num_hidden_layers) {
    return f.Invalid("layer_types", absl::StrCat("is not a list of num_hidden_layers (",
                                                 c->num_hidden_layers, ") entries"));
  }
  c->first_sliding_layer = c->num_hidden_layers;
  for (int64_t layer = 0; layer < c->num_hidden_layers; ++layer) {
    const Json& type = types[layer];
    const bool sliding = type == "sliding_attention";
    if (!sliding && type != "full_attention") {
      return f.Invalid("layer_types", absl::StrCat("entry ", layer, " ", type.dump(),
                                                   " is not full_attention or sliding_attention"));
    }
    if (sliding && c->first_sliding_layer == c->num_hidden_layers) c->first_sliding_layer = layer;
    if (!sliding && layer > c->first_sliding_layer) {
      return f.Invalid("layer_types",
                       absl::StrCat("has full attention at layer ", layer,
                                    " after sliding attention (not supported: full attention "
                                    "layers first, then sliding ones)"));
    }
  }
  return absl::OkStatus();
}

absl::Status ParseTokenIds(const Fields& f, LlamaConfig* c) {
  ASSIGN_OR_RETURN(c->bos_token_id, f.OptionalInt("bos_token_id"));
  c->eos_token_ids.clear();
  if (!f.Has("eos_token_id")) return absl::OkStatus();
  const Json& eos = f.Get("eos_token_id");
  if (eos.is_array()) {
    for (const Json& id : eos) {
      if (!id.is_number_integer()) return f.Invalid("eos_token_id", "is not a list of integers");
      c->eos_token_ids.push_back(id.get<int64_t>());
    }
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(std::optional<int64_t> id, f.OptionalInt("eos_token_id"));
  c->eos_token_ids.push_back(*id);
  return absl::OkStatus();
}

absl::Status Check(bool ok, absl::string_view message) {
  return ok ? absl::OkStatus() : absl::InvalidArgumentError(message);
}

}  // namespace

const char* ModelTypeName(LlamaFamily family) { return Info(family).model_type; }
const char* ArchitectureName(LlamaFamily family) { return Info(family).architecture; }

bool RopeScaling::operator==(const RopeScaling& other) const {
  return type == other.type && factor == other.factor && low_freq_factor == other.low_freq_factor &&
         high_freq_factor == other.high_freq_factor &&
         original_max_position_embeddings == other.original_max_position_embeddings;
}

absl::StatusOr<LlamaConfig> ParseLlamaConfig(absl::string_view json, absl::string_view source) {
  const Json root = Json::parse(json.begin(), json.end(), nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  }
  const Fields f(root, std::string(source));
  LlamaConfig c;
  c.source_json = std::string(json);
  ASSIGN_OR_RETURN(c.family, ParseFamily(f));
  const FamilyInfo& family = Info(c.family);

  ASSIGN_OR_RETURN(std::optional<std::string> act, f.OptionalString("hidden_act"));
  // transformers' ACT2FN maps both names to SiLU.
  if (act.has_value() && *act != "silu" && *act != "swish") {
    return f.Invalid("hidden_act", "is not supported (only \"silu\": the SwiGLU MLP)");
  }
  ASSIGN_OR_RETURN(const bool mlp_bias, f.Bool("mlp_bias", false));
  if (mlp_bias) return f.Invalid("mlp_bias", "is not supported (the MLP linears have no bias)");

  ASSIGN_OR_RETURN(c.hidden_size, f.PositiveInt("hidden_size", std::nullopt));
  ASSIGN_OR_RETURN(c.intermediate_size, f.PositiveInt("intermediate_size", std::nullopt));
  ASSIGN_OR_RETURN(c.num_hidden_layers, f.PositiveInt("num_hidden_layers", std::nullopt));
  ASSIGN_OR_RETURN(c.num_attention_heads, f.PositiveInt("num_attention_heads", std::nullopt));
  ASSIGN_OR_RETURN(c.vocab_size, f.PositiveInt("vocab_size", std::nullopt));
  ASSIGN_OR_RETURN(c.num_key_value_heads,
                   f.PositiveInt("num_key_value_heads", family.default_num_key_value_heads > 0
                                                            ? family.default_num_key_value_heads
                                                            : c.num_attention_heads));
  if (!f.Has("head_dim") && c.hidden_size % c.num_attention_heads != 0) {
    return f.Invalid("hidden_size", absl::StrCat("is not a multiple of num_attention_heads ",
                                                 c.num_attention_heads, " (and no head_dim)"));
  }
  ASSIGN_OR_RETURN(c.head_dim, f.PositiveInt("head_dim", c.hidden_size / c.num_attention_heads));
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return f.Invalid("num_key_value_heads",
                     absl::StrCat(f.Has("num_key_value_heads")
                                      ? ""
                                      : absl::StrCat("(absent: ", family.model_type, "'s default ",
                                                     c.num_key_value_heads, ") "),
                                  "does not divide num_attention_heads ", c.num_attention_heads));
  }
  if (c.head_dim % 2 != 0) return f.Invalid("head_dim", "must be even (rotary pairs)");
  ASSIGN_OR_RETURN(
      c.max_position_embeddings,
      f.PositiveInt("max_position_embeddings", family.default_max_position_embeddings));
  ASSIGN_OR_RETURN(c.rms_norm_eps, f.PositiveDouble("rms_norm_eps", 1e-6));
  ASSIGN_OR_RETURN(c.rope_theta, f.PositiveDouble("rope_theta", 10000.0));
  RETURN_IF_ERROR(ParseRope(f, "rope_scaling", &c.rope_scaling, &c.rope_theta));
  RETURN_IF_ERROR(ParseRope(f, "rope_parameters", &c.rope_scaling, &c.rope_theta));
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3 &&
      c.rope_scaling.high_freq_factor <= c.rope_scaling.low_freq_factor) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": rope_scaling.high_freq_factor ", c.rope_scaling.high_freq_factor,
                     " must be greater than low_freq_factor ", c.rope_scaling.low_freq_factor));
  }
  ASSIGN_OR_RETURN(c.tie_word_embeddings, f.Bool("tie_word_embeddings", false));
  switch (c.family) {
    case LlamaFamily::kLlama: {
      ASSIGN_OR_RETURN(const bool attention_bias, f.Bool("attention_bias", false));
      c.qkv_bias = c.o_bias = attention_bias;
      break;
    }
    case LlamaFamily::kMistral:  // MistralAttention has no biases (attention_bias is not read)
      break;
    case LlamaFamily::kQwen2:  // Qwen2Attention: q/k/v with bias, o_proj without
      c.qkv_bias = true;
      break;
  }
  RETURN_IF_ERROR(ParseSlidingWindow(f, &c));
  RETURN_IF_ERROR(ParseTokenIds(f, &c));
  // transformers v5 writes "dtype"; earlier versions "torch_dtype".
  ASSIGN_OR_RETURN(std::optional<std::string> dtype,
                   f.OptionalString(f.Has("torch_dtype") ? "torch_dtype" : "dtype"));
  c.torch_dtype = dtype.value_or("");
  if (absl::Status valid = ValidateLlamaConfig(c); !valid.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", valid.message()));
  }
  return c;
}

absl::StatusOr<LlamaConfig> ReadLlamaConfig(const std::string& model_folder) {
  const std::string path = (std::filesystem::path(model_folder) / "config.json").string();
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  }
  ASSIGN_OR_RETURN(const std::string text, ReadFile(path, int64_t{16} << 20));
  return ParseLlamaConfig(text, path);
}

absl::Status ValidateLlamaConfig(const LlamaConfig& c) {
  const std::string where = absl::StrCat(ModelTypeName(c.family), " config: ");
  RETURN_IF_ERROR(Check(c.hidden_size > 0 && c.intermediate_size > 0 && c.num_hidden_layers > 0 &&
                            c.num_attention_heads > 0 && c.num_key_value_heads > 0 &&
                            c.head_dim > 0 && c.vocab_size > 0 && c.max_position_embeddings > 0,
                        where + "every size must be at least 1"));
  RETURN_IF_ERROR(
      Check(c.num_attention_heads % c.num_key_value_heads == 0,
            absl::StrCat(where, "num_key_value_heads ", c.num_key_value_heads,
                         " does not divide num_attention_heads ", c.num_attention_heads)));
  RETURN_IF_ERROR(
      Check(c.head_dim % 2 == 0, absl::StrCat(where, "head_dim ", c.head_dim, " must be even")));
  RETURN_IF_ERROR(Check(std::isfinite(c.rms_norm_eps) && c.rms_norm_eps > 0,
                        absl::StrCat(where, "rms_norm_eps ", c.rms_norm_eps, " must be positive")));
  RETURN_IF_ERROR(Check(std::isfinite(c.rope_theta) && c.rope_theta > 0,
                        absl::StrCat(where, "rope_theta ", c.rope_theta, " must be positive")));
  const RopeScaling& r = c.rope_scaling;
  if (r.type != RopeScaling::Type::kNone) {
    RETURN_IF_ERROR(
        Check(std::isfinite(r.factor) && r.factor > 0,
              absl::StrCat(where, "rope_scaling.factor ", r.factor, " must be positive")));
  }
  if (r.type == RopeScaling::Type::kLlama3) {
    RETURN_IF_ERROR(Check(r.low_freq_factor > 0 && r.high_freq_factor > r.low_freq_factor &&
                              r.original_max_position_embeddings > 0,
                          absl::StrCat(where,
                                       "rope_scaling needs 0 < low_freq_factor < "
                                       "high_freq_factor and original_max_position_embeddings "
                                       ">= 1, got ",
                                       r.low_freq_factor, ", ", r.high_freq_factor, ", ",
                                       r.original_max_position_embeddings)));
  }
  RETURN_IF_ERROR(Check(c.sliding_window >= 0 && c.first_sliding_layer >= 0,
                        where + "sliding_window and its first layer must not be negative"));
  // What each family's config can express (LlamaConfigJson must write it).
  switch (c.family) {
    case LlamaFamily::kLlama:
      RETURN_IF_ERROR(Check(c.qkv_bias == c.o_bias,
                            where + "attention_bias sets the q/k/v and o_proj biases together"));
      RETURN_IF_ERROR(Check(c.sliding_window == 0, where + "llama has no sliding window"));
      break;
    case LlamaFamily::kMistral:
      RETURN_IF_ERROR(Check(!c.qkv_bias && !c.o_bias, where + "mistral has no attention biases"));
      RETURN_IF_ERROR(
          Check(c.first_sliding_layer == 0, where + "mistral's sliding window covers every layer"));
      break;
    case LlamaFamily::kQwen2:
      RETURN_IF_ERROR(
          Check(c.qkv_bias && !c.o_bias, where + "qwen2 has q/k/v biases and no o_proj bias"));
      break;
  }
  return absl::OkStatus();
}

std::string LlamaConfigJson(const LlamaConfig& c) {
  Json j = Json::object();
  if (!c.source_json.empty()) {
    Json source = Json::parse(c.source_json, nullptr, /*allow_exceptions=*/false);
    if (source.is_object()) j = std::move(source);
  }
  j["architectures"] = {ArchitectureName(c.family)};
  j["model_type"] = ModelTypeName(c.family);
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["vocab_size"] = c.vocab_size;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["tie_word_embeddings"] = c.tie_word_embeddings;

  Json rope = nullptr;
  if (c.rope_scaling.type != RopeScaling::Type::kNone) {
    rope = {{"rope_type", RopeTypeName(c.rope_scaling.type)}, {"factor", c.rope_scaling.factor}};
    if (c.rope_scaling.type == RopeScaling::Type::kLlama3) {
      rope["low_freq_factor"] = c.rope_scaling.low_freq_factor;
      rope["high_freq_factor"] = c.rope_scaling.high_freq_factor;
      rope["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings;
    }
  }
  if (j.contains("rope_parameters")) {  // v5 layout: keep it, and only it
    Json params = rope.is_null() ? Json{{"rope_type", "default"}} : rope;
    params["rope_theta"] = c.rope_theta;
    j["rope_parameters"] = std::move(params);
    j.erase("rope_scaling");
    j.erase("rope_theta");
  } else {
    j["rope_theta"] = c.rope_theta;
    j["rope_scaling"] = std::move(rope);
  }

  switch (c.family) {
    case LlamaFamily::kLlama:
      j["attention_bias"] = c.qkv_bias;
      j["mlp_bias"] = false;
      break;
    case LlamaFamily::kMistral:
      j["sliding_window"] = c.sliding_window > 0 ? Json(c.sliding_window) : Json(nullptr);
      if (j.contains("use_sliding_window")) j["use_sliding_window"] = c.sliding_window > 0;
      break;
    case LlamaFamily::kQwen2:
      j["use_sliding_window"] = c.sliding_window > 0;
      if (c.sliding_window > 0) j["sliding_window"] = c.sliding_window;
      j["max_window_layers"] = c.first_sliding_layer;
      if (j.contains("layer_types")) {
        Json types = Json::array();
        for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
          types.push_back(c.SlidingWindow(layer) > 0 ? "sliding_attention" : "full_attention");
        }
        j["layer_types"] = std::move(types);
      }
      break;
  }
  j["bos_token_id"] = c.bos_token_id.has_value() ? Json(*c.bos_token_id) : Json(nullptr);
  if (c.eos_token_ids.size() == 1) {
    j["eos_token_id"] = c.eos_token_ids[0];
  } else if (c.eos_token_ids.empty()) {
    j["eos_token_id"] = nullptr;
  } else {
    j["eos_token_id"] = c.eos_token_ids;
  }
  if (!c.torch_dtype.empty()) j[j.contains("dtype") ? "dtype" : "torch_dtype"] = c.torch_dtype;
  return j.dump(2) + "\n";
}

}  // namespace compress::engine
