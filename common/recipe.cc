#include "common/recipe.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/json_util.h>
#include <re2/re2.h>
#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/files.h"
#include "common/gguf_types.h"

namespace compress {
namespace {

namespace v1 = compress::v1;
using Json = nlohmann::json;

// Recipes are a few KiB; the cap only keeps a wrong path from reading a model.
constexpr int64_t kMaxRecipeBytes = int64_t{4} << 20;
constexpr int kMaxStages = 64;
constexpr int kMinPriority = -1000;
constexpr int kMaxPriority = 1000;
constexpr int kMaxSleepMillisPerTensor = 60000;
constexpr int kMaxAwqGridPoints = 1000;
constexpr int kMaxHqqIterations = 10000;
constexpr int kMaxContextLength = 1 << 17;
constexpr int kMaxSampleTokens = 4096;
constexpr int kMaxCalibrationSamples = 1 << 16;
constexpr int kMaxPruneM = 1 << 16;
constexpr char kYamlStringTag[] = "tag:yaml.org,2002:str";
// Bounds on the JSON a YAML document expands to. Aliases repeat a subtree
// wherever they appear, so 400 bytes of aliases of aliases expand to 10^9
// nodes, and an alias inside its own anchor (`a: &a [*a]`) is a cycle that
// yaml-cpp builds as such. A recipe has a few hundred nodes, 5 levels deep.
constexpr int kMaxYamlDepth = 100;
constexpr int64_t kMaxYamlNodes = 100000;

// ---------------------------------------------------------------- YAML -> JSON

// The YAML 1.2 core schema's resolution of plain (unquoted) scalars.
Json TypePlainScalar(const std::string& text) {
  static const RE2 kNull("~|null|Null|NULL|");
  static const RE2 kTrue("true|True|TRUE");
  static const RE2 kFalse("false|False|FALSE");
  static const RE2 kDecimalInt("[-+]?[0-9]+");
  static const RE2 kOctalInt("0o([0-7]+)");
  static const RE2 kHexInt("0x([0-9a-fA-F]+)");
  static const RE2 kFloat(R"([-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?)");
  static const RE2 kInfinity(R"(([-+]?)\.(inf|Inf|INF))");
  static const RE2 kNotANumber(R"(\.(nan|NaN|NAN))");

  if (RE2::FullMatch(text, kNull)) return nullptr;
  if (RE2::FullMatch(text, kTrue)) return true;
  if (RE2::FullMatch(text, kFalse)) return false;
  if (RE2::FullMatch(text, kDecimalInt)) {
    int64_t signed_value;
    if (absl::SimpleAtoi(text, &signed_value)) return signed_value;
    uint64_t unsigned_value;
    if (absl::SimpleAtoi(text, &unsigned_value)) return unsigned_value;
    return text;  // out of every integer range: protobuf reports it against the field
  }
  std::string digits;
  if (RE2::FullMatch(text, kOctalInt, &digits) || RE2::FullMatch(text, kHexInt, &digits)) {
    const int base = text[1] == 'o' ? 8 : 16;
    errno = 0;
    char* end = nullptr;
    const uint64_t value = std::strtoull(digits.c_str(), &end, base);
    if (errno == 0 && *end == '\0') return value;
    return text;
  }
  if (RE2::FullMatch(text, kFloat)) {
    double value;
    // 1e999 overflows to infinity, which JSON would print as null (the
    // field's default): kept as text, so that protobuf names the bad value.
    if (absl::SimpleAtod(text, &value) && std::isfinite(value)) return value;
  }
  // JSON has no infinities or NaN; protobuf's JSON mapping spells them so.
  std::string sign;
  if (RE2::FullMatch(text, kInfinity, &sign)) return sign == "-" ? "-Infinity" : "Infinity";
  if (RE2::FullMatch(text, kNotANumber)) return "NaN";
  return text;
}

// "source:line:column: " where yaml-cpp knows the position, else "source: ".
std::string PositionOf(const std::string& source, const YAML::Mark& mark) {
  if (mark.is_null()) return absl::StrCat(source, ": ");
  return absl::StrCat(source, ":", mark.line + 1, ":", mark.column + 1, ": ");
}

// What the protobuf schema expects at a point of the YAML tree, where known.
// YAML has no types, only guesses from the text: `version: 2` under a string
// field must stay "2", or protobuf's JSON parser rejects the number.
struct SchemaHint {
  const google::protobuf::Descriptor* message = nullptr;     // a mapping of its fields
  const google::protobuf::FieldDescriptor* field = nullptr;  // a value of this field
  bool element = false;  // one element of the repeated `field`, not the list
};

const google::protobuf::FieldDescriptor* FindField(const google::protobuf::Descriptor* message,
                                                   const std::string& key) {
  if (message == nullptr) return nullptr;
  // Protobuf's JSON accepts the proto name (group_size) and the JSON name (groupSize).
  if (const auto* field = message->FindFieldByName(key)) return field;
  for (int i = 0; i < message->field_count(); ++i) {
    if (message->field(i)->json_name() == key) return message->field(i);
  }
  return nullptr;
}

SchemaHint HintFor(const google::protobuf::FieldDescriptor* field, bool element = false) {
  if (field == nullptr) return {};
  const bool whole_value = element || !field->is_repeated();
  if (whole_value && field->type() == google::protobuf::FieldDescriptor::TYPE_MESSAGE) {
    return {field->message_type(), nullptr, false};
  }
  return {nullptr, field, element};
}

bool WantsString(const SchemaHint& hint) {
  return hint.field != nullptr && !hint.field->is_map() &&
         hint.field->cpp_type() == google::protobuf::FieldDescriptor::CPPTYPE_STRING;
}

// `depth`: of `node` in the document; `nodes_left`: of kMaxYamlNodes.
absl::StatusOr<Json> YamlNodeToJson(const YAML::Node& node, const std::string& source,
                                    const SchemaHint& hint, int depth, int64_t* nodes_left) {
  if (depth > kMaxYamlDepth || --*nodes_left < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(PositionOf(source, node.Mark()), "the document expands to more than ",
                     depth > kMaxYamlDepth ? absl::StrCat(kMaxYamlDepth, " levels of nesting")
                                           : absl::StrCat(kMaxYamlNodes, " values"),
                     " (an alias inside its own anchor, or aliases of aliases?)"));
  }
  switch (node.Type()) {
    case YAML::NodeType::Undefined:
    case YAML::NodeType::Null: return Json(nullptr);
    case YAML::NodeType::Scalar: {
      // yaml-cpp tags plain scalars "?" and quoted or block ones "!".
      if (node.Tag() == "!" || node.Tag() == kYamlStringTag) return Json(node.Scalar());
      Json typed = TypePlainScalar(node.Scalar());
      if (WantsString(hint) && !typed.is_null()) return Json(node.Scalar());
      return typed;
    }
    case YAML::NodeType::Sequence: {
      const bool is_list_field = hint.field != nullptr && hint.field->is_repeated() &&
                                 !hint.field->is_map() && !hint.element;
      const SchemaHint item_hint =
          is_list_field ? HintFor(hint.field, /*element=*/true) : SchemaHint{};
      Json array = Json::array();
      for (const YAML::Node& item : node) {
        absl::StatusOr<Json> value = YamlNodeToJson(item, source, item_hint, depth + 1, nodes_left);
        if (!value.ok()) return value.status();
        array.push_back(*std::move(value));
      }
      return array;
    }
    case YAML::NodeType::Map: {
      const bool is_map_field = hint.field != nullptr && hint.field->is_map();
      Json object = Json::object();
      for (const auto& entry : node) {
        if (!entry.first.IsScalar()) {
          return absl::InvalidArgumentError(absl::StrCat(PositionOf(source, entry.first.Mark()),
                                                         "a mapping key must be a scalar"));
        }
        const std::string& key = entry.first.Scalar();
        if (object.contains(key)) {
          return absl::InvalidArgumentError(
              absl::StrCat(PositionOf(source, entry.first.Mark()), "duplicate key \"", key, "\""));
        }
        const SchemaHint value_hint = is_map_field
                                          ? HintFor(hint.field->message_type()->map_value())
                                          : HintFor(FindField(hint.message, key));
        absl::StatusOr<Json> value =
            YamlNodeToJson(entry.second, source, value_hint, depth + 1, nodes_left);
        if (!value.ok()) return value.status();
        object[key] = *std::move(value);
      }
      return object;
    }
  }
  return absl::InternalError("unknown YAML node type");
}

// "line:column" of a byte offset, for JSON syntax errors.
std::string LineColumnOf(const std::string& text, size_t offset) {
  int line = 1;
  int column = 1;
  for (size_t i = 0; i < offset && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
  }
  return absl::StrCat(line, ":", column);
}

// `schema`: the message the document describes, or null for schema-free typing.
absl::StatusOr<std::string> ConvertYamlToJson(const std::string& yaml_text,
                                              const std::string& source,
                                              const google::protobuf::Descriptor* schema) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(PositionOf(source, e.mark), e.msg));
  }
  int64_t nodes_left = kMaxYamlNodes;
  absl::StatusOr<Json> json =
      YamlNodeToJson(root, source, SchemaHint{schema, nullptr, false}, /*depth=*/0, &nodes_left);
  if (!json.ok()) return json.status();
  try {
    return json->dump();
  } catch (const Json::exception& e) {  // e.g. a string that is not UTF-8
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", e.what()));
  }
}

