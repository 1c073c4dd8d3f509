#include "common/stage_targets.h"

#include <re2/re2.h>

#include <map>
#include <memory>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace compress {
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

namespace {

template <typename StageMessage>
StageSelection Selection(const std::string& field, const StageMessage& stage,
                         int64_t group_size) {
  StageSelection selection;
  selection.quantizes = !std::is_same_v<StageMessage, compress::v1::PruneStage>;
  selection.field = field;
  selection.include.assign(stage.include().begin(), stage.include().end());
  selection.exclude.assign(stage.exclude().begin(), stage.exclude().end());
  selection.group_size = group_size;
  return selection;
}

}  // namespace

StageSelection SelectionOf(const compress::v1::Stage& stage, int index) {
  namespace v1 = compress::v1;
  const std::string field = absl::StrCat("stages[", index, "].");
  switch (stage.method_case()) {
    case v1::Stage::kRtn: return Selection(field + "rtn", stage.rtn(), stage.rtn().group_size());
    case v1::Stage::kGptq: return Selection(field + "gptq", stage.gptq(), stage.gptq().group_size());
    case v1::Stage::kAwq: return Selection(field + "awq", stage.awq(), stage.awq().group_size());
    case v1::Stage::kHqq: return Selection(field + "hqq", stage.hqq(), stage.hqq().group_size());
    // Blocks run over the flattened weight; the last may be partial.
    case v1::Stage::kBnb4Bit: return Selection(field + "bnb_4bit", stage.bnb_4bit(), 0);
    case v1::Stage::kPrune: {
      StageSelection selection = Selection(field + "prune", stage.prune(), 0);
      selection.prunes = true;
      selection.prune_m = stage.prune().m();
      return selection;
    }
    default: return StageSelection();
  }
}

absl::Status CheckStagesAgainstTensors(const compress::v1::JobSpec& spec,
                                       const std::vector<SafetensorsTensorInfo>& tensors) {
  std::map<std::string, const SafetensorsTensorInfo*> by_name;
  for (const SafetensorsTensorInfo& t : tensors) by_name[t.name] = &t;
  std::map<std::string, std::string> quantized_by;  // tensor -> the field of its first quantizer
  for (int i = 0; i < spec.stages_size(); ++i) {
    const StageSelection selection = SelectionOf(spec.stages(i), i);
    if (selection.field.empty()) continue;
    absl::StatusOr<std::vector<std::string>> targets =
        SelectTargets(tensors, selection.include, selection.exclude, selection.field);
    if (!targets.ok()) return targets.status();
    for (const std::string& name : *targets) {
      const SafetensorsTensorInfo& t = *by_name.at(name);
      if (selection.prune_m > 0 && t.shape[1] % selection.prune_m != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            selection.field, ".m: ", selection.prune_m, " does not divide the ", t.shape[1],
            " inputs of tensor '", name, "' [", absl::StrJoin(t.shape, ", "),
            "] (N:M runs along each row's inputs)"));
      }
      auto quantized = quantized_by.find(name);
      if (selection.prunes && quantized != quantized_by.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            selection.field, ": tensor '", name, "' is quantized by the earlier stage ",
            quantized->second, "; prune before quantizing"));
      }
      if (selection.quantizes) quantized_by.emplace(name, selection.field);
    }
    if (selection.group_size <= 0) continue;
    for (const std::string& name : *targets) {
      const SafetensorsTensorInfo& t = *by_name.at(name);
      if (t.shape[1] % selection.group_size != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            selection.field, ".group_size: ", selection.group_size, " does not divide the ",
            t.shape[1], " inputs of tensor '", name, "' [", absl::StrJoin(t.shape, ", "), "]"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace compress
