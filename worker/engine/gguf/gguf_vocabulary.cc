#include "worker/engine/gguf/gguf_vocabulary.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status_macros.h"
#include "worker/engine/tokenizer/tokenizer.h"

namespace compress::engine {
namespace {

using Json = nlohmann::json;

// Llama-3's split pattern, as its tokenizer.json spells it.
constexpr char kLlama3Pattern[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// llama.cpp's name for the pre-tokenizer, or empty when it has none.
std::string PreTokenizerName(const Json& pre) {
  if (!pre.is_object()) return "";
  const std::string type = pre.value("type", "");
  if (type == "ByteLevel" && pre.value("use_regex", true)) return "gpt-2";
  if (type != "Sequence" || !pre.contains("pretokenizers")) return "";
  const Json& steps = pre["pretokenizers"];
  if (steps.size() != 2 || steps[0].value("type", "") != "Split" ||
      steps[1].value("type", "") != "ByteLevel" || steps[1].value("use_regex", true)) {
    return "";
  }
  const Json& pattern = steps[0]["pattern"];
  if (pattern.is_object() && pattern.value("Regex", "") == kLlama3Pattern) return "llama-bpe";
  return "";
}

}  // namespace

absl::StatusOr<GgufVocabulary> ReadGgufVocabulary(const std::string& tokenizer_json,
                                                  int64_t vocab_size) {
  ASSIGN_OR_RETURN(const std::string text, ReadFile(tokenizer_json, int64_t{256} << 20));
  Json json;
  try {
    json = Json::parse(text);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(tokenizer_json, ": not valid JSON: ", e.what()));
  }
  auto unsupported = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(
        tokenizer_json, ": GGUF export handles byte-level BPE tokenizers (GPT-2 and Llama-3 "
                        "style); this one has ",
        what));
  };
  if (!json.is_object() || !json.contains("model") || !json["model"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(tokenizer_json, ": no model object"));
  }
  const Json& model = json["model"];
  if (model.value("type", "") != "BPE") return unsupported("model type " + model.value("type", "?"));
  if (model.value("byte_fallback", false)) return unsupported("byte_fallback (SentencePiece style)");
  GgufVocabulary vocabulary;
  vocabulary.model = "gpt2";
  vocabulary.pre = PreTokenizerName(json.value("pre_tokenizer", Json()));
  if (vocabulary.pre.empty()) {
    return unsupported("a pre-tokenizer that is neither GPT-2's ByteLevel nor Llama-3's split");
  }
  if (vocab_size < 1 || vocab_size > (int64_t{1} << 24)) {
    return absl::InvalidArgumentError(absl::StrCat("vocab_size ", vocab_size, " is out of range"));
  }
  vocabulary.tokens.assign(vocab_size, "");
  vocabulary.token_types.assign(vocab_size, static_cast<int32_t>(GgufTokenType::kUnused));
  auto place = [&](int64_t id, const std::string& token, GgufTokenType type) -> absl::Status {
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(tokenizer_json, ": token '", token, "' has id ",
                                                     id, ", outside the model's vocab_size ",
                                                     vocab_size));
    }
    vocabulary.tokens[id] = token;
    vocabulary.token_types[id] = static_cast<int32_t>(type);
    return absl::OkStatus();
  };
  try {
    for (const auto& [token, id] : model.at("vocab").items()) {
      RETURN_IF_ERROR(place(id.get<int64_t>(), token, GgufTokenType::kNormal));
    }
    if (json.contains("added_tokens")) {
      for (const Json& added : json["added_tokens"]) {
        RETURN_IF_ERROR(place(added.at("id").get<int64_t>(), added.at("content").get<std::string>(),
                              added.value("special", false) ? GgufTokenType::kControl
                                                            : GgufTokenType::kUserDefined));
      }
    }
    for (const Json& merge : model.at("merges")) {
      vocabulary.merges.push_back(merge.is_string()
                                      ? merge.get<std::string>()
                                      : absl::StrCat(merge.at(0).get<std::string>(), " ",
                                                     merge.at(1).get<std::string>()));
    }
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(tokenizer_json, ": ", e.what()));
  }
  for (int64_t id = 0; id < vocab_size; ++id) {
    if (vocabulary.tokens[id].empty()) vocabulary.tokens[id] = absl::StrCat("[PAD", id, "]");
  }

  // BOS/EOS as the engine's tokenizer resolves them (tokenizer_config.json
  // first); add_bos_token from the config, else from the post-processor.
  ASSIGN_OR_RETURN(const Tokenizer tokenizer, Tokenizer::FromFile(tokenizer_json));
  vocabulary.bos_id = tokenizer.bos_id();
  vocabulary.eos_id = tokenizer.eos_id();
  const std::filesystem::path config_path =
      std::filesystem::path(tokenizer_json).parent_path() / "tokenizer_config.json";
  std::error_code ec;
  Json config;
  if (std::filesystem::is_regular_file(config_path, ec)) {
    ASSIGN_OR_RETURN(const std::string config_text, ReadFile(config_path.string()));
    config = Json::parse(config_text, nullptr, /*allow_exceptions=*/false);
  }
  if (config.is_object() && config.contains("add_bos_token") && config["add_bos_token"].is_boolean()) {
    vocabulary.add_bos = config["add_bos_token"].get<bool>();
  } else if (json.contains("post_processor") && json["post_processor"].is_object()) {
    const Json& single = json["post_processor"].value("single", Json::array());
    vocabulary.add_bos = single.is_array() && !single.empty() && single[0].contains("SpecialToken");
  }
  if (config.is_object() && config.contains("pad_token") && config["pad_token"].is_string()) {
    vocabulary.padding_id = tokenizer.TokenToId(config["pad_token"].get<std::string>());
  }
  return vocabulary;
}

}  // namespace compress::engine
