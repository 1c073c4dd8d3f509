#include "common/recipe.h"

#include <gmock/gmock.h>
#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "tests/testing/temp_dir.h"

namespace compress {
namespace {

namespace v1 = compress::v1;
using ::google::protobuf::util::MessageDifferencer;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr char kYamlRecipe[] = R"(# 4-bit RTN, two outputs
name: llama-w4
model:
  path: models/llama
stages:
  - name: w4
    rtn:
      bits: 4
      symmetric: true
      group_size: 128
      include: ["mlp\\.", 'self_attn']
      exclude:
        - lm_head
outputs: [dequantized_safetensors, Packed_Safetensors]
calibration:
  path: calib.txt
  numSamples: 8
priority: -5
labels:
  team: nlp
  version: "2"
)";

constexpr char kJsonRecipe[] = R"({
  "name": "llama-w4",
  "model": {"path": "models/llama"},
  "stages": [{"name": "w4", "rtn": {"bits": 4, "symmetric": true, "groupSize": 128,
              "include": ["mlp\\.", "self_attn"], "exclude": ["lm_head"]}}],
  "outputs": ["DEQUANTIZED_SAFETENSORS", "packed_safetensors"],
  "calibration": {"path": "calib.txt", "num_samples": 8},
  "priority": -5,
  "labels": {"team": "nlp", "version": "2"}
})";

v1::JobSpec ValidSpec() {
  v1::JobSpec spec;
  spec.mutable_model()->set_path("models/llama");
  v1::RtnStage* rtn = spec.add_stages()->mutable_rtn();
  rtn->set_bits(4);
  rtn->set_group_size(128);
  return spec;
}

std::string Problem(const v1::JobSpec& spec) {
  absl::Status status = ValidateJobSpec(spec);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  return std::string(status.message());
}

TEST(RecipeTest, YamlAndJsonGiveTheSameJobSpec) {
  absl::StatusOr<v1::JobSpec> from_yaml = ParseRecipe(kYamlRecipe, "w4.yaml");
  absl::StatusOr<v1::JobSpec> from_json = ParseRecipe(kJsonRecipe, "w4.json");
  ASSERT_TRUE(from_yaml.ok()) << from_yaml.status();
  ASSERT_TRUE(from_json.ok()) << from_json.status();
  EXPECT_TRUE(MessageDifferencer::Equals(*from_yaml, *from_json))
      << from_yaml->DebugString() << "\nvs\n"
      << from_json->DebugString();

  const v1::JobSpec& spec = *from_yaml;
  EXPECT_EQ(spec.name(), "llama-w4");
  EXPECT_EQ(spec.model().path(), "models/llama");
  ASSERT_EQ(spec.stages_size(), 1);
  EXPECT_EQ(spec.stages(0).rtn().bits(), 4);
  EXPECT_EQ(spec.stages(0).rtn().group_size(), 128);
  EXPECT_TRUE(spec.stages(0).rtn().symmetric());
  EXPECT_EQ(spec.stages(0).rtn().include(0), "mlp\\.");
  ASSERT_EQ(spec.outputs_size(), 2);
  EXPECT_EQ(spec.outputs(0), v1::DEQUANTIZED_SAFETENSORS);
  EXPECT_EQ(spec.outputs(1), v1::PACKED_SAFETENSORS);
  EXPECT_EQ(spec.calibration().num_samples(), 8);
  EXPECT_EQ(spec.priority(), -5);
  EXPECT_EQ(spec.labels().at("version"), "2");
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << ValidateJobSpec(spec);
}

