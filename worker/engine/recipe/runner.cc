#include "worker/engine/recipe/runner.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "re2/re2.h"
#include "common/files.h"
#include "common/gguf_types.h"
#include "common/recipe.h"
#include "common/sha256.h"
#include "common/stage_targets.h"
#include "common/status_macros.h"
#include "worker/engine/eval/eval.h"
#include "worker/engine/gguf/gguf_export.h"
#include "worker/engine/gguf/gguf_vocabulary.h"
#include "worker/engine/model/llama_config.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/model/safetensors_reader.h"
#include "worker/engine/model/safetensors_writer.h"
#include "worker/engine/model/tensor_dtype.h"
#include "worker/engine/prune/prune.h"
#include "worker/engine/quant/awq.h"
#include "worker/engine/quant/bnb4bit.h"
#include "worker/engine/quant/gptq.h"
#include "worker/engine/quant/hqq.h"
#include "worker/engine/quant/packing.h"
#include "worker/engine/quant/quantized_tensor.h"
#include "worker/engine/quant/rtn.h"
#include "worker/engine/recipe/awq_scaling.h"
#include "worker/engine/recipe/block_checkpoint.h"
#include "worker/engine/recipe/calibration.h"
#include "worker/engine/recipe/device.h"
#include "worker/engine/recipe/layerwise.h"
#include "worker/engine/tokenizer/tokenizer.h"
#include "worker/engine/tokenizer/unicode.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

namespace fs = std::filesystem;
namespace v1 = compress::v1;
using Clock = std::chrono::steady_clock;

// Progress runs to kWorkFraction over the tensors; the rest is writing
// indexes, configs and the report.
constexpr double kWorkFraction = 0.95;

// Files besides the weights that a loadable checkpoint needs, copied as is.
// config.json is handled separately (the packed one gains a quantization_config).
constexpr const char* kCompanionFiles[] = {
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
};

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Null-safe access to the callbacks.
class Events {
 public:
  explicit Events(const RunCallbacks& callbacks) : callbacks_(callbacks) {}
  void Progress(double fraction, const std::string& stage, const std::string& message) {
    fraction = std::clamp(fraction, last_fraction_, 1.0);  // nondecreasing, whatever the caller
    last_fraction_ = fraction;
    if (callbacks_.on_progress) callbacks_.on_progress(fraction, stage, message);
  }
  void Metric(const std::string& stage, const std::string& name, double value,
              const std::string& unit) {
    if (callbacks_.on_metric) callbacks_.on_metric(stage, name, value, unit);
  }
  void Log(const std::string& level, const std::string& text) {
    if (callbacks_.on_log) callbacks_.on_log(level, text);
  }
  bool Cancelled() { return callbacks_.is_cancelled && callbacks_.is_cancelled(); }

 private:
  const RunCallbacks& callbacks_;
  double last_fraction_ = 0.0;
};

absl::Status CancelledStatus() { return absl::CancelledError("job cancelled"); }

// ------------------------------------------------------------------ plan

enum class Method { kRtn, kGptq, kAwq, kHqq, kBnb4Bit, kMagnitude, kWanda, kSparseGpt, kSleep };

struct StagePlan {
  std::string label;  // shown in progress, metrics and the report
  Method method = Method::kRtn;
  RtnOptions rtn;    // the grid of every integer quantizer (RTN, GPTQ, AWQ, HQQ)
  GptqOptions gptq;  // GPTQ's other settings; AWQ's when it quantizes with GPTQ
  AwqOptions awq;
  bool awq_clip = false;
  bool awq_with_gptq = false;
  HqqOptions hqq;
  Bnb4BitOptions bnb;
  PruneOptions prune;  // magnitude, Wanda, SparseGPT
  int sleep_millis = 0;
  std::set<std::string> targets;

  // Filled while running.
  double seconds = 0;
  int64_t bytes_in = 0;
  int64_t bytes_out = 0;
  std::vector<v1::TensorReport> tensor_reports;
};

const char* MethodName(Method m) {
  switch (m) {
    case Method::kRtn: return "rtn";
    case Method::kGptq: return "gptq";
    case Method::kAwq: return "awq";
    case Method::kHqq: return "hqq";
    case Method::kBnb4Bit: return "bnb_4bit";
    case Method::kMagnitude: return "magnitude";
    case Method::kWanda: return "wanda";
    case Method::kSparseGpt: return "sparsegpt";
    case Method::kSleep: return "sleep";
  }
  return "?";
}

// Methods that zero weights (worker/engine/prune/); later stages keep the zeros.
bool Prunes(Method m) {
  return m == Method::kMagnitude || m == Method::kWanda || m == Method::kSparseGpt;
}

// Methods whose result is a QuantizedTensor (packed in the GPTQ layout).
bool Quantizes(Method m) {
  return m == Method::kRtn || m == Method::kGptq || m == Method::kAwq || m == Method::kHqq;
}

// StageReport.kind: what a stage does, a label small enough for metrics.
const char* StageKind(Method m) {
  if (Prunes(m)) return "prune";
  if (Quantizes(m) || m == Method::kBnb4Bit) return "quantize";
  return MethodName(m);
}

// Methods whose result the packed output stores: the integer quantizers'
// (GPTQ layout) and bitsandbytes' 4-bit formats (its own layout).
bool Packs(Method m) { return Quantizes(m) || m == Method::kBnb4Bit; }

int64_t NormalizedGroupSize(const RtnOptions& o) { return o.group_size > 0 ? o.group_size : -1; }

// The evaluate stage: not a per-tensor stage; it runs after the others.
struct EvaluatePlan {
  std::string label;
  v1::EvaluateStage spec;
};

// The fields every integer quantizer's stage message shares.
template <typename StageMessage>
void SetGrid(const StageMessage& stage, RtnOptions* grid) {
  grid->bits = stage.bits();
  grid->symmetric = stage.symmetric();
  grid->group_size = stage.group_size();
}

template <typename StageMessage>
void SetTargets(const StageMessage& stage, std::vector<std::string>* include,
                std::vector<std::string>* exclude) {
  include->assign(stage.include().begin(), stage.include().end());
  exclude->assign(stage.exclude().begin(), stage.exclude().end());
}

void SetGptqSettings(double dampening, int block_size, bool act_order, const RtnOptions& grid,
                     GptqOptions* gptq) {
  gptq->grid = grid;
  if (dampening > 0) gptq->dampening = dampening;
  if (block_size > 0) gptq->block_size = block_size;
  gptq->act_order = act_order;
}

absl::StatusOr<std::vector<StagePlan>> PlanStages(const v1::JobSpec& spec,
                                                  const SafetensorsCheckpoint& checkpoint,
                                                  std::optional<EvaluatePlan>* evaluate) {
  if (spec.stages_size() == 0 && spec.gguf_size() == 0) {
    return absl::InvalidArgumentError("the recipe has no stages (and no gguf output)");
  }
  evaluate->reset();
  std::vector<SafetensorsTensorInfo> infos;
  for (const CheckpointTensor& t : checkpoint.tensors()) infos.push_back(t.info);

  std::vector<StagePlan> plans;
  std::set<std::string> labels;
  for (int i = 0; i < spec.stages_size(); ++i) {
    const v1::Stage& stage = spec.stages(i);
    if (stage.has_evaluate()) {
      if (evaluate->has_value()) {
        return absl::InvalidArgumentError(
            absl::StrCat("stages[", i, "]: a recipe has at most one evaluate stage"));
      }
      std::string label = stage.name().empty() ? "evaluate" : stage.name();
      if (!labels.insert(label).second) label = absl::StrCat(label, "_", i + 1);
      labels.insert(label);
      *evaluate = EvaluatePlan{label, stage.evaluate()};
      continue;
    }
    StagePlan plan;
    std::vector<std::string> include, exclude;
    switch (stage.method_case()) {
      case v1::Stage::kRtn:
        plan.method = Method::kRtn;
        SetGrid(stage.rtn(), &plan.rtn);
        SetTargets(stage.rtn(), &include, &exclude);
        break;
      case v1::Stage::kGptq: {
        const v1::GptqStage& gptq = stage.gptq();
        plan.method = Method::kGptq;
        SetGrid(gptq, &plan.rtn);
        SetGptqSettings(gptq.dampening(), gptq.block_size(), gptq.act_order(), plan.rtn, &plan.gptq);
        SetTargets(gptq, &include, &exclude);
        if (absl::Status valid = ValidateGptqOptions(plan.gptq); !valid.ok()) {
          return absl::InvalidArgumentError(absl::StrCat("stages[", i, "]: ", valid.message()));
        }
        break;
      }
      case v1::Stage::kAwq: {
        const v1::AwqStage& awq = stage.awq();
        plan.method = Method::kAwq;
        SetGrid(awq, &plan.rtn);
        plan.awq.grid = plan.rtn;
        if (awq.grid_points() > 0) plan.awq.grid_points = awq.grid_points();
        plan.awq_clip = awq.clip();
        plan.awq_with_gptq = awq.quantizer() == v1::AWQ_QUANTIZER_GPTQ;
        SetGptqSettings(awq.dampening(), awq.block_size(), awq.act_order(), plan.rtn, &plan.gptq);
        SetTargets(awq, &include, &exclude);
        absl::Status valid = ValidateAwqOptions(plan.awq);
        if (valid.ok()) valid = ValidateGptqOptions(plan.gptq);
        if (!valid.ok()) {
          return absl::InvalidArgumentError(absl::StrCat("stages[", i, "]: ", valid.message()));
        }
        break;
      }
      case v1::Stage::kHqq: {
        const v1::HqqStage& hqq = stage.hqq();
        plan.method = Method::kHqq;
        SetGrid(hqq, &plan.rtn);
        plan.hqq.grid = plan.rtn;
        if (hqq.iterations() > 0) plan.hqq.iterations = hqq.iterations();
        if (hqq.lp_norm() > 0) plan.hqq.lp_norm = hqq.lp_norm();
        SetTargets(hqq, &include, &exclude);
        if (absl::Status valid = ValidateHqqOptions(plan.hqq); !valid.ok()) {
          return absl::InvalidArgumentError(absl::StrCat("stages[", i, "]: ", valid.message()));
        }
        break;
      }
      case v1::Stage::kBnb4Bit: {
        const v1::Bnb4BitStage& bnb = stage.bnb_4bit();
        plan.method = Method::kBnb4Bit;
        plan.bnb.type = bnb.type() == v1::BNB_4BIT_FP4 ? Bnb4BitType::kFp4 : Bnb4BitType::kNf4;
        if (bnb.block_size() > 0) plan.bnb.block_size = bnb.block_size();
        plan.bnb.double_quant = bnb.double_quant();
        SetTargets(bnb, &include, &exclude);
        if (absl::Status valid = ValidateBnb4BitOptions(plan.bnb); !valid.ok()) {
          return absl::InvalidArgumentError(absl::StrCat("stages[", i, "]: ", valid.message()));
        }
        break;
      }
      case v1::Stage::kPrune: {
        const v1::PruneStage& prune = stage.prune();
        plan.method = prune.method() == v1::WANDA       ? Method::kWanda
                      : prune.method() == v1::SPARSEGPT ? Method::kSparseGpt
                                                        : Method::kMagnitude;
        plan.prune.method = plan.method == Method::kWanda       ? PruneMethod::kWanda
                            : plan.method == Method::kSparseGpt ? PruneMethod::kSparseGpt
                                                                : PruneMethod::kMagnitude;
        plan.prune.sparsity = prune.sparsity();
        plan.prune.n = prune.n();
        plan.prune.m = prune.m();
        if (prune.dampening() > 0) plan.prune.dampening = prune.dampening();
        if (prune.block_size() > 0) plan.prune.block_size = prune.block_size();
        SetTargets(prune, &include, &exclude);
        if (absl::Status valid = ValidatePruneOptions(plan.prune); !valid.ok()) {
          return absl::InvalidArgumentError(absl::StrCat("stages[", i, "]: ", valid.message()));
        }
        break;
      }
      case v1::Stage::kSleep:
        plan.method = Method::kSleep;
        plan.sleep_millis = stage.sleep().millis_per_tensor();
        if (plan.sleep_millis < 0) {
          return absl::InvalidArgumentError(absl::StrCat("stages[", i, "].sleep.millis_per_tensor ",
                                                         plan.sleep_millis, " is negative"));
        }
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat("stages[", i, "] has no method"));
    }
    plan.label = stage.name().empty() ? MethodName(plan.method) : stage.name();
    if (!labels.insert(plan.label).second) plan.label = absl::StrCat(plan.label, "_", i + 1);
    labels.insert(plan.label);

    if (Quantizes(plan.method)) {
      absl::Status valid = ValidateRtnOptions(plan.rtn);
      if (!valid.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("stages[", i, "]: ", valid.message()));
      }
    }
    ASSIGN_OR_RETURN(std::vector<std::string> targets,
                     SelectTargets(infos, include, exclude, plan.label));
    plan.targets.insert(targets.begin(), targets.end());
    if (Quantizes(plan.method)) {
      // Every group-size problem is reported before any work is done.
      for (const std::string& name : targets) {
        const CheckpointTensor* t = checkpoint.Find(name);
        RETURN_IF_ERROR(RtnGroupSize(plan.rtn, t->info.shape, name).status());
      }
    }
    if (Prunes(plan.method)) {
      // N:M's m divides each target's inputs; a quantized weight is not
      // pruned afterwards (its packed codes would no longer match).
      for (const std::string& name : targets) {
        RETURN_IF_ERROR(CheckPrunable(plan.prune, checkpoint.Find(name)->info.shape, name));
        for (const StagePlan& earlier : plans) {
          if (Packs(earlier.method) && earlier.targets.count(name) > 0) {
            return absl::InvalidArgumentError(absl::StrCat(
                "stages[", i, "] (", plan.label, "): tensor '", name, "' is quantized by the "
                "earlier stage '", earlier.label, "'; prune before quantizing"));
          }
        }
      }
    }
    plans.push_back(std::move(plan));
  }
  return plans;
}

