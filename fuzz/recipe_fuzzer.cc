// Fuzzes the recipe parser (YAML or JSON -> JobSpec) and its validation:
// the input is a recipe file. Besides "no crash, no sanitizer report", it
// checks what the CLI and the server rely on: a refusal is
// INVALID_ARGUMENT; YamlToJson never crashes either; and an accepted
// recipe printed back as JSON (what `compressctl get --json` shows and the
// store keeps) parses to the same message and validates the same way.
#include <google/protobuf/util/field_comparator.h>
#include <google/protobuf/util/message_differencer.h>

#include <cstdint>
#include <string>

#include "common/recipe.h"
#include "fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace compress;
  const std::string text(reinterpret_cast<const char*>(data), size);

  const absl::StatusOr<std::string> json = YamlToJson(text);
  if (!json.ok()) FUZZ_CHECK_REFUSAL(json.status());

  const absl::StatusOr<v1::JobSpec> spec = ParseRecipe(text, "fuzz.yaml");
  if (!spec.ok()) {
    FUZZ_CHECK_REFUSAL(spec.status());
    return 0;
  }
  const absl::Status valid = ValidateJobSpec(*spec);
  if (!valid.ok()) FUZZ_CHECK_REFUSAL(valid);

  const std::string printed = ToJson(*spec);
  const absl::StatusOr<v1::JobSpec> again = ParseRecipe(printed, "printed.json");
  FUZZ_CHECK(again.ok(), again.status().ToString() + " for " + printed);
  google::protobuf::util::DefaultFieldComparator comparator;
  comparator.set_treat_nan_as_equal(true);
  google::protobuf::util::MessageDifferencer differencer;
  differencer.set_field_comparator(&comparator);
  std::string differences;
  differencer.ReportDifferencesToString(&differences);
  FUZZ_CHECK(differencer.Compare(*spec, *again), differences);
  FUZZ_CHECK(ValidateJobSpec(*again) == valid, "validation differs after printing");
  return 0;
}
