#include "worker/engine/tokenizer/tokenizer.h"

#include <re2/re2.h>

#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/strip.h"
#include "common/files.h"
#include "common/status_macros.h"
#include "worker/engine/tokenizer/added_tokens.h"
#include "worker/engine/tokenizer/bpe_model.h"
#include "worker/engine/tokenizer/split_regex.h"
#include "worker/engine/tokenizer/unicode.h"

namespace compress::engine {
namespace {

using json = nlohmann::json;

// Words up to this size are cached (longer ones are rare and would crowd the
// cache); the cache is emptied when it reaches kMaxCacheEntries.
constexpr size_t kMaxCachedWordBytes = 256;
constexpr size_t kMaxCacheEntries = size_t{1} << 17;

constexpr char kMetaspaceChar[] = "\xE2\x96\x81";  // U+2581 '▁'

enum class PrependScheme { kAlways, kFirst, kNever };

struct MetaspaceConfig {
  std::string replacement = kMetaspaceChar;
  PrependScheme prepend_scheme = PrependScheme::kAlways;
  bool split = true;
};

struct NormalizerStep {
  enum class Kind { kNfc, kPrepend, kReplace } kind;
  std::string text;     // Prepend: what is prepended; Replace: what is replaced
  std::string content;  // Replace: the replacement
};

struct DecoderStep {
  enum class Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
  std::string pattern;  // Replace: what is replaced; Metaspace: the replacement character
  std::string content;  // Replace: the replacement; Strip: the stripped text
  int start = 0;        // Strip: at most this many copies of `content` off the front,
  int stop = 0;         // and this many off the back
  bool strip_first_space = false;  // Metaspace: prepend_scheme is not "never"
};

}  // namespace

struct Tokenizer::Impl {
  BpeModel model;
  AddedTokenMatcher added;
  std::unordered_map<int32_t, size_t> added_by_id;  // index into added.tokens()
  std::unordered_map<std::string, int32_t> added_by_content;
  std::vector<NormalizerStep> normalizers;
  std::vector<SplitRegex> splits;
  bool byte_level_prefix_space = false;
  std::optional<MetaspaceConfig> metaspace;
  // SentencePiece-style text is one long word when nothing splits it; it is
  // cut before each '▁' that follows another character when that provably
  // changes no id (see SafeSplitMarker), so that words can be cached.
  std::string safe_split_marker;
  std::optional<std::vector<DecoderStep>> decoder;  // none: tokens joined by " "
  std::optional<int32_t> bos_id;
  std::optional<int32_t> eos_id;
  int32_t vocab_size = 0;

  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  std::optional<int32_t> TokenToId(std::string_view token) const {
    const auto it = added_by_content.find(std::string(token));
    if (it != added_by_content.end()) return it->second;
    return model.TokenToId(token);
  }
  std::string Transform(std::string_view text, bool at_start) const;
  void EncodeSegment(std::string_view text, bool at_start, std::vector<int32_t>* ids) const;
  void EncodeWord(std::string_view word, std::vector<int32_t>* ids) const;
  void ApplyDecoder(const DecoderStep& step, std::vector<std::string>* tokens) const;
};

namespace {

// ---- Reading tokenizer.json --------------------------------------------

// Errors name the source and the field ("tokenizer.json: pre_tokenizer.type: ...").
class Reader {
 public:
  explicit Reader(absl::string_view source) : source_(source) {}

  absl::Status Error(absl::string_view field, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", field, ": ", what));
  }
  absl::Status UnsupportedType(absl::string_view field, absl::string_view type,
                               absl::string_view supported) const {
    return Error(field,
                 absl::StrCat("type '", type, "' is not supported (supported: ", supported, ")"));
  }

  // A member that is absent or null gives nullptr.
  static const json* Find(const json& object, const char* key) {
    if (!object.is_object()) return nullptr;
    const auto it = object.find(key);
    return it == object.end() || it->is_null() ? nullptr : &*it;
  }
  absl::StatusOr<std::string> String(const json& object, const char* key,
                                     absl::string_view field) const {
    const json* value = Find(object, key);
    if (value == nullptr) return Error(field, absl::StrCat("missing '", key, "'"));
    if (!value->is_string()) return Error(absl::StrCat(field, ".", key), "not a string");
    return value->get<std::string>();
  }
  absl::StatusOr<bool> Bool(const json& object, const char* key, bool default_value,
                            absl::string_view field) const {
    const json* value = Find(object, key);
    if (value == nullptr) return default_value;
    if (!value->is_boolean()) return Error(absl::StrCat(field, ".", key), "not a boolean");
    return value->get<bool>();
  }
  absl::StatusOr<std::string> Type(const json& object, absl::string_view field) const {
    if (!object.is_object()) return Error(field, "not an object");
    return String(object, "type", field);
  }
  // {"String": s} or {"Regex": r}, as Split and Replace spell a pattern.
  absl::StatusOr<std::pair<bool, std::string>> Pattern(const json& object,
                                                       absl::string_view field) const {
    const json* pattern = Find(object, "pattern");
    const std::string pattern_field = absl::StrCat(field, ".pattern");
    if (pattern == nullptr || !pattern->is_object()) return Error(pattern_field, "missing");
    if (const json* s = Find(*pattern, "String"); s != nullptr && s->is_string()) {
      return std::make_pair(false, s->get<std::string>());
    }
    if (const json* r = Find(*pattern, "Regex"); r != nullptr && r->is_string()) {
      return std::make_pair(true, r->get<std::string>());
    }
    return Error(pattern_field, "neither {\"String\": ...} nor {\"Regex\": ...}");
  }