struct GgufOutputPlan {
  GgufPreset preset;
  bool importance = false;
};

struct Outputs {
  bool dequantized = false;
  bool packed = false;
  std::vector<GgufOutputPlan> gguf;
};

absl::StatusOr<Outputs> PlanOutputs(const v1::JobSpec& spec) {
  Outputs outputs;
  // No formats listed: the dequantized checkpoint, unless GGUF files are.
  if (spec.outputs_size() == 0 && spec.gguf_size() == 0) outputs.dequantized = true;
  bool gguf = spec.gguf_size() > 0;
  for (int format : spec.outputs()) {
    switch (format) {
      case v1::DEQUANTIZED_SAFETENSORS:
        outputs.dequantized = true;
        break;
      case v1::PACKED_SAFETENSORS:
        outputs.packed = true;
        break;
      case v1::GGUF:
        gguf = true;
        break;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat("output format ", format, " is not supported"));
    }
  }
  if (gguf && spec.gguf_size() == 0) outputs.gguf.push_back({*FindGgufPreset("Q4_K_M"), false});
  for (int i = 0; i < spec.gguf_size(); ++i) {
    const std::string name = spec.gguf(i).preset().empty() ? "Q4_K_M" : spec.gguf(i).preset();
    const std::optional<GgufPreset> preset = FindGgufPreset(name);
    if (!preset) {
      return absl::InvalidArgumentError(absl::StrCat("gguf[", i, "].preset: \"", name,
                                                     "\" is not a preset (", GgufPresetNames(), ")"));
    }
    outputs.gguf.push_back({*preset, spec.gguf(i).importance()});
  }
  return outputs;
}

// Per checkpoint tensor: the stages that touch it, and the RTN stage whose
// codes the packed output stores (the last one).
struct TensorPlan {
  std::vector<int> stages;
  int packing_stage = -1;
  std::string packed_prefix;  // name without ".weight"
  int64_t group_size = 0;     // of the packing stage
};

std::string PackedPrefix(const std::string& name) {
  absl::string_view prefix = name;
  absl::ConsumeSuffix(&prefix, ".weight");
  return std::string(prefix);
}

// What the packed output stores for a tensor the stage `packing` packs.
absl::StatusOr<std::vector<SafetensorsTensorSpec>> PackedSpecs(const StagePlan& packing,
                                                               const TensorPlan& plan,
                                                               const SafetensorsTensorInfo& info) {
  if (packing.method == Method::kBnb4Bit) {
    return Bnb4BitTensorSpecs(info.name, info.shape, info.dtype, packing.bnb);
  }
  return PackedLinearSpecs(plan.packed_prefix, info.shape[0], info.shape[1], packing.rtn.bits,
                           plan.group_size);
}

// Its bytes there.
int64_t PackedBytes(const StagePlan& packing, const TensorPlan& plan,
                    const SafetensorsTensorInfo& info) {
  if (packing.method == Method::kBnb4Bit) {
    return Bnb4BitSerializedBytes(info.shape, info.dtype, packing.bnb).value_or(0);
  }
  return PackedLinearBytes(info.shape[0], info.shape[1], packing.rtn.bits, plan.group_size);
}

absl::StatusOr<std::vector<TensorPlan>> PlanTensors(const SafetensorsCheckpoint& checkpoint,
                                                    const std::vector<StagePlan>& stages,
                                                    const Outputs& outputs) {
  std::vector<TensorPlan> plans(checkpoint.tensors().size());
  bool any_packed = false;
  for (size_t i = 0; i < plans.size(); ++i) {
    const CheckpointTensor& t = checkpoint.tensors()[i];
    for (size_t s = 0; s < stages.size(); ++s) {
      if (stages[s].targets.count(t.info.name) == 0) continue;
      plans[i].stages.push_back(static_cast<int>(s));
      if (Packs(stages[s].method)) plans[i].packing_stage = static_cast<int>(s);
    }
    if (plans[i].packing_stage >= 0) {
      any_packed = true;
      plans[i].packed_prefix = PackedPrefix(t.info.name);
      const StagePlan& packing = stages[plans[i].packing_stage];
      if (Quantizes(packing.method)) {
        plans[i].group_size = *RtnGroupSize(packing.rtn, t.info.shape, t.info.name);
      }
    }
  }
  if (!outputs.packed) return plans;
  if (!any_packed) {
    return absl::InvalidArgumentError(
        "PACKED_SAFETENSORS output needs a quantizing stage (rtn, gptq, awq, hqq, bnb_4bit)");
  }
  // Packed names must not collide with each other or with kept tensors.
  std::set<std::string> names;
  for (size_t i = 0; i < plans.size(); ++i) {
    const CheckpointTensor& t = checkpoint.tensors()[i];
    std::vector<std::string> produced;
    if (plans[i].packing_stage < 0) {
      produced.push_back(t.info.name);
    } else {
      ASSIGN_OR_RETURN(const std::vector<SafetensorsTensorSpec> specs,
                       PackedSpecs(stages[plans[i].packing_stage], plans[i], t.info));
      for (const SafetensorsTensorSpec& spec : specs) produced.push_back(spec.name);
    }
    for (const std::string& name : produced) {
      if (!names.insert(name).second) {
        return absl::InvalidArgumentError(absl::StrCat("packed output: tensor name '", name,
                                                       "' would be written twice (from '",
                                                       t.info.name, "')"));
      }
    }
  }
  return plans;
}

// ------------------------------------------------------------------ outputs

// A folder under output_dir being assembled in staging: its artifacts and
// its index entries.
struct OutputTree {
  std::string dir_name;  // "dequantized", "packed"
  v1::OutputFormat format = v1::OUTPUT_FORMAT_UNSPECIFIED;
  std::vector<std::pair<std::string, std::string>> weight_map;  // tensor -> shard file
  uint64_t tensor_bytes = 0;
  std::vector<ProducedArtifact> artifacts;
};

// The hidden folder outputs are assembled in; removed unless released.
class StagingFolder {
 public:
  static absl::StatusOr<StagingFolder> Create(const std::string& output_dir) {
    RETURN_IF_ERROR(MakeDirs(output_dir));
    std::mt19937_64 rng(std::random_device{}());
    std::string path =
        (fs::path(output_dir) / absl::StrCat(".partial-", ::getpid(), "-", rng() % 1000000000))
            .string();
    RETURN_IF_ERROR(MakeDirs(path));
    return StagingFolder(path);
  }
  StagingFolder(StagingFolder&& other) noexcept : path_(std::move(other.path_)) {
    other.path_.clear();
  }
  StagingFolder& operator=(StagingFolder&&) = delete;
  ~StagingFolder() {
    if (path_.empty()) return;
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  explicit StagingFolder(std::string path) : path_(std::move(path)) {}
  std::string path_;
};

absl::Status WriteSmallFile(const std::string& staging, OutputTree& tree,
                            const std::string& file_name, const std::string& contents) {
  RETURN_IF_ERROR(
      WriteFileAtomic((fs::path(staging) / tree.dir_name / file_name).string(), contents));
  tree.artifacts.push_back(ProducedArtifact{absl::StrCat(tree.dir_name, "/", file_name),
                                            tree.format, static_cast<int64_t>(contents.size()),
                                            Sha256Hex(contents)});
  return absl::OkStatus();
}

// One grid's settings as GPTQ's quantization_config spells them.
nlohmann::ordered_json GridConfig(const RtnOptions& o) {
  return {{"bits", o.bits}, {"group_size", NormalizedGroupSize(o)}, {"sym", o.symmetric}};
}

// The module a linear's weight belongs to ("model.layers.0.mlp.up_proj").
std::string ModuleRegex(const std::string& module) {
  return absl::StrCat("^", RE2::QuoteMeta(module), "$");
}

// The packed checkpoint's quantization_config: the grid most tensors use,
// and for the rest GPTQModel's "dynamic" per-module overrides (also read by
// vLLM): "+:<regex>" with the module's own bits/group_size/sym, and
// "-:<regex>" for a decoder-block linear left unquantized. The bit widths
// must share one packing (GPTQ's 2/3/4/8, or the 5/6/7-bit bit stream).
absl::StatusOr<nlohmann::ordered_json> GptqQuantizationConfig(
    const SafetensorsCheckpoint& checkpoint, const std::vector<StagePlan>& stages,
    const std::vector<TensorPlan>& plans) {
  using Grid = std::tuple<int, bool, int64_t>;
  std::map<Grid, int> uses;
  std::map<Grid, const RtnOptions*> options;
  for (const TensorPlan& plan : plans) {
    if (plan.packing_stage < 0) continue;
    const RtnOptions& o = stages[plan.packing_stage].rtn;
    const Grid grid{o.bits, o.symmetric, NormalizedGroupSize(o)};
    ++uses[grid];
    options[grid] = &o;
  }
  const Grid base = std::max_element(uses.begin(), uses.end(), [](const auto& a, const auto& b) {
                      return a.second < b.second;
                    })->first;
  const PackedFormat& format = *FindPackedFormat(std::get<0>(base));
  for (const auto& [grid, count] : uses) {
    const PackedFormat& other = *FindPackedFormat(std::get<0>(grid));
    if (absl::string_view(other.quant_method) != format.quant_method) {
      return absl::InvalidArgumentError(absl::StrCat(
          "PACKED_SAFETENSORS output: ", format.bits, "-bit (", format.name, ") and ", other.bits,
          "-bit (", other.name, ") tensors need different loaders; use bit widths of one "
          "packing (2, 3, 4, 8 or 5, 6, 7) or DEQUANTIZED_SAFETENSORS only"));
    }
  }
  const RE2 block_linear(kDefaultLinearWeightPattern);
  nlohmann::ordered_json dynamic = nlohmann::ordered_json::object();
  bool lm_head = false;
  for (size_t i = 0; i < plans.size(); ++i) {
    const SafetensorsTensorInfo& info = checkpoint.tensors()[i].info;
    const std::string module = PackedPrefix(info.name);
    if (plans[i].packing_stage < 0) {
      if (IsQuantizableWeight(info) && RE2::PartialMatch(info.name, block_linear)) {
        dynamic[absl::StrCat("-:", ModuleRegex(module))] = nlohmann::ordered_json::object();
      }
      continue;
    }
    if (module == "lm_head") lm_head = true;
    const RtnOptions& o = stages[plans[i].packing_stage].rtn;
    if (Grid{o.bits, o.symmetric, NormalizedGroupSize(o)} != base) {
      dynamic[absl::StrCat("+:", ModuleRegex(module))] = GridConfig(o);
    }
  }
  nlohmann::ordered_json config = {{"quant_method", format.quant_method}};
  config.update(GridConfig(*options[base]));
  config["desc_act"] = false;
  if (format.zero_offset == 1) {
    config["checkpoint_format"] = "gptq";  // v1: qzeros hold zero - 1
  } else {
    config["packing"] = "bitstream_le";  // see worker/engine/quant/packing.h
    config["zero_offset"] = format.zero_offset;
  }
  config["format"] = format.name;
  if (lm_head) config["lm_head"] = true;
  if (!dynamic.empty()) config["dynamic"] = std::move(dynamic);
  return config;
}

// torch's name of a weight dtype, as transformers' configs write it.
const char* TorchDtypeName(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::kF16: return "float16";
    case SafetensorsDtype::kBF16: return "bfloat16";
    default: return "float32";
  }
}