// nlohmann's what() is "[json.exception.parse_error.101] parse error at line
// 1, column 2: <detail>"; the position is given separately, so keep the detail.
std::string JsonErrorDetail(const std::string& what) {
  size_t colon = what.find(": ");
  return colon == std::string::npos ? what : what.substr(colon + 2);
}

bool LooksLikeJson(const std::string& text) {
  for (char c : text) {
    if (absl::ascii_isspace(static_cast<unsigned char>(c))) continue;
    return c == '{';
  }
  return false;
}

// ---------------------------------------------------------------- validation

// Collects every problem, so that one run names all of them.
class SpecChecker {
 public:
  void Fail(absl::string_view field, absl::string_view problem) {
    problems_.push_back(absl::StrCat(field, ": ", problem));
  }

  void CheckRange(absl::string_view field, int64_t value, int64_t low, int64_t high) {
    if (value < low || value > high) {
      Fail(field, absl::StrCat(value, " is outside ", low, "..", high));
    }
  }

  void CheckPatterns(const std::string& field,
                     const google::protobuf::RepeatedPtrField<std::string>& patterns) {
    for (int i = 0; i < patterns.size(); ++i) {
      RE2 pattern(patterns[i], RE2::Quiet);
      if (!pattern.ok()) {
        Fail(absl::StrCat(field, "[", i, "]"),
             absl::StrCat("\"", patterns[i], "\" is not a valid RE2 pattern: ", pattern.error()));
      }
    }
  }