 private:
  std::string source_;
};

// A token id in 0..kMaxTokenId, checked before it is narrowed to 32 bits
// (4294967296 would become 0); nullopt for anything else. nlohmann reads
// every integer written without a '-' as unsigned.
std::optional<int32_t> ReadTokenId(const json& value) {
  if (!value.is_number_unsigned() || value.get<uint64_t>() > uint64_t{kMaxTokenId}) {
    return std::nullopt;
  }
  return static_cast<int32_t>(value.get<uint64_t>());
}

absl::StatusOr<BpeModelSpec> ReadModel(const Reader& reader, const json& root) {
  const json* model = Reader::Find(root, "model");
  if (model == nullptr || !model->is_object()) return reader.Error("model", "missing");
  // Old files have no "type"; their BPE models have "merges".
  std::string type = "BPE";
  if (Reader::Find(*model, "type") != nullptr || Reader::Find(*model, "merges") == nullptr) {
    ASSIGN_OR_RETURN(type, reader.Type(*model, "model"));
  }
  if (type != "BPE") return reader.UnsupportedType("model", type, "BPE");

  BpeModelSpec spec;
  if (const json* dropout = Reader::Find(*model, "dropout");
      dropout != nullptr && !(dropout->is_number() && dropout->get<double>() == 0.0)) {
    return reader.Error("model.dropout",
                        absl::StrCat(dropout->dump(), " is not supported (only null or 0)"));
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (const json* value = Reader::Find(*model, key);
        value != nullptr && !(value->is_string() && value->get<std::string>().empty())) {
      return reader.Error(absl::StrCat("model.", key),
                          absl::StrCat(value->dump(), " is not supported"));
    }
  }
  if (const json* unk = Reader::Find(*model, "unk_token"); unk != nullptr) {
    if (!unk->is_string()) return reader.Error("model.unk_token", "not a string");
    spec.unk_token = unk->get<std::string>();
  }
  ASSIGN_OR_RETURN(spec.fuse_unk, reader.Bool(*model, "fuse_unk", false, "model"));
  ASSIGN_OR_RETURN(spec.byte_fallback, reader.Bool(*model, "byte_fallback", false, "model"));
  ASSIGN_OR_RETURN(spec.ignore_merges, reader.Bool(*model, "ignore_merges", false, "model"));

  const json* vocab = Reader::Find(*model, "vocab");
  if (vocab == nullptr || !vocab->is_object())
    return reader.Error("model.vocab", "missing or not an object");
  spec.vocab.reserve(vocab->size());
  for (const auto& [token, id] : vocab->items()) {
    if (!id.is_number_integer()) {
      return reader.Error("model.vocab", absl::StrCat("the id of '", token, "' is not an integer"));
    }
    const std::optional<int32_t> checked = ReadTokenId(id);
    if (!checked) {
      return reader.Error("model.vocab", absl::StrCat("the id ", id.dump(), " of '", token,
                                                      "' is outside 0..", kMaxTokenId));
    }
    spec.vocab.emplace_back(token, *checked);
  }

  const json* merges = Reader::Find(*model, "merges");
  static const json* const kNoMerges = new json(json::array());
  if (merges == nullptr) merges = kNoMerges;
  if (!merges->is_array()) return reader.Error("model.merges", "not an array");
  spec.merges.reserve(merges->size());
  for (size_t i = 0; i < merges->size(); ++i) {
    const json& merge = (*merges)[i];
    // "a b" (tokenizers < 0.20) or ["a", "b"] (later, where tokens may hold spaces).
    if (merge.is_string()) {
      const std::string text = merge.get<std::string>();
      const size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos) {
        return reader.Error(absl::StrCat("model.merges[", i, "]"),
                            absl::StrCat("'", text, "' is not two tokens separated by one space"));
      }
      spec.merges.emplace_back(text.substr(0, space), text.substr(space + 1));
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      spec.merges.emplace_back(merge[0].get<std::string>(), merge[1].get<std::string>());
    } else {
      return reader.Error(absl::StrCat("model.merges[", i, "]"),
                          "neither \"a b\" nor [\"a\", \"b\"]");
    }
  }
  return spec;
}

absl::StatusOr<std::vector<AddedToken>> ReadAddedTokens(const Reader& reader, const json& root) {
  std::vector<AddedToken> tokens;
  const json* added = Reader::Find(root, "added_tokens");
  if (added == nullptr) return tokens;
  if (!added->is_array()) return reader.Error("added_tokens", "not an array");
  for (size_t i = 0; i < added->size(); ++i) {
    const json& entry = (*added)[i];
    const std::string field = absl::StrCat("added_tokens[", i, "]");
    AddedToken token;
    const json* id = Reader::Find(entry, "id");
    const std::optional<int32_t> checked = id == nullptr ? std::nullopt : ReadTokenId(*id);
    if (!checked) {
      return reader.Error(
          field, id == nullptr
                     ? std::string("missing 'id'")
                     : absl::StrCat("'id' ", id->dump(), " is not an integer in 0..", kMaxTokenId));
    }
    token.id = *checked;
    ASSIGN_OR_RETURN(token.content, reader.String(entry, "content", field));
    if (token.content.empty()) return reader.Error(field, "empty 'content'");
    ASSIGN_OR_RETURN(token.special, reader.Bool(entry, "special", false, field));
    ASSIGN_OR_RETURN(token.lstrip, reader.Bool(entry, "lstrip", false, field));
    ASSIGN_OR_RETURN(token.rstrip, reader.Bool(entry, "rstrip", false, field));
    ASSIGN_OR_RETURN(const bool single_word, reader.Bool(entry, "single_word", false, field));
    if (single_word) {
      return reader.Error(absl::StrCat(field, ".single_word"),
                          absl::StrCat("true (token '", token.content, "') is not supported"));
    }
    tokens.push_back(std::move(token));
  }
  return tokens;
}

absl::Status ReadNormalizer(const Reader& reader, const json& normalizer, const std::string& field,
                            std::vector<NormalizerStep>* steps) {
  ASSIGN_OR_RETURN(const std::string type, reader.Type(normalizer, field));
  if (type == "Sequence") {
    const json* list = Reader::Find(normalizer, "normalizers");
    if (list == nullptr || !list->is_array()) return reader.Error(field, "missing 'normalizers'");
    for (size_t i = 0; i < list->size(); ++i) {
      RETURN_IF_ERROR(
          ReadNormalizer(reader, (*list)[i], absl::StrCat(field, ".normalizers[", i, "]"), steps));
    }
    return absl::OkStatus();
  }
  if (type == "NFC") {
    if (absl::Status available = CheckNfcAvailable(); !available.ok()) {
      return absl::Status(available.code(), absl::StrCat(field, ": ", available.message()));
    }
    steps->push_back({NormalizerStep::Kind::kNfc, "", ""});
    return absl::OkStatus();
  }
  if (type == "Prepend") {
    ASSIGN_OR_RETURN(std::string prepend, reader.String(normalizer, "prepend", field));
    steps->push_back({NormalizerStep::Kind::kPrepend, std::move(prepend), ""});
    return absl::OkStatus();
  }
  if (type == "Replace") {
    ASSIGN_OR_RETURN(const auto pattern, reader.Pattern(normalizer, field));
    if (pattern.first) {
      return reader.Error(
          absl::StrCat(field, ".pattern"),
          absl::StrCat("a Regex pattern ('", pattern.second, "') is not supported in Replace"));
    }
    if (pattern.second.empty()) return reader.Error(absl::StrCat(field, ".pattern"), "empty");
    ASSIGN_OR_RETURN(std::string content, reader.String(normalizer, "content", field));
    steps->push_back({NormalizerStep::Kind::kReplace, pattern.second, std::move(content)});
    return absl::OkStatus();
  }
  return reader.UnsupportedType(field, type, "NFC, Prepend, Replace, Sequence");
}

absl::StatusOr<MetaspaceConfig> ReadMetaspace(const Reader& reader, const json& object,
                                              const std::string& field) {
  MetaspaceConfig config;
  if (Reader::Find(object, "replacement") != nullptr) {
    ASSIGN_OR_RETURN(config.replacement, reader.String(object, "replacement", field));
  }
  if (config.replacement.empty() ||
      DecodeUtf8(config.replacement, 0).length != static_cast<int>(config.replacement.size())) {
    return reader.Error(absl::StrCat(field, ".replacement"), "not one character");
  }
  // tokenizers >= 0.19 writes prepend_scheme; older files add_prefix_space
  // (and always split).
  if (Reader::Find(object, "prepend_scheme") != nullptr) {
    ASSIGN_OR_RETURN(const std::string scheme, reader.String(object, "prepend_scheme", field));
    if (scheme == "always") {
      config.prepend_scheme = PrependScheme::kAlways;
    } else if (scheme == "first") {
      config.prepend_scheme = PrependScheme::kFirst;
    } else if (scheme == "never") {
      config.prepend_scheme = PrependScheme::kNever;
    } else {
      return reader.Error(absl::StrCat(field, ".prepend_scheme"),
                          absl::StrCat("unknown value '", scheme, "'"));
    }
  } else {
    ASSIGN_OR_RETURN(const bool add_prefix_space,
                     reader.Bool(object, "add_prefix_space", true, field));
    config.prepend_scheme = add_prefix_space ? PrependScheme::kAlways : PrependScheme::kNever;
  }
  ASSIGN_OR_RETURN(config.split, reader.Bool(object, "split", true, field));
  return config;
}

// The pre-tokenizer as a flat list: Splits, then optionally ByteLevel; or a
// lone Metaspace. `byte_level` tells the model to work on bytes.
absl::Status ReadPreTokenizer(const Reader& reader, const json& root, Tokenizer::Impl* impl,
                              bool* byte_level) {
  const json* pre_tokenizer = Reader::Find(root, "pre_tokenizer");
  if (pre_tokenizer == nullptr) return absl::OkStatus();
  std::vector<std::pair<std::string, const json*>> steps;  // (field, object)
  ASSIGN_OR_RETURN(const std::string type, reader.Type(*pre_tokenizer, "pre_tokenizer"));
  if (type == "Sequence") {
    const json* list = Reader::Find(*pre_tokenizer, "pretokenizers");
    if (list == nullptr || !list->is_array())
      return reader.Error("pre_tokenizer", "missing 'pretokenizers'");
    for (size_t i = 0; i < list->size(); ++i) {
      steps.emplace_back(absl::StrCat("pre_tokenizer.pretokenizers[", i, "]"), &(*list)[i]);
    }
  } else {
    steps.emplace_back("pre_tokenizer", pre_tokenizer);
  }
  for (size_t i = 0; i < steps.size(); ++i) {
    const auto& [field, step] = steps[i];
    ASSIGN_OR_RETURN(const std::string step_type, reader.Type(*step, field));
    if (*byte_level || impl->metaspace) {
      return reader.Error(
          field, absl::StrCat("'", step_type, "' after ByteLevel or Metaspace is not supported"));
    }
    if (step_type == "Split") {
      ASSIGN_OR_RETURN(const auto pattern, reader.Pattern(*step, field));
      ASSIGN_OR_RETURN(const std::string behavior, reader.String(*step, "behavior", field));
      if (behavior != "Isolated") {
        return reader.Error(absl::StrCat(field, ".behavior"),
                            absl::StrCat("'", behavior, "' is not supported (only Isolated)"));
      }
      ASSIGN_OR_RETURN(const bool invert, reader.Bool(*step, "invert", false, field));
      if (invert) return reader.Error(absl::StrCat(field, ".invert"), "true is not supported");
      absl::StatusOr<SplitRegex> regex =
          SplitRegex::Compile(pattern.first ? pattern.second : re2::RE2::QuoteMeta(pattern.second));
      if (!regex.ok())
        return reader.Error(absl::StrCat(field, ".pattern"), regex.status().message());
      impl->splits.push_back(*std::move(regex));
    } else if (step_type == "ByteLevel") {
      *byte_level = true;
      ASSIGN_OR_RETURN(impl->byte_level_prefix_space,
                       reader.Bool(*step, "add_prefix_space", true, field));
      if (impl->byte_level_prefix_space && steps.size() > 1) {
        return reader.Error(absl::StrCat(field, ".add_prefix_space"),
                            "true is supported only when ByteLevel is the only pre-tokenizer");
      }
      ASSIGN_OR_RETURN(const bool use_regex, reader.Bool(*step, "use_regex", true, field));
      if (use_regex) {
        absl::StatusOr<SplitRegex> regex = SplitRegex::Compile(kGpt2SplitPattern);
        if (!regex.ok()) return regex.status();
        impl->splits.push_back(*std::move(regex));
      }
    } else if (step_type == "Metaspace") {
      if (steps.size() > 1)
        return reader.Error(field, "Metaspace is supported only as the only pre-tokenizer");
      ASSIGN_OR_RETURN(MetaspaceConfig config, ReadMetaspace(reader, *step, field));
      impl->metaspace = std::move(config);
    } else {
      return reader.UnsupportedType(field, step_type, "ByteLevel, Split, Metaspace, Sequence");
    }
  }
  return absl::OkStatus();
}

absl::Status ReadDecoder(const Reader& reader, const json& decoder, const std::string& field,
                         std::vector<DecoderStep>* steps) {
  ASSIGN_OR_RETURN(const std::string type, reader.Type(decoder, field));
  DecoderStep step;
  if (type == "Sequence") {
    const json* list = Reader::Find(decoder, "decoders");
    if (list == nullptr || !list->is_array()) return reader.Error(field, "missing 'decoders'");
    for (size_t i = 0; i < list->size(); ++i) {
      RETURN_IF_ERROR(
          ReadDecoder(reader, (*list)[i], absl::StrCat(field, ".decoders[", i, "]"), steps));
    }
    return absl::OkStatus();
  } else if (type == "ByteLevel") {
    step.kind = DecoderStep::Kind::kByteLevel;
  } else if (type == "ByteFallback") {
    step.kind = DecoderStep::Kind::kByteFallback;
  } else if (type == "Fuse") {
    step.kind = DecoderStep::Kind::kFuse;
  } else if (type == "Replace") {
    step.kind = DecoderStep::Kind::kReplace;
    ASSIGN_OR_RETURN(const auto pattern, reader.Pattern(decoder, field));
    if (pattern.first || pattern.second.empty()) {
      return reader.Error(absl::StrCat(field, ".pattern"),
                          "only a non-empty String pattern is supported");
    }
    step.pattern = pattern.second;
    ASSIGN_OR_RETURN(step.content, reader.String(decoder, "content", field));
  } else if (type == "Strip") {
    step.kind = DecoderStep::Kind::kStrip;
    ASSIGN_OR_RETURN(step.content, reader.String(decoder, "content", field));
    const json* start = Reader::Find(decoder, "start");
    const json* stop = Reader::Find(decoder, "stop");
    if ((start != nullptr && !start->is_number_unsigned()) ||
        (stop != nullptr && !stop->is_number_unsigned())) {
      return reader.Error(field, "'start' and 'stop' must be counts");
    }
    step.start = start == nullptr ? 0 : start->get<int>();
    step.stop = stop == nullptr ? 0 : stop->get<int>();
  } else if (type == "Metaspace") {
    step.kind = DecoderStep::Kind::kMetaspace;
    ASSIGN_OR_RETURN(const MetaspaceConfig config, ReadMetaspace(reader, decoder, field));
    step.pattern = config.replacement;
    step.strip_first_space = config.prepend_scheme != PrependScheme::kNever;
  } else {
    return reader.UnsupportedType(
        field, type, "ByteLevel, ByteFallback, Fuse, Replace, Strip, Metaspace, Sequence");
  }
  steps->push_back(std::move(step));
  return absl::OkStatus();
}

// The BOS (and EOS) a post-processor adds: TemplateProcessing's special
// tokens before (after) the sequence, Roberta/BertProcessing's cls (sep).
void ReadPostProcessorSpecials(const json& processor, std::optional<std::string>* bos,
                               std::optional<std::string>* eos) {
  const json* type = Reader::Find(processor, "type");
  if (type == nullptr || !type->is_string()) return;
  const std::string name = type->get<std::string>();
  if (name == "Sequence") {
    if (const json* list = Reader::Find(processor, "processors");
        list != nullptr && list->is_array()) {
      for (const json& item : *list) ReadPostProcessorSpecials(item, bos, eos);
    }
  } else if (name == "TemplateProcessing") {
    const json* single = Reader::Find(processor, "single");
    if (single == nullptr || !single->is_array() || single->empty()) return;
    const auto special = [](const json& piece) -> std::optional<std::string> {
      const json* s = Reader::Find(piece, "SpecialToken");
      const json* id = s == nullptr ? nullptr : Reader::Find(*s, "id");
      if (id == nullptr || !id->is_string()) return std::nullopt;
      return id->get<std::string>();
    };
    if (auto first = special(single->front())) *bos = first;
    if (single->size() > 1) {
      if (auto last = special(single->back())) *eos = last;
    }
  } else if (name == "RobertaProcessing" || name == "BertProcessing") {
    const json* cls = Reader::Find(processor, "cls");
    const json* sep = Reader::Find(processor, "sep");
    if (cls != nullptr && cls->is_array() && !cls->empty() && (*cls)[0].is_string())
      *bos = (*cls)[0].get<std::string>();
    if (sep != nullptr && sep->is_array() && !sep->empty() && (*sep)[0].is_string())
      *eos = (*sep)[0].get<std::string>();
  }
}

// See Impl::safe_split_marker. Cutting a word before a marker that follows
// another character changes no id when no vocabulary token holds the
// marker after another character: every symbol BPE builds is a vocabulary
// token, so none can span such a cut, and merges on either side of it never
// interact. The marker itself must be in the vocabulary, so that the piece
// after a cut never starts with an unknown token (fuse_unk would join it).
std::string SafeSplitMarker(const Tokenizer::Impl& impl) {
  if (impl.model.byte_level()) return "";
  std::string marker;
  if (impl.metaspace) {
    if (impl.metaspace->split) return "";  // Metaspace already cuts there
    marker = impl.metaspace->replacement;
  } else {
    for (const NormalizerStep& step : impl.normalizers) {
      if (step.kind == NormalizerStep::Kind::kReplace && step.text == " ") marker = step.content;
    }
  }
  if (marker.empty() || !impl.model.TokenToId(marker)) return "";
  for (int32_t id = 0; id < impl.model.id_limit(); ++id) {
    const std::string_view token = impl.model.IdToToken(id);
    for (size_t pos = token.find(marker, 1); pos != std::string_view::npos;
         pos = token.find(marker, pos + 1)) {
      if (pos < marker.size() || token.substr(pos - marker.size(), marker.size()) != marker)
        return "";
    }
  }
  return marker;
}

// Cuts each piece before every `marker` not at its start; with
// `only_after_other`, only where the marker follows a different character.
void CutBefore(std::string_view marker, bool only_after_other,
               std::vector<std::string_view>* pieces) {
  std::vector<std::string_view> out;
  out.reserve(pieces->size());
  for (std::string_view piece : *pieces) {
    size_t start = 0;
    for (size_t pos = piece.find(marker, 1); pos != std::string_view::npos;
         pos = piece.find(marker, pos + marker.size())) {
      if (only_after_other && pos >= marker.size() &&
          piece.substr(pos - marker.size(), marker.size()) == marker) {
        continue;
      }
      out.push_back(piece.substr(start, pos - start));
      start = pos;
    }
    out.push_back(piece.substr(start));
  }
  pieces->swap(out);
}

bool ParseByteToken(std::string_view token, uint8_t* byte) {
  if (token.size() != 6 || token.substr(0, 3) != "<0x" || token[5] != '>') return false;
  int value = 0;
  for (char c : token.substr(3, 2)) {
    value <<= 4;
    if (c >= '0' && c <= '9') {
      value |= c - '0';
    } else if (c >= 'A' && c <= 'F') {
      value |= c - 'A' + 10;
    } else if (c >= 'a' && c <= 'f') {
      value |= c - 'a' + 10;
    } else {
      return false;
    }
  }
  *byte = static_cast<uint8_t>(value);
  return true;
}

// A token's bytes under GPT-2's mapping; a token with a character outside
// the mapping (an added token such as "<think> ") is taken as it is, as HF does.
std::string ByteLevelBytes(std::string_view token) {
  const ByteLevelAlphabet& alphabet = ByteLevelAlphabet::Get();
  std::string bytes;
  bytes.reserve(token.size());
  for (size_t pos = 0; pos < token.size();) {
    const Utf8Char c = DecodeUtf8(token, pos);
    const int byte = c.valid ? alphabet.Byte(c.code_point) : -1;
    if (byte < 0) return std::string(token);
    bytes.push_back(static_cast<char>(byte));
    pos += c.length;
  }
  return bytes;
}

absl::StatusOr<std::optional<std::string>> ReadConfigToken(const json& config, const char* key,
                                                           const std::string& path, bool* present) {
  const auto it = config.find(key);
  *present = it != config.end();
  if (!*present || it->is_null()) return std::optional<std::string>();
  if (it->is_string()) return std::optional<std::string>(it->get<std::string>());
  if (it->is_object()) {
    const json* content = Reader::Find(*it, "content");
    if (content != nullptr && content->is_string())
      return std::optional<std::string>(content->get<std::string>());
  }
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": ", key, ": neither a string, {\"content\": ...} nor null"));
}

}  // namespace

