#include "worker/engine/gguf/gguf_vocabulary.h"

#include <filesystem>
#include <map>
#include <optional>
#include <utility>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/files.h"
#include "common/status_macros.h"
#include "worker/engine/tokenizer/tokenizer.h"

namespace compress::engine {
namespace {

using Json = nlohmann::json;

// The split patterns llama.cpp has a pre-tokenizer for, as tokenizer.json
// spells them, and its name for each. Qwen2's differs from Llama-3's only
// in taking digits one at a time.
constexpr std::pair<const char*, const char*> kSplitPatterns[] = {
    {R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
     "llama-bpe"},
    {R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
     "qwen2"},
};

// llama.cpp's name for the pre-tokenizer, or empty when it has none.
std::string PreTokenizerName(const Json& pre) {
  if (!pre.is_object()) return "";
  const std::string type = pre.value("type", "");
  if (type == "ByteLevel" && pre.value("use_regex", true)) return "gpt-2";
  if (type != "Sequence" || !pre.contains("pretokenizers")) return "";
  const Json& steps = pre["pretokenizers"];
  if (!steps.is_array() || steps.size() != 2 || !steps[0].is_object() || !steps[1].is_object() ||
      steps[0].value("type", "") != "Split" ||
      steps[1].value("type", "") != "ByteLevel" || steps[1].value("use_regex", true)) {
    return "";
  }
  const Json& pattern = steps[0]["pattern"];
  if (!pattern.is_object()) return "";
  for (const auto& [regex, name] : kSplitPatterns) {
    if (pattern.value("Regex", "") == regex) return name;
  }
  return "";
}

// convert_hf_to_gguf.py's does_token_look_special: added tokens that are
// control tokens even where tokenizer.json does not mark them special
// (Qwen2.5's "<|box_start|>" and the like).
bool LooksSpecial(absl::string_view token) {
  auto between = [&](absl::string_view open, absl::string_view close) {
    return absl::StartsWith(token, open) && absl::EndsWith(token, close);
  };
  // "<｜" and "｜>" (U+FF5C, DeepSeek's) in UTF-8.
  return token == "<pad>" || token == "<mask>" || token == "<2mass>" || token == "[@BOS@]" ||
         between("<|", "|>") || between("<\xEF\xBD\x9C", "\xEF\xBD\x9C>") ||
         between("<unused", ">");
}

// Whether a SentencePiece-style normalizer prepends "▁" (it must otherwise
// only turn spaces into "▁", as llama.cpp's "llama" tokenizer does itself);
// nullopt for any other normalizer.
std::optional<bool> PrependsSpace(const Json& normalizer) {
  if (normalizer.is_null()) return false;
  std::vector<Json> steps;
  if (normalizer.value("type", "") == "Sequence") {
    for (const Json& step : normalizer.value("normalizers", Json::array())) steps.push_back(step);
  } else {
    steps.push_back(normalizer);
  }
  bool prepends = false, replaces = false;
  for (const Json& step : steps) {
    const std::string type = step.value("type", "");
    if (type == "Prepend" && step.value("prepend", "") == "\u2581") {
      prepends = true;
    } else if (type == "Replace" && step.contains("pattern") &&
               step["pattern"].value("String", "") == " " && step.value("content", "") == "\u2581") {
      replaces = true;
    } else {
      return std::nullopt;
    }
  }
  if (!replaces) return std::nullopt;
  return prepends;
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
        tokenizer_json, ": GGUF export handles byte-level BPE tokenizers (GPT-2, Llama-3 and "
                        "Qwen2 style); this one has ",
        what));
  };
  if (!json.is_object() || !json.contains("model") || !json["model"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(tokenizer_json, ": no model object"));
  }
  const Json& model = json["model"];
  if (model.value("type", "") != "BPE") return unsupported("model type " + model.value("type", "?"));
  GgufVocabulary vocabulary;
  const bool sentencepiece = model.value("byte_fallback", false);
  if (sentencepiece) {
    vocabulary.model = "llama";
    vocabulary.pre = "default";
    const Json pre = json.value("pre_tokenizer", Json());
    if (pre.is_null()) {
      const std::optional<bool> prepends = PrependsSpace(json.value("normalizer", Json()));
      if (!prepends) return unsupported("SentencePiece-style BPE with another normalizer");
      vocabulary.add_space_prefix = *prepends;
    } else if (pre.value("type", "") == "Metaspace" && pre.value("replacement", "") == "\u2581" &&
               json.value("normalizer", Json()).is_null()) {
      // The newer form of the same tokenizer: "▁" for spaces, one in front.
      const std::string scheme = pre.value("prepend_scheme", "");
      vocabulary.add_space_prefix =
          scheme == "first" || scheme == "always" || (scheme.empty() && pre.value("add_prefix_space", false));
    } else {
      return unsupported("SentencePiece-style BPE with a pre-tokenizer other than Metaspace");
    }
  } else {
    vocabulary.model = "gpt2";
    vocabulary.pre = PreTokenizerName(json.value("pre_tokenizer", Json()));
    if (vocabulary.pre.empty()) {
      return unsupported(
          "a pre-tokenizer that is neither GPT-2's ByteLevel nor Llama-3's or Qwen2's split");
    }
    // llama.cpp normalizes nothing. NFC (Qwen2's) changes only text that is
    // not in NFC already, and convert_hf_to_gguf.py exports it the same way;
    // any other normalizer would change what llama.cpp tokenizes.
    const Json normalizer = json.value("normalizer", Json());
    const bool nfc = normalizer.is_object() && normalizer.value("type", "") == "NFC";
    if (!normalizer.is_null() && !nfc) {
      return unsupported("a normalizer other than NFC");
    }
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
        const std::string content = added.at("content").get<std::string>();
        RETURN_IF_ERROR(place(added.at("id").get<int64_t>(), content,
                              added.value("special", false) || LooksSpecial(content)
                                  ? GgufTokenType::kControl
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
  if (sentencepiece) {
    // Byte tokens, the unknown token, and scores that replay the merge order.
    std::map<std::string, int64_t> id_of;
    for (int64_t id = 0; id < vocab_size; ++id) {
      const std::string& token = vocabulary.tokens[id];
      id_of.emplace(token, id);
      if (token.size() == 6 && absl::StartsWith(token, "<0x") && token[5] == '>') {
        vocabulary.token_types[id] = static_cast<int32_t>(GgufTokenType::kByte);
      }
    }
    if (model.contains("unk_token") && model["unk_token"].is_string()) {
      auto unk = id_of.find(model["unk_token"].get<std::string>());
      if (unk != id_of.end()) {
        vocabulary.unknown_id = static_cast<int32_t>(unk->second);
        vocabulary.token_types[unk->second] = static_cast<int32_t>(GgufTokenType::kUnknown);
      }
    }
    vocabulary.scores.assign(vocab_size, 0.0f);
    std::vector<bool> scored(vocab_size, false);
    for (size_t rank = 0; rank < vocabulary.merges.size(); ++rank) {
      const std::string& merge = vocabulary.merges[rank];
      const size_t space = merge.find(' ');
      auto made = id_of.find(merge.substr(0, space) + merge.substr(space + 1));
      if (made == id_of.end() || scored[made->second]) continue;
      scored[made->second] = true;
      vocabulary.scores[made->second] = -static_cast<float>(rank + 1);
    }
    vocabulary.merges.clear();  // the "llama" model merges by score
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
  if (config.is_object() && config.contains("chat_template") &&
      config["chat_template"].is_string()) {
    vocabulary.chat_template = config["chat_template"].get<std::string>();
  }
  return vocabulary;
}

}  // namespace compress::engine