// transformers' BitsAndBytesConfig for a checkpoint of bitsandbytes 4-bit
// weights: one type, block size and double-quant setting for every packed
// tensor (the config has one of each); the linears left as they are in
// llm_int8_skip_modules, so that a loader does not expect them quantized.
absl::StatusOr<nlohmann::ordered_json> Bnb4BitQuantizationConfig(
    const SafetensorsCheckpoint& checkpoint, const std::vector<StagePlan>& stages,
    const std::vector<TensorPlan>& plans) {
  const Bnb4BitOptions* options = nullptr;
  SafetensorsDtype compute_dtype = SafetensorsDtype::kF32;
  nlohmann::ordered_json skip = nlohmann::ordered_json::array();
  const RE2 block_linear(kDefaultLinearWeightPattern);
  for (size_t i = 0; i < plans.size(); ++i) {
    const SafetensorsTensorInfo& info = checkpoint.tensors()[i].info;
    if (plans[i].packing_stage < 0) {
      if (IsQuantizableWeight(info) &&
          (RE2::PartialMatch(info.name, block_linear) || info.name == "lm_head.weight")) {
        skip.push_back(PackedPrefix(info.name));
      }
      continue;
    }
    const StagePlan& stage = stages[plans[i].packing_stage];
    if (stage.method != Method::kBnb4Bit) {
      return absl::InvalidArgumentError(absl::StrCat(
          "PACKED_SAFETENSORS output: bitsandbytes 4-bit tensors and '", info.name, "' (",
          MethodName(stage.method), ", GPTQ layout) need different loaders; pack one kind, or "
          "ask for DEQUANTIZED_SAFETENSORS only"));
    }
    const Bnb4BitOptions& o = stage.bnb;
    if (options == nullptr) {
      options = &o;
      compute_dtype = info.dtype;
    } else if (o.type != options->type || o.block_size != options->block_size ||
               o.double_quant != options->double_quant) {
      return absl::InvalidArgumentError(absl::StrCat(
          "PACKED_SAFETENSORS output: '", info.name, "' has other bitsandbytes settings (type, "
          "block_size, double_quant) than the rest; a bitsandbytes checkpoint has one setting"));
    }
  }
  return nlohmann::ordered_json{
      {"quant_method", "bitsandbytes"},
      {"load_in_4bit", true},
      {"load_in_8bit", false},
      {"bnb_4bit_quant_type", FindBnb4BitFormat(options->type).quant_type},
      {"bnb_4bit_use_double_quant", options->double_quant},
      {"bnb_4bit_compute_dtype", TorchDtypeName(compute_dtype)},
      {"bnb_4bit_quant_storage", "uint8"},
      {"llm_int8_skip_modules", skip},
      {"llm_int8_threshold", 6.0},
      {"llm_int8_has_fp16_weight", false},
      {"llm_int8_enable_fp32_cpu_offload", false},
      {"blocksize", options->block_size},
  };
}

// The packed checkpoint's quantization_config, in the layout of the stages
// that pack: GPTQ's or bitsandbytes'.
absl::StatusOr<nlohmann::ordered_json> PackedQuantizationConfig(
    const SafetensorsCheckpoint& checkpoint, const std::vector<StagePlan>& stages,
    const std::vector<TensorPlan>& plans) {
  for (const TensorPlan& plan : plans) {
    if (plan.packing_stage >= 0 && stages[plan.packing_stage].method == Method::kBnb4Bit) {
      return Bnb4BitQuantizationConfig(checkpoint, stages, plans);
    }
  }
  return GptqQuantizationConfig(checkpoint, stages, plans);
}

// config.json (the packed one with quantization_config) and the companion
// files, copied from the model folder when present.
absl::Status WriteCompanionFiles(const std::string& model_folder, const std::string& staging,
                                 OutputTree& tree,
                                 const nlohmann::ordered_json* quantization_config) {
  const fs::path folder(model_folder);
  std::error_code ec;
  const fs::path config_path = folder / "config.json";
  if (fs::is_regular_file(config_path, ec)) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(config_path.string(), int64_t{64} << 20));
    if (quantization_config != nullptr) {
      nlohmann::ordered_json config;
      try {
        config = nlohmann::ordered_json::parse(text);
      } catch (const nlohmann::json::exception& e) {
        return absl::InvalidArgumentError(
            absl::StrCat(config_path.string(), ": not valid JSON: ", e.what()));
      }
      if (!config.is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(config_path.string(), ": not a JSON object"));
      }
      config["quantization_config"] = *quantization_config;
      text = config.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
    }
    RETURN_IF_ERROR(WriteSmallFile(staging, tree, "config.json", text));
  }
  if (quantization_config != nullptr &&
      (*quantization_config)["quant_method"].get<std::string>() != "bitsandbytes") {
    // AutoGPTQ reads its settings from quantize_config.json.
    nlohmann::ordered_json quantize_config = *quantization_config;
    quantize_config.erase("quant_method");
    RETURN_IF_ERROR(
        WriteSmallFile(staging, tree, "quantize_config.json", quantize_config.dump(2) + "\n"));
  }
  for (const char* name : kCompanionFiles) {
    const fs::path path = folder / name;
    if (!fs::is_regular_file(path, ec)) continue;
    ASSIGN_OR_RETURN(std::string contents, ReadFile(path.string()));
    RETURN_IF_ERROR(WriteSmallFile(staging, tree, name, contents));
  }
  return absl::OkStatus();
}

// Moves the staged entries into output_dir. Whatever an earlier run left
// there (report.json first, so that no report describes files that are being
// replaced) is moved into the staging folder, which is then deleted. The
// report is moved in last: its presence marks a finished job.
absl::Status MoveIntoPlace(const std::string& staging, const std::string& output_dir,
                           const std::vector<std::string>& entries) {
  std::error_code ec;
  for (const char* previous :
       {kReportFileName, kDequantizedOutputDir, kPackedOutputDir, kGgufOutputDir}) {
    const fs::path to = fs::path(output_dir) / previous;
    if (!fs::exists(to, ec)) continue;
    fs::rename(to, fs::path(staging) / absl::StrCat(".replaced-", previous), ec);
    if (ec)
      return absl::InternalError(absl::StrCat("move aside ", to.string(), ": ", ec.message()));
  }
  for (const std::string& entry : entries) {
    const fs::path from = fs::path(staging) / entry;
    const fs::path to = fs::path(output_dir) / entry;
    fs::rename(from, to, ec);
    if (ec) {
      return absl::InternalError(
          absl::StrCat("move ", from.string(), " to ", to.string(), ": ", ec.message()));
    }
  }
  return absl::OkStatus();
}

// ------------------------------------------------------------------ running

struct TensorResult {
  at::Tensor dequantized;  // in the stored dtype; undefined when unchanged
  std::optional<QuantizedTensor> packing_source;
  std::optional<Bnb4BitTensor> bnb_source;  // a bitsandbytes 4-bit result
  // The packed output's tensors, when already made (read from a block checkpoint).
  std::vector<std::pair<std::string, at::Tensor>> packed_parts;
};

using Part = RunOptions::Part;

absl::Status SleepPolling(int millis, Events& events) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(millis);
  while (Clock::now() < deadline) {
    if (events.Cancelled()) return CancelledStatus();
    std::this_thread::sleep_for(
        std::min<Clock::duration>(deadline - Clock::now(), std::chrono::milliseconds(10)));
  }
  return absl::OkStatus();
}

// The decoder block a tensor belongs to: "model.layers.<n>.…" -> n.
std::optional<int64_t> LayerOf(absl::string_view name) {
  if (!absl::ConsumePrefix(&name, "model.layers.")) return std::nullopt;
  const size_t dot = name.find('.');
  int64_t layer = 0;
  if (dot == absl::string_view::npos || !absl::SimpleAtoi(name.substr(0, dot), &layer)) {
    return std::nullopt;
  }
  return layer;
}

// The linear a block weight belongs to ("model.layers.3.mlp.up_proj.weight"
// -> "mlp.up_proj"); empty for anything else.
std::string BlockLinearOf(absl::string_view name) {
  if (!absl::ConsumePrefix(&name, "model.layers.")) return "";
  name.remove_prefix(std::min(name.size(), name.find('.') + 1));
  if (!absl::ConsumeSuffix(&name, ".weight")) return "";
  const BlockLinear* linear = FindBlockLinear(name);
  return linear == nullptr ? "" : linear->name;
}

// Whether a method needs per-linear input statistics from calibration.
bool NeedsCalibration(Method m) {
  return m == Method::kGptq || m == Method::kAwq || m == Method::kWanda || m == Method::kSparseGpt;
}

// Evaluation weights: models whose two F32 copies fit this are kept
// resident; larger ones are read block by block on every forward pass.
constexpr int64_t kResidentEvaluationBytes = int64_t{4} << 30;
constexpr int64_t kDefaultEvaluationContext = 256;
constexpr int64_t kDefaultEvaluationTokens = 16384;
constexpr int64_t kDefaultSampleTokens = 48;

class JobRunner {
 public:
  JobRunner(const v1::JobSpec& spec, const RunOptions& options, Events& events,
            std::function<absl::Status(const ProducedArtifact&)> on_checkpoint)
      : spec_(spec), options_(options), events_(events), on_checkpoint_(std::move(on_checkpoint)) {}