// ---- Encoding ------------------------------------------------------------

std::string Tokenizer::Impl::Transform(std::string_view text, bool at_start) const {
  std::string s(text);
  for (const NormalizerStep& step : normalizers) {
    switch (step.kind) {
      case NormalizerStep::Kind::kNfc:
        s = NormalizeNfc(s);
        break;
      case NormalizerStep::Kind::kPrepend:
        if (!s.empty()) s.insert(0, step.text);
        break;
      case NormalizerStep::Kind::kReplace:
        s = absl::StrReplaceAll(s, {{step.text, step.content}});
        break;
    }
  }
  if (metaspace) {
    s = absl::StrReplaceAll(s, {{" ", metaspace->replacement}});
    const bool prepend = metaspace->prepend_scheme == PrependScheme::kAlways ||
                         (metaspace->prepend_scheme == PrependScheme::kFirst && at_start);
    if (prepend && !absl::StartsWith(s, metaspace->replacement))
      s.insert(0, metaspace->replacement);
  }
  if (byte_level_prefix_space && !absl::StartsWith(s, " ")) s.insert(0, " ");
  return s;
}

void Tokenizer::Impl::EncodeSegment(std::string_view text, bool at_start,
                                    std::vector<int32_t>* ids) const {
  std::string transformed;
  if (!normalizers.empty() || metaspace || byte_level_prefix_space) {
    transformed = Transform(text, at_start);
    text = transformed;
  }
  std::vector<std::string_view> pieces = {text};
  std::vector<std::string_view> next;
  for (const SplitRegex& split : splits) {
    next.clear();
    for (std::string_view piece : pieces) split.Split(piece, &next);
    pieces.swap(next);
  }
  if (metaspace && metaspace->split)
    CutBefore(metaspace->replacement, /*only_after_other=*/false, &pieces);
  if (!safe_split_marker.empty()) CutBefore(safe_split_marker, /*only_after_other=*/true, &pieces);
  for (std::string_view piece : pieces) EncodeWord(piece, ids);
}