  // The grid every integer weight quantizer shares.
  void CheckGrid(const std::string& field, int bits, int group_size) {
    CheckRange(field + ".bits", bits, 2, 8);
    if (group_size < -1) {
      Fail(field + ".group_size",
           absl::StrCat(group_size, " is invalid (want -1 or 0 for per-channel, or > 0)"));
    }
  }

  template <typename StageMessage>
  void CheckTargets(const std::string& field, const StageMessage& stage) {
    CheckPatterns(field + ".include", stage.include());
    CheckPatterns(field + ".exclude", stage.exclude());
  }

  void CheckGptqSettings(const std::string& field, double dampening, int block_size) {
    if (!(dampening >= 0 && dampening <= 10)) {
      Fail(field + ".dampening", absl::StrCat(dampening, " is outside 0..10"));
    }
    CheckRange(field + ".block_size", block_size, 0, 1 << 16);
  }

  void NeedsCalibration(const std::string& field) {
    if (calibration_path_empty_) Fail(field, "needs calibration data (calibration.path)");
  }

  void CheckRtn(const std::string& field, const v1::RtnStage& rtn) {
    CheckGrid(field, rtn.bits(), rtn.group_size());
    CheckTargets(field, rtn);
  }

  void CheckGptq(const std::string& field, const v1::GptqStage& gptq) {
    CheckGrid(field, gptq.bits(), gptq.group_size());
    CheckGptqSettings(field, gptq.dampening(), gptq.block_size());
    CheckTargets(field, gptq);
    NeedsCalibration(field);
  }

