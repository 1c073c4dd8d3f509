// Recipes: the YAML or JSON form of the JobSpec message, parsed through
// protobuf's JSON mapping so there is one schema. Static validation of a
// JobSpec lives here too, so the server rejects bad recipes at submit time
// without LibTorch.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "compress/v1/compress.pb.h"

namespace compress {

// What CalibrationData's zeros mean.
inline constexpr int kDefaultCalibrationSamples = 128;
inline constexpr int kDefaultCalibrationSequenceLength = 512;

// Parses JSON, or YAML (detected: text not starting with '{'). Enum values
// are case-insensitive ("dequantized_safetensors"). Unknown fields are an
// INVALID_ARGUMENT naming the field. `source` names the input in errors.
absl::StatusOr<compress::v1::JobSpec> ParseRecipe(const std::string& text,
                                                  const std::string& source = "recipe");
absl::StatusOr<compress::v1::JobSpec> LoadRecipeFile(const std::string& path);

// Converts YAML text to the equivalent JSON text (scalars typed: ints,
// floats, booleans, null; quoted scalars stay strings).
absl::StatusOr<std::string> YamlToJson(const std::string& yaml_text);

// Checks what can be checked without the model: a model path, at least one
// stage, every stage with a method, RTN bits in 2..8, group size -1, 0 or
// positive, include/exclude patterns that compile as RE2. INVALID_ARGUMENT
// naming the field, e.g. "stages[0].rtn.bits: 9 is outside 2..8".
absl::Status ValidateJobSpec(const compress::v1::JobSpec& spec);

// The message as JSON (for --json output and reports).
std::string ToJson(const google::protobuf::Message& message, bool pretty = false);

}  // namespace compress