TEST(RecipeTest, EnumsAreCaseInsensitive) {
  for (const char* name : {"packed_safetensors", "PACKED_SAFETENSORS", "Packed_SafeTensors"}) {
    absl::StatusOr<v1::JobSpec> spec = ParseRecipe(std::string("outputs: [") + name + "]");
    ASSERT_TRUE(spec.ok()) << name << ": " << spec.status();
    ASSERT_EQ(spec->outputs_size(), 1);
    EXPECT_EQ(spec->outputs(0), v1::PACKED_SAFETENSORS);
  }
  EXPECT_EQ(ParseRecipe("outputs: [onnx]").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RecipeTest, UnknownFieldIsRejectedByName) {
  absl::StatusOr<v1::JobSpec> yaml =
      ParseRecipe("model: {path: m}\nstages:\n  - rtn: {bitz: 4}\n", "typo.yaml");
  EXPECT_EQ(yaml.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(yaml.status().message()),
              AllOf(HasSubstr("typo.yaml"), HasSubstr("bitz")));

  absl::StatusOr<v1::JobSpec> json = ParseRecipe(R"({"modle": {"path": "m"}})", "typo.json");
  EXPECT_EQ(json.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(json.status().message()),
              AllOf(HasSubstr("typo.json"), HasSubstr("modle")));
}

TEST(RecipeTest, SyntaxErrorsNameTheSourceAndPosition) {
  absl::StatusOr<v1::JobSpec> yaml = ParseRecipe("model:\n  path: [unclosed\n", "bad.yaml");
  EXPECT_EQ(yaml.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(yaml.status().message()), HasSubstr("bad.yaml:"));
  EXPECT_THAT(std::string(yaml.status().message()),
              ::testing::ContainsRegex("bad\\.yaml:[0-9]+:[0-9]+: "));

  absl::StatusOr<v1::JobSpec> json =
      ParseRecipe("{\n  \"model\": {\"path\": \"m\"},,\n}", "bad.json");
  EXPECT_EQ(json.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(json.status().message()), HasSubstr("bad.json:2:"));
}

TEST(RecipeTest, YamlFlowMappingThatIsNotJsonStillParses) {
  absl::StatusOr<v1::JobSpec> spec = ParseRecipe("{model: {path: m}, stages: [{rtn: {bits: 3}}]}");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->model().path(), "m");
  EXPECT_EQ(spec->stages(0).rtn().bits(), 3);
}

TEST(RecipeTest, ARecipeMustBeAMapping) {
  EXPECT_THAT(std::string(ParseRecipe("- just\n- a list\n", "list.yaml").status().message()),
              HasSubstr("list.yaml: a recipe is a mapping"));
  // An empty file is an empty spec; validation then says what is missing.
  absl::StatusOr<v1::JobSpec> empty = ParseRecipe("", "empty.yaml");
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_THAT(std::string(ValidateJobSpec(*empty).message()), HasSubstr("model.path"));
}

TEST(RecipeTest, PlainScalarsUnderStringFieldsStayStrings) {
  // YAML would type these as numbers or booleans; the schema says string.
  absl::StatusOr<v1::JobSpec> spec = ParseRecipe(
      "name: 2024\nmodel: {path: 0x10}\nlabels: {version: 2, stable: true, ratio: 1.50}\n"
      "stages: [{name: 1, rtn: {bits: 4, include: [0, mlp]}}]\npriority: 7\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->name(), "2024");
  EXPECT_EQ(spec->model().path(), "0x10");
  EXPECT_EQ(spec->labels().at("version"), "2");
  EXPECT_EQ(spec->labels().at("stable"), "true");
  EXPECT_EQ(spec->labels().at("ratio"), "1.50");  // the text as written
  EXPECT_EQ(spec->stages(0).name(), "1");
  EXPECT_EQ(spec->stages(0).rtn().bits(), 4);
  EXPECT_EQ(spec->stages(0).rtn().include(0), "0");
  EXPECT_EQ(spec->priority(), 7);
}

TEST(RecipeTest, WrongTypesNameTheField) {
  absl::StatusOr<v1::JobSpec> spec = ParseRecipe("priority: high\n", "types.yaml");
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr("priority"));
}