  void CheckAwq(const std::string& field, const v1::AwqStage& awq) {
    CheckGrid(field, awq.bits(), awq.group_size());
    CheckRange(field + ".grid_points", awq.grid_points(), 0, kMaxAwqGridPoints);
    if (!v1::AwqQuantizer_IsValid(awq.quantizer())) {
      Fail(field + ".quantizer", absl::StrCat(awq.quantizer(), " is not a quantizer (RTN, GPTQ)"));
    }
    CheckGptqSettings(field, awq.dampening(), awq.block_size());
    CheckTargets(field, awq);
    NeedsCalibration(field);
    if (++awq_stages_ == 2) Fail(field, "a recipe has at most one awq stage");
  }

  void CheckHqq(const std::string& field, const v1::HqqStage& hqq) {
    CheckGrid(field, hqq.bits(), hqq.group_size());
    CheckRange(field + ".iterations", hqq.iterations(), 0, kMaxHqqIterations);
    if (!(hqq.lp_norm() >= 0 && hqq.lp_norm() < 1)) {
      Fail(field + ".lp_norm", absl::StrCat(hqq.lp_norm(), " is outside [0, 1) (0: 0.7)"));
    }
    CheckTargets(field, hqq);
  }

  void CheckBnb4Bit(const std::string& field, const v1::Bnb4BitStage& bnb) {
    if (!v1::Bnb4BitType_IsValid(bnb.type())) {
      Fail(field + ".type", absl::StrCat(bnb.type(), " is not a 4-bit type (NF4, FP4)"));
    }
    const int block = bnb.block_size();
    if (block != 0 && (block < 64 || block > 4096 || (block & (block - 1)) != 0)) {
      Fail(field + ".block_size",
           absl::StrCat(block, " is invalid (want a power of two in 64..4096, or 0 for 64)"));
    }
    CheckTargets(field, bnb);
  }

  // Unstructured at a sparsity, or N:M; m dividing the inputs is checked
  // against the model (common/stage_targets.h).
  void CheckPrune(const std::string& field, const v1::PruneStage& prune) {
    if (!v1::PruneMethod_IsValid(prune.method())) {
      Fail(field + ".method",
           absl::StrCat(prune.method(), " is not a pruning method (MAGNITUDE, WANDA, SPARSEGPT)"));
    }
    const double sparsity = prune.sparsity();
    if (prune.n() != 0 || prune.m() != 0) {
      if (!(prune.n() > 0 && prune.n() < prune.m() && prune.m() <= kMaxPruneM)) {
        Fail(field + ".n", absl::StrCat(prune.n(), ":", prune.m(),
                                        " is not an N:M pattern (want 0 < n < m <= ", kMaxPruneM,
                                        ", e.g. n: 2, m: 4)"));
      }
      if (sparsity != 0) {
        Fail(field + ".sparsity",
             "set either sparsity (unstructured) or n and m (N:M, whose sparsity is 1 - n/m)");
      }
    } else if (!(sparsity >= 0 && sparsity < 1)) {
      Fail(field + ".sparsity", absl::StrCat(sparsity, " is outside [0, 1)"));
    } else if (sparsity == 0) {
      Fail(field, "prunes nothing: set sparsity (unstructured, e.g. 0.5) or n and m (N:M, "
                  "e.g. 2 and 4)");
    }
    if (prune.method() == v1::SPARSEGPT) {
      CheckGptqSettings(field, prune.dampening(), prune.block_size());
    } else if (prune.dampening() != 0 || prune.block_size() != 0) {
      Fail(field, "dampening and block_size apply to SPARSEGPT only");
    }
    CheckTargets(field, prune);
    if (prune.method() == v1::WANDA || prune.method() == v1::SPARSEGPT) NeedsCalibration(field);
  }

