#include "worker/engine/recipe/targets.h"

#include <re2/re2.h>

#include <memory>

#include "absl/strings/str_cat.h"

namespace compress::engine {
namespace {

absl::StatusOr<std::unique_ptr<RE2>> Compile(const std::string& pattern, absl::string_view stage,
                                             absl::string_view field) {
  RE2::Options options;
  options.set_log_errors(false);
  auto re = std::make_unique<RE2>(pattern, options);
  if (!re->ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("stage ", stage, ": ", field, " pattern '", pattern,
                     "' is not a valid RE2 expression: ", re->error()));
  }
  return re;
}

}  // namespace

bool IsQuantizableWeight(const SafetensorsTensorInfo& tensor) {
  return tensor.shape.size() == 2 && IsWeightDtype(tensor.dtype) && tensor.NumElements() > 0;
}

absl::StatusOr<std::vector<std::string>> SelectTargets(
    const std::vector<SafetensorsTensorInfo>& tensors, const std::vector<std::string>& include,
    const std::vector<std::string>& exclude, absl::string_view stage) {
  const bool default_include = include.empty();
  const std::vector<std::string> include_patterns =
      default_include ? std::vector<std::string>{kDefaultLinearWeightPattern} : include;

  std::vector<bool> selected(tensors.size(), false);
  for (const std::string& pattern : include_patterns) {
    absl::StatusOr<std::unique_ptr<RE2>> re = Compile(pattern, stage, "include");
    if (!re.ok()) return re.status();
    bool matched = false;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (IsQuantizableWeight(tensors[i]) && RE2::PartialMatch(tensors[i].name, **re)) {
        selected[i] = true;
        matched = true;
      }
    }
    if (!matched) {
      return absl::InvalidArgumentError(
          absl::StrCat("stage ", stage, ": ",
                       default_include ? "the default include pattern '" : "include pattern '",
                       pattern, "' matches no 2-D F32/F16/BF16 tensor of the model",
                       default_include ? "; set include patterns for this model's names" : ""));
    }
  }
  for (const std::string& pattern : exclude) {
    absl::StatusOr<std::unique_ptr<RE2>> re = Compile(pattern, stage, "exclude");
    if (!re.ok()) return re.status();
    bool matched = false;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (RE2::PartialMatch(tensors[i].name, **re)) {
        selected[i] = false;
        matched = true;
      }
    }
    if (!matched) {
      return absl::InvalidArgumentError(absl::StrCat("stage ", stage, ": exclude pattern '",
                                                     pattern, "' matches no tensor of the model"));
    }
  }
  std::vector<std::string> targets;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (selected[i]) targets.push_back(tensors[i].name);
  }
  if (targets.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("stage ", stage, ": the exclude patterns leave no tensor to work on"));
  }
  return targets;
}

}  // namespace compress::engine