// Found by fuzz/recipe_fuzzer.cc (fuzz/regressions/recipe-json-number-overflow):
// nlohmann refuses a JSON number beyond a double's range by throwing
// out_of_range, which escaped ParseRecipe and ended the process. In YAML the
// same number overflowed to infinity, which JSON prints as null, so the
// field silently kept its default.
TEST(RecipeTest, NumbersBeyondADoubleAreRefusedNamingTheValue) {
  absl::StatusOr<v1::JobSpec> json = ParseRecipe(R"({"priority": 1e999})", "big.json");
  EXPECT_EQ(json.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(json.status().message()),
              AllOf(HasSubstr("big.json"), HasSubstr("number overflow parsing '1e999'")));

  absl::StatusOr<v1::JobSpec> yaml =
      ParseRecipe("model: {path: m}\nstages: [{gptq: {bits: 4, dampening: -1e999}}]\n", "big.yaml");
  EXPECT_EQ(yaml.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(yaml.status().message()),
              AllOf(HasSubstr("big.yaml"), HasSubstr("dampening"), HasSubstr("\"-1e999\"")));
  absl::StatusOr<v1::JobSpec> priority = ParseRecipe("priority: 1e999\n", "big.yaml");
  EXPECT_THAT(std::string(priority.status().message()),
              AllOf(HasSubstr("priority"), HasSubstr("\"1e999\"")));
}

// Found while fuzzing (fuzz/regressions/recipe-yaml-alias-*): an alias
// inside its own anchor is a cycle in yaml-cpp's tree, and the conversion to
// JSON recursed until the stack overflowed; nine levels of ten aliases (400
// bytes) expanded to 10^9 values and ran out of memory.
TEST(RecipeTest, YamlAliasCyclesAndExpansionsAreRefused) {
  for (const char* cycle : {"a: &a [*a]\n", "model: &m {path: *m}\n"}) {
    absl::StatusOr<v1::JobSpec> spec = ParseRecipe(cycle, "cycle.yaml");
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument) << cycle;
    EXPECT_THAT(std::string(spec.status().message()),
                AllOf(HasSubstr("cycle.yaml:1:"), HasSubstr("more than 100 levels of nesting")));
  }
  std::string laughs = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n";
  for (int i = 1; i < 9; ++i) {
    laughs += "a" + std::to_string(i) + ": &a" + std::to_string(i) + " [";
    for (int k = 0; k < 10; ++k) laughs += (k ? ", *a" : "*a") + std::to_string(i - 1);
    laughs += "]\n";
  }
  absl::StatusOr<std::string> json = YamlToJson(laughs);
  EXPECT_EQ(json.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(json.status().message()), HasSubstr("more than 100000 values"));
  // Aliases that expand modestly are fine.
  absl::StatusOr<v1::JobSpec> spec =
      ParseRecipe("model: {path: &p m}\nstages: [&s {rtn: {bits: 4}}, *s]\nlabels: {k: *p}\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->stages_size(), 2);
  EXPECT_EQ(spec->labels().at("k"), "m");
}

// Every input under fuzz/regressions/ that once crashed the recipe parser
// is now a plain INVALID_ARGUMENT.
TEST(RecipeTest, FuzzerRegressionsAreRefused) {
  const std::filesystem::path dir =
      std::filesystem::path(__FILE__).parent_path() / ".." / ".." / "fuzz" / "regressions";
  int inputs = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().filename().string().rfind("recipe-", 0) != 0) continue;
    std::ifstream in(entry.path(), std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(ParseRecipe(text, "fuzz").status().code(), absl::StatusCode::kInvalidArgument)
        << entry.path();
    ++inputs;
  }
  EXPECT_GE(inputs, 1) << dir;
}