  absl::StatusOr<RunResult> Run() {
    const Clock::time_point start = Clock::now();
    ASSIGN_OR_RETURN(device_, ParseDevice(options_.device));
    if (options_.output_dir.empty()) return absl::InvalidArgumentError("output_dir is empty");
    ASSIGN_OR_RETURN(outputs_, PlanOutputs(spec_));
    const Outputs& outputs = outputs_;
    ASSIGN_OR_RETURN(checkpoint_, SafetensorsCheckpoint::Open(options_.model_path));
    ASSIGN_OR_RETURN(stages_, PlanStages(spec_, checkpoint_, &evaluate_));
    ASSIGN_OR_RETURN(tensor_plans_, PlanTensors(checkpoint_, stages_, outputs));
    if (outputs.packed) {
      ASSIGN_OR_RETURN(quantization_config_,
                       PackedQuantizationConfig(checkpoint_, stages_, tensor_plans_));
    }
    for (size_t s = 0; s < stages_.size(); ++s) {
      calibrate_ = calibrate_ || NeedsCalibration(stages_[s].method);
      if (stages_[s].method == Method::kAwq) awq_stage_ = static_cast<int>(s);
    }
    for (const GgufOutputPlan& gguf : outputs.gguf) gguf_importance_ |= gguf.importance;
    calibrate_ = calibrate_ || gguf_importance_;
    if (calibrate_ || evaluate_ || !outputs.gguf.empty()) {
      ASSIGN_OR_RETURN(config_, ReadLlamaConfig(checkpoint_.folder()));
      RETURN_IF_ERROR(ValidateLlamaCheckpoint(*config_, checkpoint_));
    }
    if (options_.part != Part::kWhole && !calibrate_) {
      return absl::InvalidArgumentError(
          "a block-range or assemble run needs a job whose stages calibrate (gptq, awq, or a "
          "GGUF output with importance)");
    }
    PlanProductionOrder();
    for (size_t i : rest_) {
      for (int s : tensor_plans_[i].stages) {
        if (!NeedsCalibration(stages_[s].method)) continue;
        return absl::InvalidArgumentError(absl::StrCat(
            stages_[s].label, ": tensor '", checkpoint_.tensors()[i].info.name,
            "' is not a linear of a decoder block; ", MethodName(stages_[s].method),
            " needs a block linear's calibration inputs (exclude it, or use rtn for it)"));
      }
    }
    events_.Log("INFO",
                absl::StrCat("model ", options_.model_path, ": ", checkpoint_.tensors().size(),
                             " tensors in ", checkpoint_.shards().size(), " file(s); device ",
                             device_.str()));
    if (options_.part == Part::kBlocks) return RunBlockRange();
    at::Tensor calibration_ids;
    if (calibrate_ && options_.part == Part::kWhole) {
      ASSIGN_OR_RETURN(calibration_ids, LoadCalibration());
    }

    ASSIGN_OR_RETURN(StagingFolder staging, StagingFolder::Create(options_.output_dir));
    // Evaluation reads the compressed model back from the dequantized
    // checkpoint, written (and then dropped) even when not asked for.
    const bool write_dequantized = outputs.dequantized || evaluate_.has_value();
    std::vector<OutputTree*> trees;
    dequantized_.dir_name = kDequantizedOutputDir;
    dequantized_.format = v1::DEQUANTIZED_SAFETENSORS;
    packed_.dir_name = kPackedOutputDir;
    packed_.format = v1::PACKED_SAFETENSORS;
    if (write_dequantized) trees.push_back(&dequantized_);
    if (outputs.packed) trees.push_back(&packed_);
    for (OutputTree* tree : trees) {
      RETURN_IF_ERROR(MakeDirs((fs::path(staging.path()) / tree->dir_name).string()));
    }

    for (const TensorPlan& p : tensor_plans_) total_units_ += static_cast<int64_t>(p.stages.size());
    tensor_share_ = evaluate_ ? 0.6 * kWorkFraction : kWorkFraction;
    RETURN_IF_ERROR(OpenWriters(staging.path(), write_dequantized, outputs.packed));
    RETURN_IF_ERROR(OpenGgufWriters(staging.path(), outputs.gguf));
    for (size_t i : rest_) RETURN_IF_ERROR(StreamTensor(i));
    if (options_.part == Part::kAssemble) {
      RETURN_IF_ERROR(AssembleBlocks());
    } else if (calibrate_) {
      RETURN_IF_ERROR(RunBlocksLayerwise(calibration_ids));
    }
    if (events_.Cancelled()) return CancelledStatus();
    RETURN_IF_ERROR(CommitWriters());

    RETURN_IF_ERROR(CommitGgufWriters(staging.path(), &result_gguf_));
    // Indexes mirror the input's sharding; then configs and companions.
    for (OutputTree* tree : trees) {
      if (checkpoint_.sharded()) {
        RETURN_IF_ERROR(WriteSmallFile(staging.path(), *tree, kSafetensorsIndexFileName,
                                       SafetensorsIndexJson(tree->weight_map, tree->tensor_bytes)));
      }
      RETURN_IF_ERROR(WriteCompanionFiles(checkpoint_.folder(), staging.path(), *tree,
                                          tree == &packed_ ? &quantization_config_ : nullptr));
    }

    RunResult result;
    if (evaluate_) {
      RETURN_IF_ERROR(Evaluate((fs::path(staging.path()) / kDequantizedOutputDir).string(),
                               result.report.mutable_evaluation()));
    }
    BuildReport(&result.report);
    for (const v1::GgufFileReport& gguf : result_gguf_) *result.report.add_gguf() = gguf;
    for (const StagePlan& stage : stages_) {
      events_.Metric(stage.label, kMetricStageSeconds, stage.seconds, "s");
      events_.Metric(stage.label, kMetricStageBytesIn, static_cast<double>(stage.bytes_in),
                     "bytes");
      events_.Metric(stage.label, kMetricStageBytesOut, static_cast<double>(stage.bytes_out),
                     "bytes");
      events_.Metric(stage.label, kMetricStageMeanRelativeError, MeanRelativeError(stage), "ratio");
      if (std::optional<double> output_error = MeanOutputError(stage)) {
        events_.Metric(stage.label, kMetricStageMeanOutputError, *output_error, "ratio");
      }
    }
    result.report.set_seconds(Seconds(Clock::now() - start));

    std::string report_json;
    google::protobuf::util::JsonPrintOptions json_options;
    json_options.add_whitespace = true;
    json_options.always_print_primitive_fields = true;
    json_options.preserve_proto_field_names = true;
    if (!google::protobuf::util::MessageToJsonString(result.report, &report_json, json_options)
             .ok()) {
      return absl::InternalError("report: cannot convert to JSON");
    }
    RETURN_IF_ERROR(
        WriteFileAtomic((fs::path(staging.path()) / kReportFileName).string(), report_json));

    if (events_.Cancelled()) return CancelledStatus();
    std::vector<std::string> entries;
    for (OutputTree* tree : trees) {
      if (tree == &dequantized_ && !outputs.dequantized) continue;  // written for evaluation only
      entries.push_back(tree->dir_name);
      result.artifacts.insert(result.artifacts.end(), tree->artifacts.begin(),
                              tree->artifacts.end());
    }
    if (!gguf_writers_.empty()) {
      entries.push_back(kGgufOutputDir);
      result.artifacts.insert(result.artifacts.end(), gguf_.artifacts.begin(), gguf_.artifacts.end());
    }
    entries.push_back(kReportFileName);  // last: its presence marks a finished job
    result.artifacts.push_back(ProducedArtifact{kReportFileName, v1::OUTPUT_FORMAT_UNSPECIFIED,
                                                static_cast<int64_t>(report_json.size()),
                                                Sha256Hex(report_json)});
    RETURN_IF_ERROR(MoveIntoPlace(staging.path(), options_.output_dir, entries));
    events_.Progress(1.0, "", "done");
    return result;
  }

 private:
  // Part::kBlocks: the range's blocks, each committed as a checkpoint
  // (and handed to on_checkpoint) as soon as it is finished.
  absl::StatusOr<RunResult> RunBlockRange() {
    const int64_t end =
        options_.end_layer < 0 ? config_->num_hidden_layers : options_.end_layer;
    if (options_.first_layer < 0 || options_.first_layer >= end ||
        end > config_->num_hidden_layers) {
      return absl::InvalidArgumentError(absl::StrCat("layer range [", options_.first_layer, ", ",
                                                     end, ") is not within [0, ",
                                                     config_->num_hidden_layers, ")"));
    }
    ASSIGN_OR_RETURN(const at::Tensor calibration_ids, LoadCalibration());
    for (const auto& [layer, members] : blocks_) {
      if (layer < options_.first_layer || layer >= end || options_.finished_layers.count(layer)) {
        continue;
      }
      for (size_t i : members) total_units_ += static_cast<int64_t>(tensor_plans_[i].stages.size());
    }
    tensor_share_ = 1.0;
    RETURN_IF_ERROR(MakeDirs((fs::path(options_.output_dir) / kBlockCheckpointDir).string()));
    if (!options_.finished_layers.empty()) {
      events_.Log("INFO", absl::StrCat("resuming: ", options_.finished_layers.size(),
                                       " block(s) already checkpointed"));
    }
    RETURN_IF_ERROR(RunBlocksLayerwise(calibration_ids));
    if (events_.Cancelled()) return CancelledStatus();
    RunResult result;
    result.artifacts = written_checkpoints_;
    events_.Progress(1.0, "", absl::StrCat("blocks ", options_.first_layer, "-", end - 1, " done"));
    return result;
  }

  // The counters of every stage now, to take a block's share from.
  std::vector<CheckpointedStage> StageCounters() const {
    std::vector<CheckpointedStage> counters(stages_.size());
    for (size_t s = 0; s < stages_.size(); ++s) {
      counters[s].seconds = stages_[s].seconds;
      counters[s].bytes_in = stages_[s].bytes_in;
      counters[s].bytes_out = stages_[s].bytes_out;
    }
    return counters;
  }

  // A finished block's results: written to the outputs, or (Part::kBlocks)
  // committed as its checkpoint.
  absl::Status FinishBlock(int64_t layer, std::map<size_t, TensorResult>& results) {
    if (options_.part != Part::kBlocks) {
      for (size_t i : blocks_[layer]) {
        if (events_.Cancelled()) return CancelledStatus();
        auto found = results.find(i);
        RETURN_IF_ERROR(WriteTensor(i, found == results.end() ? TensorResult() : found->second));
      }
      return absl::OkStatus();
    }
    BlockCheckpoint checkpoint;
    checkpoint.layer = layer;
    for (size_t i : blocks_[layer]) {
      auto found = results.find(i);
      auto importance = importance_.find(i);
      if (found == results.end() && importance == importance_.end()) continue;
      CheckpointedTensor& t = checkpoint.tensors.emplace_back();
      t.name = checkpoint_.tensors()[i].info.name;
      if (found != results.end()) {
        t.values = found->second.dequantized;
        if (outputs_.packed) {
          ASSIGN_OR_RETURN(t.packed_parts, PackedParts(i, found->second));
        }
      }
      if (importance != importance_.end()) {
        t.importance = importance->second;
        importance_.erase(importance);
      }
    }
    const std::vector<CheckpointedStage> now = StageCounters();
    checkpoint.stages = now;
    for (size_t s = 0; s < stages_.size(); ++s) {
      CheckpointedStage& share = checkpoint.stages[s];
      share.seconds -= block_start_[s].seconds;
      share.bytes_in -= block_start_[s].bytes_in;
      share.bytes_out -= block_start_[s].bytes_out;
      const std::vector<v1::TensorReport>& reports = stages_[s].tensor_reports;
      share.tensor_reports.assign(reports.begin() + static_cast<std::ptrdiff_t>(block_reports_[s]),
                                  reports.end());
      block_reports_[s] = reports.size();
    }
    block_start_ = now;
    checkpoint.units = done_units_ - block_units_;
    block_units_ = done_units_;
    const std::string name = BlockCheckpointName(layer);
    const std::string path = (fs::path(options_.output_dir) / name).string();
    RETURN_IF_ERROR(WriteBlockCheckpoint(path, checkpoint));
    ASSIGN_OR_RETURN(const std::string sha256, Sha256OfFile(path));
    std::error_code ec;
    ProducedArtifact artifact{name, v1::OUTPUT_FORMAT_UNSPECIFIED,
                              static_cast<int64_t>(fs::file_size(path, ec)), sha256};
    written_checkpoints_.push_back(artifact);
    if (on_checkpoint_) RETURN_IF_ERROR(on_checkpoint_(artifact));
    events_.Log("INFO", absl::StrCat("layer ", layer, ": checkpoint ", name, " (",
                                     artifact.size_bytes, " bytes)"));
    return absl::OkStatus();
  }