void Tokenizer::Impl::EncodeWord(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.size() > kMaxCachedWordBytes) {
    model.EncodeWord(word, ids);
    return;
  }
  std::string key(word);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = ids->size();
  model.EncodeWord(word, ids);
  std::vector<int32_t> word_ids(ids->begin() + first, ids->end());
  std::lock_guard<std::mutex> lock(cache_mutex);
  if (cache.size() >= kMaxCacheEntries) cache.clear();
  cache.emplace(std::move(key), std::move(word_ids));
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 2);
  if (add_bos && impl_->bos_id) ids.push_back(*impl_->bos_id);
  std::vector<AddedTokenMatcher::Segment> segments;
  impl_->added.Split(text, &segments);
  for (const AddedTokenMatcher::Segment& segment : segments) {
    if (segment.token != nullptr) {
      ids.push_back(segment.token->id);
    } else {
      impl_->EncodeSegment(segment.text, segment.text.data() == text.data(), &ids);
    }
  }
  return ids;
}

// ---- Decoding ------------------------------------------------------------

void Tokenizer::Impl::ApplyDecoder(const DecoderStep& step,
                                   std::vector<std::string>* tokens) const {
  switch (step.kind) {
    case DecoderStep::Kind::kByteLevel: {
      std::string bytes;
      for (const std::string& token : *tokens) bytes += ByteLevelBytes(token);
      *tokens = {std::move(bytes)};
      return;
    }
    case DecoderStep::Kind::kReplace:
      for (std::string& token : *tokens)
        token = absl::StrReplaceAll(token, {{step.pattern, step.content}});
      return;
    case DecoderStep::Kind::kByteFallback: {
      // Runs of <0xNN> become their bytes. HF turns a run that is not valid
      // UTF-8 into U+FFFD; the bytes are kept here, so Decode round-trips.
      std::vector<std::string> out;
      std::string run;
      for (std::string& token : *tokens) {
        uint8_t byte;
        if (ParseByteToken(token, &byte)) {
          run.push_back(static_cast<char>(byte));
          continue;
        }
        if (!run.empty()) out.push_back(std::move(run));
        run.clear();
        out.push_back(std::move(token));
      }
      if (!run.empty()) out.push_back(std::move(run));
      tokens->swap(out);
      return;
    }
    case DecoderStep::Kind::kFuse:
      *tokens = {absl::StrJoin(*tokens, "")};
      return;
    case DecoderStep::Kind::kStrip:
      for (std::string& token : *tokens) {
        absl::string_view view = token;
        for (int i = 0; i < step.start && absl::ConsumePrefix(&view, step.content); ++i) {
        }
        for (int i = 0; i < step.stop && absl::ConsumeSuffix(&view, step.content); ++i) {
        }
        token = std::string(view);
      }
      return;
    case DecoderStep::Kind::kMetaspace:
      for (size_t i = 0; i < tokens->size(); ++i) {
        std::string& token = (*tokens)[i];
        token = absl::StrReplaceAll(token, {{step.pattern, " "}});
        // Only the one space the pre-tokenizer prepended goes (HF drops every
        // '▁' of the first token, which loses the spaces of "  x").
        if (i == 0 && step.strip_first_space && absl::StartsWith(token, " ")) token.erase(0, 1);
      }
      return;
  }
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (const auto it = impl_->added_by_id.find(id); it != impl_->added_by_id.end()) {
      const AddedToken& token = impl_->added.tokens()[it->second];
      if (!(skip_special && token.special)) tokens.push_back(token.content);
      continue;
    }
    const std::string_view token = impl_->model.IdToToken(id);
    if (!token.empty()) tokens.emplace_back(token);
  }
  if (!impl_->decoder) return absl::StrJoin(tokens, " ");
  for (const DecoderStep& step : *impl_->decoder) impl_->ApplyDecoder(step, &tokens);
  return absl::StrJoin(tokens, "");
}