TEST(YamlToJsonTest, TypesPlainScalarsAndKeepsQuotedOnesAsStrings) {
  absl::StatusOr<std::string> json = YamlToJson(
      "int: 12\nneg: -3\nhex: 0x1f\noctal: 0o17\nfloat: 1.5\nexp: 1e3\n"
      "yes_bool: true\nno_bool: False\nnothing: ~\nempty:\ntext: hello world\n"
      "quoted_int: \"12\"\nsingle_quoted_bool: 'true'\nquoted_null: \"null\"\n"
      "inf: -.inf\nlist: [1, two, \"3\"]\nblock: |\n  line\n");
  ASSERT_TRUE(json.ok()) << json.status();
  // nlohmann orders object keys, so the text is stable.
  EXPECT_EQ(
      *json,
      R"({"block":"line\n","empty":null,"exp":1000.0,"float":1.5,"hex":31,"inf":"-Infinity",)"
      R"("int":12,"list":[1,"two","3"],"neg":-3,"no_bool":false,"nothing":null,"octal":15,)"
      R"("quoted_int":"12","quoted_null":"null","single_quoted_bool":"true","text":"hello world",)"
      R"("yes_bool":true})");
}

TEST(YamlToJsonTest, RejectsDuplicateKeys) {
  absl::StatusOr<std::string> json = YamlToJson("a: 1\nb: 2\na: 3\n");
  EXPECT_EQ(json.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(json.status().message()), HasSubstr("duplicate key \"a\""));
}