  void CheckEvaluate(const std::string& field, const v1::EvaluateStage& evaluate) {
    if (evaluate.text_path().empty()) Fail(field + ".text_path", "is required");
    CheckRange(field + ".context_length", evaluate.context_length(), 0, kMaxContextLength);
    const int context = evaluate.context_length() > 0 ? evaluate.context_length() : 256;
    CheckRange(field + ".stride", evaluate.stride(), 0, context);
    if (evaluate.max_tokens() < 0 || evaluate.max_tokens() == 1) {
      Fail(field + ".max_tokens", absl::StrCat(evaluate.max_tokens(), " is invalid (want 0 or >= 2)"));
    }
    CheckRange(field + ".sample_tokens", evaluate.sample_tokens(), 0, kMaxSampleTokens);
  }

  void CheckStage(int index, const v1::Stage& stage) {
    const std::string field = absl::StrCat("stages[", index, "]");
    switch (stage.method_case()) {
      case v1::Stage::kRtn: CheckRtn(field + ".rtn", stage.rtn()); break;
      case v1::Stage::kGptq: CheckGptq(field + ".gptq", stage.gptq()); break;
      case v1::Stage::kAwq: CheckAwq(field + ".awq", stage.awq()); break;
      case v1::Stage::kHqq: CheckHqq(field + ".hqq", stage.hqq()); break;
      case v1::Stage::kBnb4Bit: CheckBnb4Bit(field + ".bnb_4bit", stage.bnb_4bit()); break;
      case v1::Stage::kPrune: CheckPrune(field + ".prune", stage.prune()); break;
      case v1::Stage::kEvaluate:
        CheckEvaluate(field + ".evaluate", stage.evaluate());
        if (++evaluate_stages_ == 2) Fail(field, "a recipe has at most one evaluate stage");
        break;
      case v1::Stage::kSleep:
        CheckRange(field + ".sleep.millis_per_tensor", stage.sleep().millis_per_tensor(), 0,
                   kMaxSleepMillisPerTensor);
        break;
      case v1::Stage::METHOD_NOT_SET: Fail(field, "no method set (one of: rtn, gptq, awq, hqq, bnb_4bit, prune, evaluate, sleep)"); break;
    }
  }

  void CheckOutputs(const v1::JobSpec& spec) {
    std::set<int> seen;
    for (int i = 0; i < spec.outputs_size(); ++i) {
      const int format = spec.outputs(i);
      const std::string field = absl::StrCat("outputs[", i, "]");
      if (format == v1::OUTPUT_FORMAT_UNSPECIFIED || !v1::OutputFormat_IsValid(format)) {
        Fail(field, absl::StrCat(format,
                                 " is not an output format (DEQUANTIZED_SAFETENSORS, "
                                 "PACKED_SAFETENSORS, GGUF)"));
      } else if (!seen.insert(format).second) {
        Fail(field, absl::StrCat(v1::OutputFormat_Name(format), " is listed twice"));
      }
    }
    std::set<std::string> files;
    for (int i = 0; i < spec.gguf_size(); ++i) {
      const v1::GgufOutput& gguf = spec.gguf(i);
      const std::string field = absl::StrCat("gguf[", i, "]");
      const std::string preset = gguf.preset().empty() ? "Q4_K_M" : gguf.preset();
      const std::optional<GgufPreset> found = FindGgufPreset(preset);
      if (!found) {
        Fail(field + ".preset",
             absl::StrCat("\"", preset, "\" is not a preset (", GgufPresetNames(), ")"));
      } else if (!files.insert(absl::StrCat(found->name, gguf.importance())).second) {
        Fail(field, absl::StrCat(found->name, gguf.importance() ? " with importance" : "",
                                 " is listed twice"));
      }
      if (gguf.importance() && calibration_path_empty_) {
        Fail(field + ".importance", "needs calibration data (calibration.path)");
      }
    }
  }