  // The block's checkpoint, for a sequential run resuming after it: its
  // finished weights put into the block the activations run through.
  absl::Status RestoreBlock(DecoderBlockWeights& block) {
    ASSIGN_OR_RETURN(const BlockCheckpoint checkpoint, ReadCheckpoint(block.layer));
    std::map<std::string, at::Tensor*> by_name;
    for (auto& [suffix, tensor] : block.NamedTensors()) {
      by_name[BlockTensorName(block.layer, suffix)] = tensor;
    }
    for (const CheckpointedTensor& t : checkpoint.tensors) {
      if (!t.values.defined()) continue;
      auto found = by_name.find(t.name);
      if (found == by_name.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "block checkpoint for layer ", block.layer, ": tensor '", t.name, "' is not in the block"));
      }
      at::Tensor& weight = *found->second;
      RETURN_IF_ERROR(CatchTorchErrors(t.name, [&]() -> absl::Status {
        if (t.values.sizes() != weight.sizes()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "block checkpoint: tensor '", t.name, "' has another shape than the model's"));
        }
        weight = t.values.to(weight.device(), weight.scalar_type());
        return absl::OkStatus();
      }));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<BlockCheckpoint> ReadCheckpoint(int64_t layer) const {
    if (options_.checkpoint_dir.empty()) {
      return absl::InvalidArgumentError("checkpoint_dir: needed to read block checkpoints");
    }
    return ReadBlockCheckpoint((fs::path(options_.checkpoint_dir) / BlockCheckpointName(layer)).string(),
                               layer, stages_.size());
  }

  // Part::kAssemble: every block's results from its checkpoint, written to
  // the outputs in the order a whole run writes them.
  absl::Status AssembleBlocks() {
    for (const auto& [layer, members] : blocks_) {
      if (events_.Cancelled()) return CancelledStatus();
      ASSIGN_OR_RETURN(BlockCheckpoint checkpoint, ReadCheckpoint(layer));
      for (size_t s = 0; s < stages_.size(); ++s) {
        CheckpointedStage& share = checkpoint.stages[s];
        stages_[s].seconds += share.seconds;
        stages_[s].bytes_in += share.bytes_in;
        stages_[s].bytes_out += share.bytes_out;
        for (v1::TensorReport& report : share.tensor_reports) {
          stages_[s].tensor_reports.push_back(std::move(report));
        }
      }
      std::map<std::string, CheckpointedTensor*> by_name;
      for (CheckpointedTensor& t : checkpoint.tensors) by_name[t.name] = &t;
      std::map<size_t, TensorResult> results;
      for (size_t i : members) {
        const std::string& name = checkpoint_.tensors()[i].info.name;
        auto found = by_name.find(name);
        if (found == by_name.end()) continue;
        CheckpointedTensor& t = *found->second;
        by_name.erase(found);
        if (t.importance.defined()) importance_[i] = t.importance;
        if (!t.values.defined()) continue;
        if (t.values.sizes() != at::IntArrayRef(checkpoint_.tensors()[i].info.shape)) {
          return absl::InvalidArgumentError(absl::StrCat(
              "block checkpoint for layer ", layer, ": tensor '", name, "' has another shape than the model's"));
        }
        if (outputs_.packed && tensor_plans_[i].packing_stage >= 0 && t.packed_parts.empty()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "block checkpoint for layer ", layer, ": tensor '", name, "' lacks its packed form"));
        }
        TensorResult& result = results[i];
        result.dequantized = t.values;
        result.packed_parts = std::move(t.packed_parts);
      }
      if (!by_name.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("block checkpoint for layer ", layer,
                                                       ": tensor '", by_name.begin()->first,
                                                       "' is not in the block"));
      }
      done_units_ += checkpoint.units;
      RETURN_IF_ERROR(FinishBlock(layer, results));
      events_.Progress(tensor_share_ * static_cast<double>(done_units_) /
                           static_cast<double>(std::max<int64_t>(total_units_, 1)),
                       "", absl::StrCat("layer ", layer, " assembled"));
    }
    return absl::OkStatus();
  }

  // The order tensors are produced in; each output shard declares its
  // tensors in that order, so every tensor is written as soon as it is
  // final. Without calibration tensors stream one at a time in the
  // checkpoint's own order (a job that changes nothing reproduces the files
  // byte for byte). With calibration: the tensors outside the decoder blocks
  // first, then block after block (those the block loader knows; anything
  // else under model.layers, such as old rotary buffers, goes with the rest).
  void PlanProductionOrder() {
    std::set<std::string> block_tensor_names;
    if (calibrate_) {
      for (const SafetensorsTensorSpec& spec :
           LlamaCheckpointSpecs(*config_, SafetensorsDtype::kF32)) {
        if (LayerOf(spec.name)) block_tensor_names.insert(spec.name);
      }
    }
    for (size_t i = 0; i < checkpoint_.tensors().size(); ++i) {
      const std::string& name = checkpoint_.tensors()[i].info.name;
      std::optional<int64_t> layer = LayerOf(name);
      if (layer && block_tensor_names.count(name) > 0) {
        blocks_[*layer].push_back(i);
      } else {
        rest_.push_back(i);
      }
    }
  }

  std::vector<size_t> ProductionOrder() const {
    std::vector<size_t> order = rest_;
    for (const auto& [layer, members] : blocks_) order.insert(order.end(), members.begin(), members.end());
    return order;
  }

  absl::Status OpenWriters(const std::string& staging, bool dequantized, bool packed) {
    const std::vector<size_t> order = ProductionOrder();
    writers_.resize(checkpoint_.shards().size());
    for (size_t shard = 0; shard < checkpoint_.shards().size(); ++shard) {
      const SafetensorsFile& file = *checkpoint_.shards()[shard];
      const std::string file_name = FileBaseName(file.path());
      std::vector<SafetensorsTensorSpec> dequantized_specs, packed_specs;
      for (size_t i : order) {
        const CheckpointTensor& tensor = checkpoint_.tensors()[i];
        if (tensor.shard != static_cast<int>(shard)) continue;
        const SafetensorsTensorInfo& info = tensor.info;
        dequantized_specs.push_back({info.name, info.dtype, info.shape});
        const TensorPlan& plan = tensor_plans_[i];
        if (plan.packing_stage < 0) {
          packed_specs.push_back({info.name, info.dtype, info.shape});
          continue;
        }
        ASSIGN_OR_RETURN(std::vector<SafetensorsTensorSpec> specs,
                         PackedSpecs(stages_[plan.packing_stage], plan, info));
        for (SafetensorsTensorSpec& spec : specs) packed_specs.push_back(std::move(spec));
      }
      std::map<std::string, std::string> metadata = file.header().metadata;
      if (metadata.empty()) metadata["format"] = "pt";
      if (dequantized) {
        ASSIGN_OR_RETURN(SafetensorsWriter w,
                         SafetensorsWriter::Open(
                             (fs::path(staging) / kDequantizedOutputDir / file_name).string(),
                             dequantized_specs, metadata));
        writers_[shard].dequantized.emplace(std::move(w));
      }
      if (packed) {
        std::map<std::string, std::string> packed_metadata = metadata;
        packed_metadata["quantization_config"] = quantization_config_.dump();
        ASSIGN_OR_RETURN(
            SafetensorsWriter w,
            SafetensorsWriter::Open((fs::path(staging) / kPackedOutputDir / file_name).string(),
                                    packed_specs, packed_metadata));
        writers_[shard].packed.emplace(std::move(w));
      }
    }
    return absl::OkStatus();
  }

  // One GGUF writer per requested file, every tensor declared in
  // production order.
  absl::Status OpenGgufWriters(const std::string& staging, const std::vector<GgufOutputPlan>& plans) {
    if (plans.empty()) return absl::OkStatus();
    const fs::path tokenizer = fs::path(checkpoint_.folder()) / "tokenizer.json";
    std::error_code ec;
    if (!fs::is_regular_file(tokenizer, ec)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "GGUF output needs the model's tokenizer.json (", tokenizer.string(), " is missing)"));
    }
    ASSIGN_OR_RETURN(const GgufVocabulary vocabulary,
                     ReadGgufVocabulary(tokenizer.string(), config_->vocab_size));
    std::vector<GgufSourceTensor> sources;
    for (size_t i : ProductionOrder()) {
      const SafetensorsTensorInfo& info = checkpoint_.tensors()[i].info;
      sources.push_back({info.name, info.shape});
    }
    gguf_.dir_name = kGgufOutputDir;
    gguf_.format = v1::GGUF;
    RETURN_IF_ERROR(MakeDirs((fs::path(staging) / kGgufOutputDir).string()));
    std::string model_name = FileBaseName(checkpoint_.folder());
    if (model_name.empty()) model_name = "model";
    for (const GgufOutputPlan& plan : plans) {
      const std::string file_name = absl::StrCat(model_name, "-", plan.preset.name,
                                                 plan.importance ? "-imatrix" : "", ".gguf");
      GgufExportOptions options;
      options.preset = plan.preset;
      options.model_name = model_name;
      ASSIGN_OR_RETURN(GgufModelWriter writer,
                       GgufModelWriter::Open((fs::path(staging) / kGgufOutputDir / file_name).string(),
                                             *config_, vocabulary, sources, options));
      gguf_writers_.push_back({std::move(writer), plan, file_name});
    }
    return absl::OkStatus();
  }

  absl::Status CommitGgufWriters(const std::string& staging,
                                 std::vector<v1::GgufFileReport>* reports) {
    for (GgufFile& gguf : gguf_writers_) {
      const auto start = Clock::now();
      RETURN_IF_ERROR(gguf.writer.Commit());
      const std::string path = (fs::path(staging) / kGgufOutputDir / gguf.file_name).string();
      const std::string& sha256 = gguf.writer.sha256();
      gguf.seconds += Seconds(Clock::now() - start);
      std::error_code ec;
      const int64_t size = static_cast<int64_t>(fs::file_size(path, ec));
      gguf.size_bytes = size;
      const std::string name = absl::StrCat(kGgufOutputDir, "/", gguf.file_name);
      gguf_.artifacts.push_back(ProducedArtifact{name, v1::GGUF, size, sha256});
      v1::GgufFileReport& report = reports->emplace_back();
      report.set_file(name);
      report.set_preset(gguf.plan.preset.name);
      report.set_importance(gguf.plan.importance);
      report.set_size_bytes(size);
      int64_t elements = 0;
      for (const GgufTensorInfo& t : gguf.writer.header().tensors) {
        elements += t.NumElements();
        (*report.mutable_tensor_types())[GgufTypeOf(t.type).name] += 1;
      }
      report.set_bits_per_weight(elements == 0 ? 0.0 : 8.0 * static_cast<double>(size) /
                                                           static_cast<double>(elements));
    }
    return absl::OkStatus();
  }

  absl::Status CommitWriters() {
    for (size_t shard = 0; shard < writers_.size(); ++shard) {
      const std::string file_name = FileBaseName(checkpoint_.shards()[shard]->path());
      const std::pair<std::optional<SafetensorsWriter>*, OutputTree*> finished[] = {
          {&writers_[shard].dequantized, &dequantized_}, {&writers_[shard].packed, &packed_}};
      for (const auto& [writer, tree] : finished) {
        if (!writer->has_value()) continue;
        SafetensorsWriter& w = **writer;
        RETURN_IF_ERROR(w.Commit());
        tree->artifacts.push_back(ProducedArtifact{absl::StrCat(tree->dir_name, "/", file_name),
                                                   tree->format, w.bytes_written(), w.sha256()});
      }
    }
    return absl::OkStatus();
  }

  // A tensor streamed on its own: read, passed through its stages, written.
  absl::Status StreamTensor(size_t i) {
    if (events_.Cancelled()) return CancelledStatus();
    const CheckpointTensor& tensor = checkpoint_.tensors()[i];
    TensorResult result;
    if (!tensor_plans_[i].stages.empty()) {
      ASSIGN_OR_RETURN(at::Tensor loaded, checkpoint_.Load(tensor.info.name, device_));
      ASSIGN_OR_RETURN(result, TransformTensor(i, std::move(loaded), nullptr));
    }
    return WriteTensor(i, result);
  }

  // Writes tensor i's outputs: the transformed values, else its bytes as
  // stored. Everything is computed and validated before any of it is written.
  absl::Status WriteTensor(size_t i, const TensorResult& result) {
    const CheckpointTensor& tensor = checkpoint_.tensors()[i];
    const TensorPlan& plan = tensor_plans_[i];
    const std::string& name = tensor.info.name;
    const std::string file_name = FileBaseName(checkpoint_.shards()[tensor.shard]->path());
    ShardWriters& writers = writers_[tensor.shard];
    ASSIGN_OR_RETURN(absl::string_view raw, checkpoint_.RawBytes(name));
    // The packed form's tensors, named, when this tensor is packed.
    std::vector<std::pair<std::string, at::Tensor>> packed;
    if (writers.packed) {
      ASSIGN_OR_RETURN(packed, PackedParts(i, result));
    }
    // The tensor whole: changed values, else its bytes as stored.
    auto write_whole = [&](SafetensorsWriter& writer, OutputTree& tree) -> absl::Status {
      RETURN_IF_ERROR(result.dequantized.defined() ? writer.WriteTensor(name, result.dequantized)
                                                   : writer.WriteBytes(name, raw));
      tree.weight_map.emplace_back(name, file_name);
      tree.tensor_bytes += tensor.info.NumBytes();
      return absl::OkStatus();
    };
    if (writers.dequantized) RETURN_IF_ERROR(write_whole(*writers.dequantized, dequantized_));
    if (writers.packed && packed.empty()) {
      // Unquantized, or changed only by stages that do not pack.
      RETURN_IF_ERROR(write_whole(*writers.packed, packed_));
    } else if (writers.packed) {
      for (const auto& [part_name, part] : packed) {
        RETURN_IF_ERROR(writers.packed->WriteTensor(part_name, part));
        packed_.weight_map.emplace_back(part_name, file_name);
        packed_.tensor_bytes += part.nbytes();
      }
    }
    if (!gguf_writers_.empty()) {
      // GGUF re-encodes the final values (the stages' result, else as stored).
      at::Tensor values = result.dequantized;
      if (!values.defined()) {
        ASSIGN_OR_RETURN(values, checkpoint_.Load(name, at::kCPU));
      }
      auto found = importance_.find(i);
      const at::Tensor importance = found == importance_.end() ? at::Tensor() : found->second;
      for (GgufFile& gguf : gguf_writers_) {
        const auto start = Clock::now();
        RETURN_IF_ERROR(gguf.writer.Write(name, values, gguf.plan.importance ? importance : at::Tensor()));
        gguf.seconds += Seconds(Clock::now() - start);
      }
      if (found != importance_.end()) importance_.erase(found);
    }
    checkpoint_.ReleasePages(name);
    return absl::OkStatus();
  }

  // The packed output's tensors for a result, named; empty when it is not packed.
  absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> PackedParts(
      size_t i, const TensorResult& result) const {
    if (!result.packed_parts.empty()) return result.packed_parts;
    const std::string& name = checkpoint_.tensors()[i].info.name;
    if (result.packing_source) {
      const std::string& prefix = tensor_plans_[i].packed_prefix;
      ASSIGN_OR_RETURN(const PackedLinear linear, PackLinear(*result.packing_source, name));
      return std::vector<std::pair<std::string, at::Tensor>>{
          {prefix + kQweightSuffix, linear.qweight},
          {prefix + kQzerosSuffix, linear.qzeros},
          {prefix + kScalesSuffix, linear.scales},
          {prefix + kGidxSuffix, linear.g_idx}};
    }
    if (result.bnb_source) return SerializeBnb4Bit(*result.bnb_source, name);
    return std::vector<std::pair<std::string, at::Tensor>>{};
  }

  // The model folder's tokenizer.json; nullopt when there is none.
  absl::StatusOr<std::optional<Tokenizer>> ModelTokenizer() const {
    const fs::path path = fs::path(checkpoint_.folder()) / "tokenizer.json";
    std::error_code ec;
    if (!fs::is_regular_file(path, ec)) return std::optional<Tokenizer>();
    ASSIGN_OR_RETURN(Tokenizer tokenizer, Tokenizer::FromFile(path.string()));
    return std::optional<Tokenizer>(std::move(tokenizer));
  }

  absl::StatusOr<at::Tensor> LoadCalibration() {
    const v1::CalibrationData& calibration = spec_.calibration();
    const std::string path =
        options_.calibration_path.empty() ? calibration.path() : options_.calibration_path;
    if (path.empty()) {
      return absl::InvalidArgumentError(
          "calibration.path: required by the recipe's stages (a text or .tokens file)");
    }
    ASSIGN_OR_RETURN(const std::optional<Tokenizer> tokenizer, ModelTokenizer());
    CalibrationSampleOptions sample_options;
    sample_options.num_samples = calibration.num_samples() > 0 ? calibration.num_samples()
                                                               : kDefaultCalibrationSamples;
    sample_options.sequence_length = calibration.sequence_length() > 0
                                         ? calibration.sequence_length()
                                         : kDefaultCalibrationSequenceLength;
    sample_options.vocab_size = config_->vocab_size;
    ASSIGN_OR_RETURN(at::Tensor ids, LoadCalibrationSamples(path, tokenizer ? &*tokenizer : nullptr,
                                                            sample_options));
    events_.Log("INFO", absl::StrCat("calibration: ", ids.size(0), " samples of ", ids.size(1),
                                     " tokens from ", path));
    return ids;
  }

  absl::Status RunBlocksLayerwise(const at::Tensor& calibration_ids) {
    LayerwiseOptions layerwise;
    layerwise.device = device_;
    layerwise.calibration_ids = calibration_ids.to(device_);
    layerwise.propagation = spec_.calibration().propagation() == v1::PROPAGATION_PARALLEL
                                ? PropagationMode::kParallel
                                : PropagationMode::kSequential;
    layerwise.is_cancelled = [this] { return events_.Cancelled(); };
    if (options_.part == Part::kBlocks) {
      layerwise.first_layer = options_.first_layer;
      layerwise.end_layer = options_.end_layer;
    }
    block_start_ = StageCounters();
    block_reports_.assign(stages_.size(), 0);
    for (size_t s = 0; s < stages_.size(); ++s) block_reports_[s] = stages_[s].tensor_reports.size();
    block_units_ = done_units_;
    for (size_t i = 0; i < tensor_plans_.size(); ++i) {
      for (int s : tensor_plans_[i].stages) {
        if (!NeedsCalibration(stages_[s].method)) continue;
        std::string linear = BlockLinearOf(checkpoint_.tensors()[i].info.name);
        if (!linear.empty()) layerwise.statistics_for.insert(linear);
      }
    }
    if (gguf_importance_) {
      for (const BlockLinear& linear : kBlockLinears) layerwise.statistics_for.insert(linear.name);
    }
    std::map<size_t, TensorResult> pending;  // the current block's results
    std::set<size_t> prepared;               // changed by AWQ's scaling
    LayerwiseCallbacks callbacks;
    if (awq_stage_ >= 0) {
      for (const AwqScaledInput& input : AwqScaledInputs()) {
        for (const char* consumer : input.consumers) layerwise.prepare_statistics_for.insert(consumer);
      }
      callbacks.prepare = [&](DecoderBlockWeights& block, const BlockStatistics& statistics,
                              const BlockProbe& probe) {
        return PrepareAwq(block, statistics, probe, &prepared);
      };
    }
    callbacks.transform = [&](DecoderBlockWeights& block, const BlockStatistics& statistics,
                              const std::vector<std::string>& linears) -> absl::Status {
      std::map<std::string, at::Tensor*> by_name;
      for (auto& [suffix, tensor] : block.NamedTensors()) {
        by_name[BlockTensorName(block.layer, suffix)] = tensor;
      }
      const bool first_step = linears.size() == static_cast<size_t>(kNumBlockLinears) ||
                              linears == SequentialLinearSteps().front();
      if (gguf_importance_) {
        // GGUF's importance weights: the energy of each input column, as
        // the inputs reach the linear in this run.
        for (size_t i : blocks_[block.layer]) {
          const std::string linear = BlockLinearOf(checkpoint_.tensors()[i].info.name);
          if (linear.empty() || std::find(linears.begin(), linears.end(), linear) == linears.end()) {
            continue;
          }
          if (const LinearInputStatistics* stats = statistics.Find(linear)) {
            importance_[i] = stats->sum_square.to(at::kFloat);
          }
        }
      }
      for (size_t i : blocks_[block.layer]) {
        if (tensor_plans_[i].stages.empty()) continue;
        const std::string& name = checkpoint_.tensors()[i].info.name;
        // A linear's weight in its own step; anything else in the first.
        const std::string linear = BlockLinearOf(name);
        const bool now = linear.empty()
                             ? first_step
                             : std::find(linears.begin(), linears.end(), linear) != linears.end();
        if (!now) continue;
        at::Tensor* weight = by_name.at(name);
        const LinearInputStatistics* stats = statistics.Find(BlockLinearOf(name));
        ASSIGN_OR_RETURN(TensorResult result, TransformTensor(i, *weight, stats));
        if (result.dequantized.defined()) {
          // The next block's activations see the weights as stored.
          *weight = result.dequantized.to(weight->scalar_type());
        }
        pending.emplace(i, std::move(result));
      }
      return absl::OkStatus();
    };
    callbacks.finished = [&](const DecoderBlockWeights& block) -> absl::Status {
      std::map<std::string, const at::Tensor*> by_name;
      for (const auto& [suffix, tensor] : block.NamedTensors()) {
        by_name[BlockTensorName(block.layer, suffix)] = tensor;
      }
      for (size_t i : prepared) {
        if (pending.count(i) > 0) continue;
        // Rescaled but not quantized (a norm, an excluded linear): written as it is now.
        const CheckpointTensor& tensor = checkpoint_.tensors()[i];
        pending[i].dequantized = by_name.at(tensor.info.name)->to(*ToScalarType(tensor.info.dtype));
      }
      absl::Status finished = FinishBlock(block.layer, pending);
      pending.clear();
      prepared.clear();
      return finished;
    };
    callbacks.checkpointed = [this](int64_t layer) {
      return options_.finished_layers.count(layer) > 0;
    };
    callbacks.restore = [this](DecoderBlockWeights& block) { return RestoreBlock(block); };
    int64_t blocks_run = 0;
    LayerwiseCallbacks counted = callbacks;
    counted.finished = [&](const DecoderBlockWeights& block) {
      ++blocks_run;
      return callbacks.finished(block);
    };
    const Clock::time_point start = Clock::now();
    RETURN_IF_ERROR(RunLayerwise(checkpoint_, *config_, layerwise, counted));
    const double seconds = Seconds(Clock::now() - start);
    if (blocks_run > 0 && seconds > 0) {
      events_.Metric("calibration", kMetricCalibrationTokensPerSecond,
                     static_cast<double>(calibration_ids.numel() * blocks_run) / seconds,
                     "tokens/s");
    }
    return absl::OkStatus();
  }

  // The stage's quantizer on one weight (`statistics`: its input's, for the
  // calibrated methods).
  absl::StatusOr<QuantizedTensor> Quantize(const StagePlan& stage, const at::Tensor& weight,
                                           const LinearInputStatistics* statistics,
                                           const std::string& name, const at::Tensor& keep) {
    const bool calibrated = NeedsCalibration(stage.method);
    if (calibrated && (statistics == nullptr || !statistics->hessian.defined())) {
      return absl::InternalError(absl::StrCat(MethodName(stage.method), ": tensor '", name,
                                              "': no calibration statistics"));
    }
    switch (stage.method) {
      case Method::kGptq: return RunGptq(weight, stage.gptq, *statistics, name, keep);
      case Method::kAwq: {
        at::Tensor scaled = weight;
        // AutoAWQ leaves q/k unclipped: their errors meet in the attention scores.
        if (stage.awq_clip && !absl::StrContains(name, "q_proj") &&
            !absl::StrContains(name, "k_proj")) {
          ASSIGN_OR_RETURN(scaled, SearchAwqClip(weight, statistics->hessian, stage.awq, name));
        }
        if (stage.awq_with_gptq) return RunGptq(scaled, stage.gptq, *statistics, name, keep);
        return QuantizeRtn(scaled, stage.rtn, name);
      }
      case Method::kHqq: return QuantizeHqq(weight, stage.hqq, name);
      default: return QuantizeRtn(weight, stage.rtn, name);
    }
  }

  absl::StatusOr<QuantizedTensor> RunGptq(const at::Tensor& weight, const GptqOptions& options,
                                          const LinearInputStatistics& statistics,
                                          const std::string& name, const at::Tensor& keep) {
    ASSIGN_OR_RETURN(GptqResult gptq,
                     QuantizeGptq(weight, statistics.hessian, options, name, keep));
    if (gptq.retries > 0) {
      events_.Log("WARNING",
                  absl::StrFormat("gptq: tensor '%s': the Hessian was not positive definite; "
                                  "retried %d time(s), dampening %.3g of its mean diagonal",
                                  name, gptq.retries, gptq.dampening_used));
    }
    if (gptq.dead_columns > 0) {
      events_.Log("INFO", absl::StrCat("gptq: tensor '", name, "': ", gptq.dead_columns,
                                       " inputs were zero on every calibration token; their "
                                       "weights are zeroed"));
    }
    return std::move(gptq.quantized);
  }

  // AWQ's scales for one block (LayerwiseCallbacks::prepare): for each input
  // that feeds a linear the AWQ stage targets, searched on the block's
  // statistics and folded into the block. The tensors it changes are
  // recorded in `prepared` (checkpoint indexes) to be written.
  absl::Status PrepareAwq(DecoderBlockWeights& block, const BlockStatistics& statistics,
                          const BlockProbe& probe, std::set<size_t>* prepared) {
    StagePlan& stage = stages_[awq_stage_];
    const Clock::time_point start = Clock::now();
    std::map<std::string, size_t> index_of;
    for (size_t i : blocks_[block.layer]) index_of[checkpoint_.tensors()[i].info.name] = i;
    for (const AwqScaledInput& input : AwqScaledInputs()) {
      if (!AwqInputApplies(*config_, input)) continue;
      std::vector<at::Tensor> weights;
      std::vector<LinearWeights DecoderBlockWeights::*> members;
      bool targeted = false;
      for (const char* consumer : input.consumers) {
        const BlockLinear& linear = *FindBlockLinear(consumer);
        weights.push_back((block.*linear.member).weight);
        members.push_back(linear.member);
        targeted = targeted ||
                   stage.targets.count(BlockTensorName(block.layer, absl::StrCat(consumer, ".weight"))) > 0;
      }
      if (!targeted) continue;
      const LinearInputStatistics* stats = statistics.Find(input.consumers.front());
      if (stats == nullptr || stats->tokens == 0) {
        return absl::InternalError(absl::StrCat("awq: layer ", block.layer, " ", input.producer,
                                                ": no calibration statistics"));
      }
      const std::string label = BlockTensorName(block.layer, input.producer);
      ASSIGN_OR_RETURN(const at::Tensor mean_abs,
                       CatchTorchErrors(label, [&]() -> absl::StatusOr<at::Tensor> {
                         return (stats->sum_abs / static_cast<double>(stats->tokens)).to(at::kFloat);
                       }));
      // A candidate is measured by the whole block's output with these
      // linears replaced (the others as loaded).
      const AwqErrorFunction block_error =
          [&](const std::vector<at::Tensor>& candidates) -> absl::StatusOr<double> {
        DecoderBlockWeights trial = block;
        for (size_t k = 0; k < members.size(); ++k) {
          LinearWeights& linear = trial.*members[k];
          linear.weight = candidates[k].to(linear.weight.scalar_type());
        }
        return probe(trial);
      };
      ASSIGN_OR_RETURN(const AwqScales scales,
                       SearchAwqScales(weights, mean_abs, stage.awq, label, block_error));
      ASSIGN_OR_RETURN(const std::vector<std::string> changed,
                       FoldAwqScales(block, input, scales.scales));
      for (const std::string& name : changed) {
        auto found = index_of.find(BlockTensorName(block.layer, name));
        if (found != index_of.end()) prepared->insert(found->second);
      }
      events_.Log("INFO",
                  scales.exponent < 0
                      ? absl::StrFormat("awq: %s: no scaling beats plain rounding (block output error %.4g)",
                                        label, scales.unscaled_error)
                      : absl::StrFormat("awq: %s: exponent %.2f, block output error %.4g (%.3g of "
                                        "plain rounding's)",
                                        label, scales.exponent, scales.error,
                                        scales.unscaled_error > 0 ? scales.error / scales.unscaled_error : 0.0));
    }
    stage.seconds += Seconds(Clock::now() - start);
    return absl::OkStatus();
  }

  // A prune stage on one weight: `current` becomes the pruned weight (in
  // `dtype`) and the stage's mask joins `keep`, the weights later stages must
  // leave at zero. Returns the progress message.
  absl::StatusOr<std::string> PruneWeight(StagePlan& stage, size_t index, at::ScalarType dtype,
                                          const LinearInputStatistics* statistics,
                                          at::Tensor& current, at::Tensor& keep) {
    const SafetensorsTensorInfo& info = checkpoint_.tensors()[index].info;
    const std::string& name = info.name;
    if (NeedsCalibration(stage.method) &&
        (statistics == nullptr || !statistics->hessian.defined() || statistics->tokens == 0)) {
      return absl::InternalError(absl::StrCat(MethodName(stage.method), ": tensor '", name,
                                              "': no calibration statistics"));
    }
    const at::Tensor no_statistics;
    ASSIGN_OR_RETURN(PruneResult pruned,
                     Prune(current, statistics ? statistics->sum_square : no_statistics,
                           statistics ? statistics->hessian : no_statistics, stage.prune, name));
    if (pruned.retries > 0) {
      events_.Log("WARNING",
                  absl::StrFormat("sparsegpt: tensor '%s': the Hessian was not positive definite; "
                                  "retried %d time(s), dampening %.3g of its mean diagonal",
                                  name, pruned.retries, pruned.dampening_used));
    }
    ASSIGN_OR_RETURN(const at::Tensor values,
                     CatchTorchErrors(name, [&]() -> absl::StatusOr<at::Tensor> {
                       return pruned.pruned.to(dtype);
                     }));
    const int64_t bytes = static_cast<int64_t>(info.NumBytes());
    v1::TensorReport& report = stage.tensor_reports.emplace_back();
    report.set_name(name);
    for (int64_t d : info.shape) report.add_shape(d);
    ASSIGN_OR_RETURN(const double error, CatchTorchErrors(name, [&]() -> absl::StatusOr<double> {
                       return RelativeError(current, values);
                     }));
    report.set_relative_error(error);
    if (statistics != nullptr && statistics->hessian.defined()) {
      ASSIGN_OR_RETURN(const double output_error,
                       CatchTorchErrors(name, [&]() -> absl::StatusOr<double> {
                         return RelativeOutputError(current, values, statistics->hessian);
                       }));
      report.set_output_error(output_error);
    }
    report.set_sparsity(pruned.sparsity);
    report.set_bytes_before(bytes);
    report.set_bytes_after(bytes);  // stored dense
    stage.bytes_in += bytes;
    stage.bytes_out += bytes;
    keep = keep.defined() ? keep.logical_and(pruned.mask) : pruned.mask;
    current = values;
    const PruneOptions& o = stage.prune;
    return absl::StrFormat("%s: %s %s %s, sparsity %.4g, relative error %.4g",
                           MethodName(stage.method), name, ShapeString(info.shape),
                           o.semi_structured() ? absl::StrCat(o.n, ":", o.m) : "unstructured",
                           pruned.sparsity, error);
  }

  // Passes one tensor through every stage that targets it, in stage order.
  // `current` is the weight as loaded (any dtype); results are in the dtype
  // the checkpoint stores. `statistics`: its input's, when calibrated.
  absl::StatusOr<TensorResult> TransformTensor(size_t index, at::Tensor current,
                                               const LinearInputStatistics* statistics) {
    const CheckpointTensor& tensor = checkpoint_.tensors()[index];
    const TensorPlan& plan = tensor_plans_[index];
    const std::string& name = tensor.info.name;
    const at::ScalarType dtype = *ToScalarType(tensor.info.dtype);
    TensorResult result;
    at::Tensor keep;  // after a prune stage: false where weights must stay zero
    for (int s : plan.stages) {
      if (events_.Cancelled()) return CancelledStatus();
      StagePlan& stage = stages_[s];
      const Clock::time_point start = Clock::now();
      const int64_t bytes_in = static_cast<int64_t>(tensor.info.NumBytes());
      std::string message;
      if (stage.method == Method::kSleep) {
        RETURN_IF_ERROR(SleepPolling(stage.sleep_millis, events_));
        stage.bytes_in += bytes_in;
        stage.bytes_out += bytes_in;
        message = absl::StrCat("sleep: ", name);
      } else if (Prunes(stage.method)) {
        ASSIGN_OR_RETURN(message, PruneWeight(stage, index, dtype, statistics, current, keep));
        result.dequantized = current;
      } else {
        // Quantized to either form, dequantized, checked finite.
        std::optional<QuantizedTensor> q;
        std::optional<Bnb4BitTensor> bnb;
        if (stage.method == Method::kBnb4Bit) {
          ASSIGN_OR_RETURN(bnb, QuantizeBnb4Bit(current, stage.bnb, name));
          RETURN_IF_ERROR(ValidateBnb4Bit(*bnb, name));
        } else {
          ASSIGN_OR_RETURN(q, Quantize(stage, current, statistics, name, keep));
          if (keep.defined()) RETURN_IF_ERROR(KeepPrunedZeros(keep, &*q, name));
          RETURN_IF_ERROR(ValidateQuantized(*q, name));
        }
        ASSIGN_OR_RETURN(
            at::Tensor dequantized, CatchTorchErrors(name, [&]() -> absl::StatusOr<at::Tensor> {
              at::Tensor d = q ? Dequantize(*q, dtype) : DequantizeBnb4Bit(*bnb, dtype);
              if (!at::isfinite(d).all().item<bool>()) {
                return absl::InternalError(
                    absl::StrCat("tensor '", name, "': dequantized values are not finite"));
              }
              if (keep.defined() && d.masked_select(keep.logical_not()).ne(0).any().item<bool>()) {
                return absl::InternalError(absl::StrCat(
                    MethodName(stage.method), ": tensor '", name, "': pruned weights became nonzero"));
              }
              return d;
            }));
        ASSIGN_OR_RETURN(const double error,
                         CatchTorchErrors(name, [&]() -> absl::StatusOr<double> {
                           return RelativeError(current, dequantized);
                         }));
        const int64_t bytes_out = PackedBytes(stage, plan, tensor.info);
        const int bits = q ? q->bits : 4;
        v1::TensorReport& report = stage.tensor_reports.emplace_back();
        report.set_name(name);
        for (int64_t d : tensor.info.shape) report.add_shape(d);
        report.set_bits(bits);
        report.set_relative_error(error);
        if (statistics != nullptr && statistics->hessian.defined()) {
          ASSIGN_OR_RETURN(const double output_error,
                           CatchTorchErrors(name, [&]() -> absl::StatusOr<double> {
                             return RelativeOutputError(current, dequantized,
                                                        statistics->hessian);
                           }));
          report.set_output_error(output_error);
          if (stage.method == Method::kGptq) {
            ASSIGN_OR_RETURN(const QuantizedTensor rtn, QuantizeRtn(current, stage.rtn, name));
            ASSIGN_OR_RETURN(const double rtn_error,
                             CatchTorchErrors(name, [&]() -> absl::StatusOr<double> {
                               return RelativeOutputError(current, Dequantize(rtn, dtype),
                                                          statistics->hessian);
                             }));
            report.set_rtn_output_error(rtn_error);
          }
        }
        report.set_bytes_before(bytes_in);
        report.set_bytes_after(bytes_out);
        stage.bytes_in += bytes_in;
        stage.bytes_out += bytes_out;
        message = absl::StrFormat("%s: %s %s %d-bit, relative error %.4g", MethodName(stage.method),
                                  name, ShapeString(tensor.info.shape), bits, error);
        current = dequantized;
        result.dequantized = dequantized;
        if (s == plan.packing_stage) {
          result.packing_source = std::move(q);
          result.bnb_source = std::move(bnb);
        }
      }
      stage.seconds += Seconds(Clock::now() - start);
      ++done_units_;
      events_.Progress(tensor_share_ * static_cast<double>(done_units_) /
                           static_cast<double>(std::max<int64_t>(total_units_, 1)),
                       stage.label,
                       absl::StrCat(message, " (", done_units_, "/", total_units_, ")"));
    }
    return result;
  }

  // Perplexity of the original and of `compressed_dir` on the evaluation
  // text, the compressed model's divergence from the original on the same
  // windows, and a greedy sample from each.
  absl::Status Evaluate(const std::string& compressed_dir, v1::EvaluationReport* report) {
    const Clock::time_point start = Clock::now();
    const EvaluatePlan& plan = *evaluate_;
    const std::string& label = plan.label;
    const std::string text_path =
        options_.evaluation_path.empty() ? plan.spec.text_path() : options_.evaluation_path;
    ASSIGN_OR_RETURN(const std::optional<Tokenizer> model_tokenizer, ModelTokenizer());
    if (!model_tokenizer) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": the evaluate stage needs the model's tokenizer.json (",
                       checkpoint_.folder(), "/tokenizer.json is missing)"));
    }
    const Tokenizer& tokenizer = *model_tokenizer;
    ASSIGN_OR_RETURN(const std::string text, ReadFile(text_path));
    const std::vector<int32_t> tokens = tokenizer.Encode(text);

    PerplexityOptions windows;
    windows.context_length =
        plan.spec.context_length() > 0 ? plan.spec.context_length() : kDefaultEvaluationContext;
    windows.context_length = std::min(windows.context_length, config_->max_position_embeddings);
    windows.stride = plan.spec.stride() > 0 ? std::min<int64_t>(plan.spec.stride(), windows.context_length)
                                            : std::max<int64_t>(1, windows.context_length / 2);
    windows.max_tokens =
        plan.spec.max_tokens() > 0 ? plan.spec.max_tokens() : kDefaultEvaluationTokens;
    windows.is_cancelled = [this] { return events_.Cancelled(); };

    LlamaLoadOptions load;
    load.device = device_;
    int64_t parameters = 0;
    for (const CheckpointTensor& t : checkpoint_.tensors()) parameters += t.info.NumElements();
    load.resident = 2 * 4 * parameters <= kResidentEvaluationBytes;
    const double begin_fraction = tensor_share_;
    events_.Progress(begin_fraction, label,
                     absl::StrCat("evaluating on ", std::min<int64_t>(tokens.size(), windows.max_tokens),
                                  " tokens of ", text_path));
    ASSIGN_OR_RETURN(const LlamaModel original, LlamaModel::Load(checkpoint_.folder(), load));
    ASSIGN_OR_RETURN(const LlamaModel compressed, LlamaModel::Load(compressed_dir, load));
    ASSIGN_OR_RETURN(const DivergenceResult divergence,
                     CompareToReference(original, compressed, tokens, windows));
    const double after_compare = begin_fraction + 0.8 * (kWorkFraction - begin_fraction);
    events_.Progress(after_compare, label,
                     absl::StrFormat("perplexity %.4g -> %.4g, KL %.4g", divergence.reference.perplexity,
                                     divergence.candidate.perplexity, divergence.mean_kl));

    report->set_text_path(plan.spec.text_path());
    report->set_context_length(static_cast<int32_t>(divergence.reference.context_length));
    report->set_stride(static_cast<int32_t>(divergence.reference.stride));
    report->set_sample_prompt(plan.spec.sample_prompt());
    const std::pair<const PerplexityResult*, v1::ModelEvaluation*> models[] = {
        {&divergence.reference, report->mutable_before()},
        {&divergence.candidate, report->mutable_after()}};
    for (const auto& [result, evaluation] : models) {
      evaluation->set_perplexity(result->perplexity);
      evaluation->set_tokens_scored(result->tokens_scored);
      evaluation->set_tokens_per_second(result->tokens_per_second);
    }
    report->set_mean_kl_divergence(divergence.mean_kl);
    report->set_max_kl_divergence(divergence.max_kl);
    report->set_top1_agreement(divergence.top1_agreement);

    if (!plan.spec.sample_prompt().empty()) {
      GenerateOptions generate;  // greedy: before and after are comparable
      generate.max_new_tokens =
          plan.spec.sample_tokens() > 0 ? plan.spec.sample_tokens() : kDefaultSampleTokens;
      generate.on_token = [this](int32_t, const at::Tensor&) {
        return events_.Cancelled() ? CancelledStatus() : absl::OkStatus();
      };
      const std::pair<const LlamaModel*, v1::ModelEvaluation*> samplers[] = {
          {&original, report->mutable_before()}, {&compressed, report->mutable_after()}};
      for (const auto& [model, evaluation] : samplers) {
        ASSIGN_OR_RETURN(SampleResult sample,
                         SampleText(*model, tokenizer, plan.spec.sample_prompt(), generate));
        evaluation->set_sample(ToValidUtf8(sample.completion));
      }
    }
    report->set_seconds(Seconds(Clock::now() - start));
    events_.Metric(label, "perplexity_before", report->before().perplexity(), "");
    events_.Metric(label, "perplexity_after", report->after().perplexity(), "");
    events_.Metric(label, "mean_kl_divergence", report->mean_kl_divergence(), "nats");
    events_.Metric(label, "top1_agreement", report->top1_agreement(), "ratio");
    events_.Metric(label, kMetricStageSeconds, report->seconds(), "s");
    events_.Progress(kWorkFraction, label, "evaluation done");
    return absl::OkStatus();
  }

  static std::optional<double> MeanOutputError(const StagePlan& stage) {
    double sum = 0;
    int count = 0;
    for (const v1::TensorReport& t : stage.tensor_reports) {
      if (t.output_error() <= 0) continue;
      sum += t.output_error();
      ++count;
    }
    if (count == 0) return std::nullopt;
    return sum / count;
  }

  static double MeanRelativeError(const StagePlan& stage) {
    if (stage.tensor_reports.empty()) return 0.0;
    double sum = 0;
    for (const v1::TensorReport& t : stage.tensor_reports) sum += t.relative_error();
    return sum / static_cast<double>(stage.tensor_reports.size());
  }

  void BuildReport(v1::JobReport* report) const {
    int64_t before = 0, after = 0, parameters = 0, quantized_parameters = 0, quantized_bytes = 0;
    for (size_t i = 0; i < checkpoint_.tensors().size(); ++i) {
      const SafetensorsTensorInfo& info = checkpoint_.tensors()[i].info;
      const TensorPlan& plan = tensor_plans_[i];
      const int64_t bytes = static_cast<int64_t>(info.NumBytes());
      before += bytes;
      parameters += info.NumElements();
      if (plan.packing_stage < 0) {
        after += bytes;
        continue;
      }
      const int64_t packed = PackedBytes(stages_[plan.packing_stage], plan, checkpoint_.tensors()[i].info);
      after += packed;
      quantized_bytes += packed;
      quantized_parameters += info.NumElements();
    }
    report->set_size_before_bytes(before);
    report->set_size_after_bytes(after);
    report->set_parameters(parameters);
    report->set_quantized_parameters(quantized_parameters);
    report->set_bits_per_weight(quantized_parameters == 0
                                    ? 0.0
                                    : 8.0 * static_cast<double>(quantized_bytes) /
                                          static_cast<double>(quantized_parameters));
    for (const StagePlan& stage : stages_) {
      v1::StageReport* s = report->add_stages();
      s->set_name(stage.label);
      s->set_kind(StageKind(stage.method));
      s->set_method(MethodName(stage.method));
      s->set_seconds(stage.seconds);
      s->set_bytes_in(stage.bytes_in);
      s->set_bytes_out(stage.bytes_out);
      s->set_mean_relative_error(MeanRelativeError(stage));
      s->set_mean_output_error(MeanOutputError(stage).value_or(0.0));
      for (const v1::TensorReport& t : stage.tensor_reports) *s->add_tensors() = t;
    }
    if (!gguf_writers_.empty()) {
      // Encoding runs tensor by tensor beside the stages; its time is its own.
      v1::StageReport* s = report->add_stages();
      s->set_name("gguf");
      s->set_kind("export");
      s->set_method("gguf");
      for (const GgufFile& gguf : gguf_writers_) {
        s->set_seconds(s->seconds() + gguf.seconds);
        s->set_bytes_out(s->bytes_out() + gguf.size_bytes);
      }
    }
    if (evaluate_) {
      v1::StageReport* s = report->add_stages();
      s->set_name(evaluate_->label);
      s->set_kind("evaluate");
      s->set_method("evaluate");
      s->set_seconds(report->evaluation().seconds());
    }
  }

  struct ShardWriters {
    std::optional<SafetensorsWriter> dequantized;
    std::optional<SafetensorsWriter> packed;
  };

  const v1::JobSpec& spec_;
  const RunOptions& options_;
  Events& events_;
  const std::function<absl::Status(const ProducedArtifact&)> on_checkpoint_;
  Outputs outputs_;
  c10::Device device_ = c10::Device(c10::kCPU);
  SafetensorsCheckpoint checkpoint_;
  std::optional<LlamaConfig> config_;  // when calibrating or evaluating
  std::vector<StagePlan> stages_;
  std::optional<EvaluatePlan> evaluate_;
  bool calibrate_ = false;
  bool gguf_importance_ = false;  // a GGUF output weights its search by calibration energy
  int awq_stage_ = -1;  // at most one AWQ stage (its scales change the block)
  std::vector<TensorPlan> tensor_plans_;
  nlohmann::ordered_json quantization_config_;  // the packed output's
  std::vector<size_t> rest_;                     // tensors outside the blocks
  std::map<int64_t, std::vector<size_t>> blocks_;  // layer -> its tensors
  std::vector<ShardWriters> writers_;            // per input shard
  OutputTree dequantized_;
  OutputTree packed_;
  OutputTree gguf_;  // its artifacts; the files are written by gguf_writers_
  struct GgufFile {
    GgufModelWriter writer;
    GgufOutputPlan plan;
    std::string file_name;
    double seconds = 0;  // in Write and Commit
    int64_t size_bytes = 0;
  };
  std::vector<GgufFile> gguf_writers_;
  std::vector<v1::GgufFileReport> result_gguf_;
  // Per block linear (checkpoint index): sum of x^2 per input column on the
  // calibration samples, kept until the tensor is written (GGUF importance).
  std::map<size_t, at::Tensor> importance_;
  int64_t total_units_ = 0;
  int64_t done_units_ = 0;
  // Part::kBlocks: the counters when the current block began, and the
  // checkpoints committed so far.
  std::vector<CheckpointedStage> block_start_;
  std::vector<size_t> block_reports_;
  int64_t block_units_ = 0;
  std::vector<ProducedArtifact> written_checkpoints_;
  double tensor_share_ = kWorkFraction;  // of the progress, for the tensors
};

}  // namespace

absl::StatusOr<RunResult> RunJob(const compress::v1::JobSpec& spec, const RunOptions& options,
                                 const RunCallbacks& callbacks) {
  ReturnLargeAllocationsToTheSystem();
  Events events(callbacks);
  // The boundary: nothing thrown inside the engine gets past here.
  return CatchTorchErrors("engine", [&]() -> absl::StatusOr<RunResult> {
    c10::InferenceMode inference_mode;
    JobRunner runner(spec, options, events, callbacks.on_checkpoint);
    return runner.Run();
  });
}

}  // namespace compress::engine