// ---- Loading -------------------------------------------------------------

absl::StatusOr<Tokenizer> Tokenizer::FromJson(std::string_view json_text,
                                              std::string_view source_name) {
  const std::string source(source_name);
  const Reader reader(source);
  json root;
  try {
    root = json::parse(json_text.begin(), json_text.end());
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON: ", e.what()));
  }
  if (!root.is_object()) return reader.Error("(root)", "not an object");

  auto impl = std::make_shared<Impl>();
  try {
    ASSIGN_OR_RETURN(BpeModelSpec spec, ReadModel(reader, root));
    ASSIGN_OR_RETURN(std::vector<AddedToken> added, ReadAddedTokens(reader, root));
    if (const json* normalizer = Reader::Find(root, "normalizer"); normalizer != nullptr) {
      RETURN_IF_ERROR(ReadNormalizer(reader, *normalizer, "normalizer", &impl->normalizers));
    }
    RETURN_IF_ERROR(ReadPreTokenizer(reader, root, impl.get(), &spec.byte_level));
    if (const json* decoder = Reader::Find(root, "decoder"); decoder != nullptr) {
      impl->decoder.emplace();
      RETURN_IF_ERROR(ReadDecoder(reader, *decoder, "decoder", &*impl->decoder));
    }
    absl::StatusOr<BpeModel> model = BpeModel::Create(std::move(spec));
    if (!model.ok())
      return absl::InvalidArgumentError(absl::StrCat(source, ": ", model.status().message()));
    impl->model = *std::move(model);

    impl->vocab_size = impl->model.id_limit();
    for (size_t i = 0; i < added.size(); ++i) {
      impl->added_by_id.emplace(added[i].id, i);
      impl->added_by_content.emplace(added[i].content, added[i].id);
      impl->vocab_size = std::max(impl->vocab_size, added[i].id + 1);
    }
    impl->added = AddedTokenMatcher(std::move(added));
    impl->safe_split_marker = SafeSplitMarker(*impl);

    std::optional<std::string> bos_name, eos_name;
    if (const json* processor = Reader::Find(root, "post_processor"); processor != nullptr) {
      ReadPostProcessorSpecials(*processor, &bos_name, &eos_name);
    }
    const auto first_known =
        [&](std::optional<std::string> preferred,
            std::initializer_list<const char*> names) -> std::optional<int32_t> {
      if (preferred) {
        if (auto id = impl->TokenToId(*preferred)) return id;
      }
      for (const char* name : names) {
        if (auto id = impl->TokenToId(name)) return id;
      }
      return std::nullopt;
    };
    impl->bos_id = first_known(
        bos_name, {"<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>"});
    impl->eos_id =
        first_known(eos_name, {"<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|im_end|>"});
  } catch (const json::exception& e) {
    // A field of an unexpected JSON type that no check above caught.
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": malformed tokenizer.json: ", e.what()));
  }
  return Tokenizer(std::move(impl));
}