  void Check(const v1::JobSpec& spec) {
    if (spec.model().path().empty()) Fail("model.path", "is required");
    // A GGUF conversion alone is a job: the weights as they are, re-encoded.
    if (spec.stages().empty() && spec.gguf().empty()) {
      Fail("stages", "at least one stage is required (or a gguf output)");
    }
    if (spec.stages_size() > kMaxStages) {
      Fail("stages", absl::StrCat(spec.stages_size(), " stages is more than ", kMaxStages));
    }
    calibration_path_empty_ = spec.calibration().path().empty();
    for (int i = 0; i < spec.stages_size(); ++i) CheckStage(i, spec.stages(i));
    CheckRange("calibration.num_samples", spec.calibration().num_samples(), 0,
               kMaxCalibrationSamples);
    CheckRange("calibration.sequence_length", spec.calibration().sequence_length(), 0,
               kMaxContextLength);
    if (!v1::Propagation_IsValid(spec.calibration().propagation())) {
      Fail("calibration.propagation",
           absl::StrCat(spec.calibration().propagation(), " is not a propagation mode"));
    }
    CheckOutputs(spec);
    CheckRange("priority", spec.priority(), kMinPriority, kMaxPriority);
    for (const auto& [key, value] : spec.labels()) {
      if (key.empty()) Fail("labels", "a label key is empty");
    }
  }

  absl::Status Result() const {
    if (problems_.empty()) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrJoin(problems_, "; "));
  }

 private:
  std::vector<std::string> problems_;
  int evaluate_stages_ = 0;
  int awq_stages_ = 0;
  bool calibration_path_empty_ = true;
};

}  // namespace

absl::StatusOr<std::string> YamlToJson(const std::string& yaml_text) {
  return ConvertYamlToJson(yaml_text, "YAML", /*schema=*/nullptr);
}

absl::StatusOr<v1::JobSpec> ParseRecipe(const std::string& text, const std::string& source) {
  std::string json_text;
  std::optional<absl::Status> json_syntax_error;
  if (LooksLikeJson(text)) {
    // protobuf's parser gives no position for syntax errors; nlohmann does.
    try {
      Json syntax_checked = Json::parse(text);
      static_cast<void>(syntax_checked);
      json_text = text;
    } catch (const Json::parse_error& e) {
      json_syntax_error = absl::InvalidArgumentError(
          absl::StrCat(source, ":", LineColumnOf(text, e.byte == 0 ? 0 : e.byte - 1), ": ",
                       JsonErrorDetail(e.what())));
    } catch (const Json::exception& e) {
      // Valid JSON that nlohmann still refuses: a number beyond a double's
      // range (1e999) is out_of_range.406, "... number overflow parsing '1e999'".
      const std::string what = e.what();
      const size_t tag_end = what.find("] ");
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": ", tag_end == std::string::npos ? what : what.substr(tag_end + 2)));
    }
  }
  if (json_text.empty()) {
    // YAML, or a YAML flow mapping such as `{model: {path: m}}` that is not JSON.
    absl::StatusOr<std::string> converted =
        ConvertYamlToJson(text, source, v1::JobSpec::descriptor());
    if (!converted.ok()) return json_syntax_error.value_or(converted.status());
    json_text = *std::move(converted);
    if (json_text == "null") json_text = "{}";  // an empty file
    if (json_text.front() != '{') {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": a recipe is a mapping of JobSpec fields (model, stages, ...)"));
    }
  }

  v1::JobSpec spec;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  options.case_insensitive_enum_parsing = true;
  auto status = google::protobuf::util::JsonStringToMessage(json_text, &spec, options);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": ", absl::string_view(status.message().data(), status.message().size())));
  }
  return spec;
}

absl::StatusOr<v1::JobSpec> LoadRecipeFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path, kMaxRecipeBytes);
  if (!text.ok()) return text.status();
  return ParseRecipe(*text, path);
}

absl::Status ValidateJobSpec(const v1::JobSpec& spec) {
  SpecChecker checker;
  checker.Check(spec);
  return checker.Result();
}

std::string ToJson(const google::protobuf::Message& message, bool pretty) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = pretty;
  std::string out;
  auto status = google::protobuf::util::MessageToJsonString(message, &out, options);
  if (!status.ok()) {
    Json error = {{"error", std::string(status.message().data(), status.message().size())}};
    return error.dump();
  }
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

}  // namespace compress