TEST(RecipeTest, LoadRecipeFileUsesThePathInErrors) {
  testing::TempDir temp("recipe");
  const std::filesystem::path dir(temp.path());
  const std::string good = (dir / "w4.yaml").string();
  std::ofstream(good) << kYamlRecipe;
  absl::StatusOr<v1::JobSpec> loaded = LoadRecipeFile(good);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->name(), "llama-w4");

  const std::string bad = (dir / "bad.yaml").string();
  std::ofstream(bad) << "stages: [{rtn: {bitz: 4}}]\n";
  EXPECT_THAT(std::string(LoadRecipeFile(bad).status().message()), HasSubstr(bad));

  EXPECT_EQ(LoadRecipeFile((dir / "missing.yaml").string()).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(RecipeTest, ToJsonRoundTrips) {
  absl::StatusOr<v1::JobSpec> spec = ParseRecipe(kYamlRecipe);
  ASSERT_TRUE(spec.ok());
  const std::string compact = ToJson(*spec);
  EXPECT_EQ(compact.find('\n'), std::string::npos);
  EXPECT_THAT(compact, HasSubstr("\"groupSize\":128"));
  const std::string pretty = ToJson(*spec, /*pretty=*/true);
  EXPECT_NE(pretty.find('\n'), std::string::npos);
  for (const std::string& text : {compact, pretty}) {
    absl::StatusOr<v1::JobSpec> again = ParseRecipe(text);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_TRUE(MessageDifferencer::Equals(*spec, *again));
  }
}

// ---------------------------------------------------------------- validation

TEST(ValidateJobSpecTest, AcceptsAValidSpec) {
  EXPECT_TRUE(ValidateJobSpec(ValidSpec()).ok());
  v1::JobSpec per_channel = ValidSpec();
  per_channel.mutable_stages(0)->mutable_rtn()->set_group_size(-1);
  EXPECT_TRUE(ValidateJobSpec(per_channel).ok());
  per_channel.mutable_stages(0)->mutable_rtn()->set_group_size(0);
  EXPECT_TRUE(ValidateJobSpec(per_channel).ok());
}

TEST(ValidateJobSpecTest, RequiresAModelPath) {
  v1::JobSpec spec = ValidSpec();
  spec.clear_model();
  EXPECT_EQ(Problem(spec), "model.path: is required");
}

TEST(ValidateJobSpecTest, RequiresBetweenOneAnd64Stages) {
  v1::JobSpec spec = ValidSpec();
  spec.clear_stages();
  EXPECT_EQ(Problem(spec), "stages: at least one stage is required (or a gguf output)");
  spec.add_gguf()->set_preset("Q8_0");
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << "a GGUF conversion alone";
  spec.clear_gguf();
  spec = ValidSpec();
  while (spec.stages_size() < 64) *spec.add_stages() = spec.stages(0);
  EXPECT_TRUE(ValidateJobSpec(spec).ok());
  *spec.add_stages() = spec.stages(0);
  EXPECT_EQ(Problem(spec), "stages: 65 stages is more than 64");
}

TEST(ValidateJobSpecTest, EveryStageNeedsAMethod) {
  v1::JobSpec spec = ValidSpec();
  spec.add_stages()->set_name("empty");
  EXPECT_EQ(Problem(spec), "stages[1]: no method set (one of: rtn, gptq, awq, hqq, bnb_4bit, prune, evaluate, sleep)");
}

TEST(ValidateJobSpecTest, RtnBitsWithin2To8) {
  v1::JobSpec spec = ValidSpec();
  spec.mutable_stages(0)->mutable_rtn()->set_bits(9);
  EXPECT_EQ(Problem(spec), "stages[0].rtn.bits: 9 is outside 2..8");
  spec.mutable_stages(0)->mutable_rtn()->set_bits(1);
  EXPECT_EQ(Problem(spec), "stages[0].rtn.bits: 1 is outside 2..8");
  for (int bits : {2, 8}) {
    spec.mutable_stages(0)->mutable_rtn()->set_bits(bits);
    EXPECT_TRUE(ValidateJobSpec(spec).ok()) << bits;
  }
}

TEST(ValidateJobSpecTest, NegativeGroupSizeOtherThanMinusOne) {
  v1::JobSpec spec = ValidSpec();
  spec.mutable_stages(0)->mutable_rtn()->set_group_size(-2);
  EXPECT_THAT(Problem(spec), HasSubstr("stages[0].rtn.group_size: -2 is invalid"));
}

TEST(ValidateJobSpecTest, PatternsMustCompileAsRe2) {
  v1::JobSpec spec = ValidSpec();
  spec.mutable_stages(0)->mutable_rtn()->add_include("mlp");
  spec.mutable_stages(0)->mutable_rtn()->add_include("(unclosed");
  spec.mutable_stages(0)->mutable_rtn()->add_exclude("[z-a]");
  const std::string problem = Problem(spec);
  EXPECT_THAT(problem, HasSubstr("stages[0].rtn.include[1]: \"(unclosed\" is not a valid RE2"));
  EXPECT_THAT(problem, HasSubstr("stages[0].rtn.exclude[0]: \"[z-a]\""));
}

TEST(ValidateJobSpecTest, SleepMillisWithin0To60000) {
  v1::JobSpec spec = ValidSpec();
  spec.add_stages()->mutable_sleep()->set_millis_per_tensor(-1);
  EXPECT_EQ(Problem(spec), "stages[1].sleep.millis_per_tensor: -1 is outside 0..60000");
  spec.mutable_stages(1)->mutable_sleep()->set_millis_per_tensor(60001);
  EXPECT_EQ(Problem(spec), "stages[1].sleep.millis_per_tensor: 60001 is outside 0..60000");
  spec.mutable_stages(1)->mutable_sleep()->set_millis_per_tensor(60000);
  EXPECT_TRUE(ValidateJobSpec(spec).ok());
}

TEST(ValidateJobSpecTest, PriorityWithinPlusMinus1000) {
  v1::JobSpec spec = ValidSpec();
  spec.set_priority(1001);
  EXPECT_EQ(Problem(spec), "priority: 1001 is outside -1000..1000");
  spec.set_priority(-1001);
  EXPECT_EQ(Problem(spec), "priority: -1001 is outside -1000..1000");
  spec.set_priority(-1000);
  EXPECT_TRUE(ValidateJobSpec(spec).ok());
}

TEST(ValidateJobSpecTest, LabelKeysAreNonEmpty) {
  v1::JobSpec spec = ValidSpec();
  (*spec.mutable_labels())[""] = "x";
  EXPECT_EQ(Problem(spec), "labels: a label key is empty");
}

TEST(ValidateJobSpecTest, OutputsAreKnownAndListedOnce) {
  v1::JobSpec spec = ValidSpec();
  spec.add_outputs(v1::OUTPUT_FORMAT_UNSPECIFIED);
  EXPECT_THAT(Problem(spec), HasSubstr("outputs[0]: 0 is not an output format"));
  spec.clear_outputs();
  spec.add_outputs(v1::PACKED_SAFETENSORS);
  spec.add_outputs(v1::PACKED_SAFETENSORS);
  EXPECT_EQ(Problem(spec), "outputs[1]: PACKED_SAFETENSORS is listed twice");
}

TEST(ValidateJobSpecTest, CalibrationCountsAreInRangeAndPropagationKnown) {
  v1::JobSpec spec = ValidSpec();
  spec.mutable_calibration()->set_num_samples(-1);
  spec.mutable_calibration()->set_sequence_length(-2);
  spec.mutable_calibration()->set_propagation(static_cast<v1::Propagation>(7));
  EXPECT_EQ(Problem(spec),
            "calibration.num_samples: -1 is outside 0..65536; calibration.sequence_length: -2 is "
            "outside 0..131072; calibration.propagation: 7 is not a propagation mode");
  spec.mutable_calibration()->set_num_samples(16);
  spec.mutable_calibration()->set_sequence_length(128);
  spec.mutable_calibration()->set_propagation(v1::PROPAGATION_PARALLEL);
  EXPECT_TRUE(ValidateJobSpec(spec).ok());
}

TEST(ValidateJobSpecTest, GptqNeedsCalibrationAndSaneSettings) {
  v1::JobSpec spec = ValidSpec();
  v1::GptqStage* gptq = spec.add_stages()->mutable_gptq();
  gptq->set_bits(1);
  gptq->set_group_size(-2);
  gptq->set_dampening(-0.5);
  gptq->add_include("(");
  EXPECT_THAT(Problem(spec), HasSubstr("stages[1].gptq.bits: 1 is outside 2..8"));
  EXPECT_THAT(Problem(spec), HasSubstr("stages[1].gptq.group_size: -2 is invalid"));
  EXPECT_THAT(Problem(spec), HasSubstr("stages[1].gptq.dampening: -0.5 is outside 0..10"));
  EXPECT_THAT(Problem(spec), HasSubstr("stages[1].gptq.include[0]"));
  EXPECT_THAT(Problem(spec), HasSubstr("stages[1].gptq: needs calibration data"));
  gptq->set_bits(3);
  gptq->set_group_size(128);
  gptq->set_dampening(0);
  gptq->clear_include();
  spec.mutable_calibration()->set_path("calib.txt");
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << ValidateJobSpec(spec);
}

TEST(ValidateJobSpecTest, AwqHqqAndBnb4BitSettingsAreChecked) {
  v1::JobSpec spec = ValidSpec();
  v1::AwqStage* awq = spec.add_stages()->mutable_awq();
  awq->set_bits(9);
  awq->set_grid_points(-1);
  awq->set_quantizer(static_cast<v1::AwqQuantizer>(5));
  *spec.add_stages()->mutable_awq() = *awq;
  v1::HqqStage* hqq = spec.add_stages()->mutable_hqq();
  hqq->set_bits(1);
  hqq->set_lp_norm(1.5);
  v1::Bnb4BitStage* bnb = spec.add_stages()->mutable_bnb_4bit();
  bnb->set_block_size(100);
  bnb->add_exclude("[");
  EXPECT_THAT(Problem(spec), HasSubstr("stages[1].awq.bits: 9 is outside 2..8"));
  EXPECT_THAT(Problem(spec), HasSubstr("stages[1].awq.grid_points: -1 is outside 0..1000"));
  EXPECT_THAT(Problem(spec), HasSubstr("stages[1].awq.quantizer: 5 is not a quantizer"));
  EXPECT_THAT(Problem(spec), HasSubstr("stages[1].awq: needs calibration data"));
  EXPECT_THAT(Problem(spec), HasSubstr("stages[2].awq: a recipe has at most one awq stage"));
  EXPECT_THAT(Problem(spec), HasSubstr("stages[3].hqq.bits: 1 is outside 2..8"));
  EXPECT_THAT(Problem(spec), HasSubstr("stages[3].hqq.lp_norm: 1.5 is outside [0, 1)"));
  EXPECT_THAT(Problem(spec), HasSubstr("stages[4].bnb_4bit.block_size: 100 is invalid"));
  EXPECT_THAT(Problem(spec), HasSubstr("stages[4].bnb_4bit.exclude[0]"));
  spec.mutable_stages()->DeleteSubrange(2, 1);
  awq->set_bits(4);
  awq->set_grid_points(0);
  awq->set_quantizer(v1::AWQ_QUANTIZER_GPTQ);
  hqq->set_bits(2);
  hqq->set_lp_norm(0);
  bnb->set_block_size(128);
  bnb->clear_exclude();
  spec.mutable_calibration()->set_path("calib.txt");
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << ValidateJobSpec(spec);
}

TEST(ValidateJobSpecTest, GgufOutputsNameAPresetOnce) {
  v1::JobSpec spec = ValidSpec();
  spec.add_outputs(v1::GGUF);
  spec.add_gguf()->set_preset("Q4_K_XL");
  spec.add_gguf()->set_preset("q8_0");
  spec.add_gguf()->set_preset("Q8_0");
  spec.add_gguf()->set_importance(true);
  EXPECT_THAT(Problem(spec), HasSubstr("gguf[0].preset: \"Q4_K_XL\" is not a preset (F32, F16"));
  EXPECT_THAT(Problem(spec), HasSubstr("gguf[2]: Q8_0 is listed twice"));
  EXPECT_THAT(Problem(spec), HasSubstr("gguf[3].importance: needs calibration data"));
  spec.mutable_gguf()->DeleteSubrange(0, 2);
  spec.mutable_calibration()->set_path("calib.txt");
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << ValidateJobSpec(spec);
}

TEST(ValidateJobSpecTest, EvaluateStageNeedsATextAndSaneWindows) {
  v1::JobSpec spec = ValidSpec();
  v1::EvaluateStage* evaluate = spec.add_stages()->mutable_evaluate();
  EXPECT_EQ(Problem(spec), "stages[1].evaluate.text_path: is required");
  evaluate->set_text_path("eval.txt");
  evaluate->set_context_length(64);
  evaluate->set_stride(65);
  evaluate->set_max_tokens(1);
  evaluate->set_sample_tokens(-3);
  EXPECT_EQ(Problem(spec),
            "stages[1].evaluate.stride: 65 is outside 0..64; stages[1].evaluate.max_tokens: 1 is "
            "invalid (want 0 or >= 2); stages[1].evaluate.sample_tokens: -3 is outside 0..4096");
  evaluate->set_stride(32);
  evaluate->set_max_tokens(0);
  evaluate->set_sample_tokens(20);
  EXPECT_TRUE(ValidateJobSpec(spec).ok());
  *spec.add_stages() = spec.stages(1);
  EXPECT_EQ(Problem(spec), "stages[2]: a recipe has at most one evaluate stage");
}

TEST(RecipeExamplesTest, EveryExampleParsesAndValidates) {
  int examples = 0;
  for (const auto& entry : std::filesystem::directory_iterator(EXAMPLES_DIR)) {
    SCOPED_TRACE(entry.path().string());
    absl::StatusOr<v1::JobSpec> spec = LoadRecipeFile(entry.path().string());
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_TRUE(ValidateJobSpec(*spec).ok()) << ValidateJobSpec(*spec);
    ++examples;
  }
  EXPECT_GE(examples, 2);
}

TEST(ValidateJobSpecTest, ReportsEveryProblemAtOnce) {
  v1::JobSpec spec;
  spec.set_priority(5000);
  EXPECT_EQ(Problem(spec),
            "model.path: is required; stages: at least one stage is required (or a gguf output); "
            "priority: 5000 is outside -1000..1000");
}

}  // namespace
}  // namespace compress