absl::StatusOr<Tokenizer> Tokenizer::FromFile(const std::string& path) {
  ASSIGN_OR_RETURN(const std::string text, ReadFile(path));
  ASSIGN_OR_RETURN(Tokenizer tokenizer, FromJson(text, path));

  const std::string config_path =
      (std::filesystem::path(path).parent_path() / "tokenizer_config.json").string();
  std::error_code ignored;
  if (!std::filesystem::is_regular_file(config_path, ignored)) return tokenizer;
  ASSIGN_OR_RETURN(const std::string config_text, ReadFile(config_path));
  const json config = json::parse(config_text, nullptr, /*allow_exceptions=*/false);
  if (!config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": not a JSON object"));
  }
  Impl& impl = *tokenizer.impl_;
  for (auto [key, id] :
       {std::make_pair("bos_token", &impl.bos_id), std::make_pair("eos_token", &impl.eos_id)}) {
    bool present = false;
    ASSIGN_OR_RETURN(const std::optional<std::string> name,
                     ReadConfigToken(config, key, config_path, &present));
    if (!present) continue;
    if (!name) {
      *id = std::nullopt;
    } else if (std::optional<int32_t> known = impl.TokenToId(*name)) {
      *id = known;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(config_path, ": ", key, " '", *name, "' is not a token of ", path));
    }
  }
  return tokenizer;
}

// ---- Accessors -----------------------------------------------------------

int32_t Tokenizer::vocab_size() const { return impl_->vocab_size; }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos_id; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos_id; }

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  return impl_->TokenToId(token);
}

std::string Tokenizer::IdToToken(int32_t id) const {
  if (const auto it = impl_->added_by_id.find(id); it != impl_->added_by_id.end()) {
    return impl_->added.tokens()[it->second].content;
  }
  return std::string(impl_->model.IdToToken(id));
}

}  // namespace compress::engine
