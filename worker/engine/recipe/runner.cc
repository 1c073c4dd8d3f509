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
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/files.h"
#include "common/sha256.h"
#include "common/status_macros.h"
#include "worker/engine/model/safetensors_reader.h"
#include "worker/engine/model/safetensors_writer.h"
#include "worker/engine/quant/packing.h"
#include "worker/engine/quant/quantized_tensor.h"
#include "worker/engine/quant/rtn.h"
#include "worker/engine/recipe/device.h"
#include "worker/engine/recipe/targets.h"
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

enum class Method { kRtn, kSleep };

struct StagePlan {
  std::string label;  // shown in progress, metrics and the report
  Method method = Method::kRtn;
  RtnOptions rtn;
  int sleep_millis = 0;
  std::set<std::string> targets;

  // Filled while running.
  double seconds = 0;
  int64_t bytes_in = 0;
  int64_t bytes_out = 0;
  std::vector<v1::TensorReport> tensor_reports;
};

const char* MethodName(Method m) { return m == Method::kRtn ? "rtn" : "sleep"; }

int64_t NormalizedGroupSize(const RtnOptions& o) { return o.group_size > 0 ? o.group_size : -1; }

absl::StatusOr<std::vector<StagePlan>> PlanStages(const v1::JobSpec& spec,
                                                  const SafetensorsCheckpoint& checkpoint) {
  if (spec.stages_size() == 0) return absl::InvalidArgumentError("the recipe has no stages");
  std::vector<SafetensorsTensorInfo> infos;
  for (const CheckpointTensor& t : checkpoint.tensors()) infos.push_back(t.info);

  std::vector<StagePlan> plans;
  std::set<std::string> labels;
  for (int i = 0; i < spec.stages_size(); ++i) {
    const v1::Stage& stage = spec.stages(i);
    StagePlan plan;
    std::vector<std::string> include, exclude;
    switch (stage.method_case()) {
      case v1::Stage::kRtn:
        plan.method = Method::kRtn;
        plan.rtn.bits = stage.rtn().bits();
        plan.rtn.symmetric = stage.rtn().symmetric();
        plan.rtn.group_size = stage.rtn().group_size();
        include.assign(stage.rtn().include().begin(), stage.rtn().include().end());
        exclude.assign(stage.rtn().exclude().begin(), stage.rtn().exclude().end());
        break;
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

    if (plan.method == Method::kRtn) {
      absl::Status valid = ValidateRtnOptions(plan.rtn);
      if (!valid.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("stages[", i, "]: ", valid.message()));
      }
    }
    ASSIGN_OR_RETURN(std::vector<std::string> targets,
                     SelectTargets(infos, include, exclude, plan.label));
    plan.targets.insert(targets.begin(), targets.end());
    if (plan.method == Method::kRtn) {
      // Every group-size problem is reported before any work is done.
      for (const std::string& name : targets) {
        const CheckpointTensor* t = checkpoint.Find(name);
        RETURN_IF_ERROR(RtnGroupSize(plan.rtn, t->info.shape, name).status());
      }
    }
    plans.push_back(std::move(plan));
  }
  return plans;
}

struct Outputs {
  bool dequantized = false;
  bool packed = false;
};

absl::StatusOr<Outputs> PlanOutputs(const v1::JobSpec& spec) {
  Outputs outputs;
  if (spec.outputs_size() == 0) outputs.dequantized = true;
  for (int format : spec.outputs()) {
    switch (format) {
      case v1::DEQUANTIZED_SAFETENSORS:
        outputs.dequantized = true;
        break;
      case v1::PACKED_SAFETENSORS:
        outputs.packed = true;
        break;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat("output format ", format, " is not supported"));
    }
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

absl::StatusOr<std::vector<TensorPlan>> PlanTensors(const SafetensorsCheckpoint& checkpoint,
                                                    const std::vector<StagePlan>& stages,
                                                    const Outputs& outputs,
                                                    const RtnOptions** packed_options) {
  std::vector<TensorPlan> plans(checkpoint.tensors().size());
  std::set<std::tuple<int, bool, int64_t>> rtn_configs;
  *packed_options = nullptr;
  for (size_t i = 0; i < plans.size(); ++i) {
    const CheckpointTensor& t = checkpoint.tensors()[i];
    for (size_t s = 0; s < stages.size(); ++s) {
      if (stages[s].targets.count(t.info.name) == 0) continue;
      plans[i].stages.push_back(static_cast<int>(s));
      if (stages[s].method == Method::kRtn) {
        plans[i].packing_stage = static_cast<int>(s);
        const RtnOptions& o = stages[s].rtn;
        rtn_configs.emplace(o.bits, o.symmetric, NormalizedGroupSize(o));
        *packed_options = &o;
      }
    }
    if (plans[i].packing_stage >= 0) {
      plans[i].packed_prefix = PackedPrefix(t.info.name);
      plans[i].group_size =
          *RtnGroupSize(stages[plans[i].packing_stage].rtn, t.info.shape, t.info.name);
    }
  }
  if (!outputs.packed) return plans;

  // A packed checkpoint has one quantization_config.
  if (rtn_configs.empty()) {
    return absl::InvalidArgumentError("PACKED_SAFETENSORS output needs an rtn stage");
  }
  if (rtn_configs.size() > 1) {
    return absl::InvalidArgumentError(
        "PACKED_SAFETENSORS output needs one RTN configuration (bits, symmetric, group_size) "
        "for all quantized tensors; the rtn stages differ");
  }
  // Packed names must not collide with each other or with kept tensors.
  std::set<std::string> names;
  for (size_t i = 0; i < plans.size(); ++i) {
    const CheckpointTensor& t = checkpoint.tensors()[i];
    std::vector<std::string> produced;
    if (plans[i].packing_stage < 0) {
      produced.push_back(t.info.name);
    } else {
      for (const char* suffix : {kQweightSuffix, kQzerosSuffix, kScalesSuffix, kGidxSuffix}) {
        produced.push_back(plans[i].packed_prefix + suffix);
      }
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

nlohmann::ordered_json QuantizationConfig(const RtnOptions& o) {
  const PackedFormat& format = *FindPackedFormat(o.bits);
  nlohmann::ordered_json config = {
      {"quant_method", format.quant_method},
      {"bits", o.bits},
      {"group_size", NormalizedGroupSize(o)},
      {"desc_act", false},
      {"sym", o.symmetric},
  };
  if (format.zero_offset == 1) {
    config["checkpoint_format"] = "gptq";  // v1: qzeros hold zero - 1
  } else {
    config["packing"] = "bitstream_le";  // see worker/engine/quant/packing.h
    config["zero_offset"] = format.zero_offset;
  }
  config["format"] = format.name;
  return config;
}

// config.json (the packed one with quantization_config) and the companion
// files, copied from the model folder when present.
absl::Status WriteCompanionFiles(const std::string& model_folder, const std::string& staging,
                                 OutputTree& tree, const RtnOptions* packed_options) {
  const fs::path folder(model_folder);
  std::error_code ec;
  const fs::path config_path = folder / "config.json";
  if (fs::is_regular_file(config_path, ec)) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(config_path.string(), int64_t{64} << 20));
    if (packed_options != nullptr) {
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
      config["quantization_config"] = QuantizationConfig(*packed_options);
      text = config.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
    }
    RETURN_IF_ERROR(WriteSmallFile(staging, tree, "config.json", text));
  }
  if (packed_options != nullptr) {
    // AutoGPTQ reads its settings from quantize_config.json.
    nlohmann::ordered_json quantize_config = QuantizationConfig(*packed_options);
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
  for (const char* previous : {kReportFileName, kDequantizedOutputDir, kPackedOutputDir}) {
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
  at::Tensor dequantized;  // in the input dtype; undefined when unchanged
  std::optional<QuantizedTensor> packing_source;
};

absl::Status SleepPolling(int millis, Events& events) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(millis);
  while (Clock::now() < deadline) {
    if (events.Cancelled()) return CancelledStatus();
    std::this_thread::sleep_for(
        std::min<Clock::duration>(deadline - Clock::now(), std::chrono::milliseconds(10)));
  }
  return absl::OkStatus();
}

class JobRunner {
 public:
  JobRunner(const v1::JobSpec& spec, const RunOptions& options, Events& events)
      : spec_(spec), options_(options), events_(events) {}

  absl::StatusOr<RunResult> Run() {
    const Clock::time_point start = Clock::now();
    ASSIGN_OR_RETURN(device_, ParseDevice(options_.device));
    if (options_.output_dir.empty()) return absl::InvalidArgumentError("output_dir is empty");
    ASSIGN_OR_RETURN(const Outputs outputs, PlanOutputs(spec_));
    ASSIGN_OR_RETURN(checkpoint_, SafetensorsCheckpoint::Open(options_.model_path));
    ASSIGN_OR_RETURN(stages_, PlanStages(spec_, checkpoint_));
    ASSIGN_OR_RETURN(tensor_plans_, PlanTensors(checkpoint_, stages_, outputs, &packed_options_));
    events_.Log("INFO",
                absl::StrCat("model ", options_.model_path, ": ", checkpoint_.tensors().size(),
                             " tensors in ", checkpoint_.shards().size(), " file(s); device ",
                             device_.str()));

    ASSIGN_OR_RETURN(StagingFolder staging, StagingFolder::Create(options_.output_dir));
    std::vector<OutputTree*> trees;
    dequantized_.dir_name = kDequantizedOutputDir;
    dequantized_.format = v1::DEQUANTIZED_SAFETENSORS;
    packed_.dir_name = kPackedOutputDir;
    packed_.format = v1::PACKED_SAFETENSORS;
    if (outputs.dequantized) trees.push_back(&dequantized_);
    if (outputs.packed) trees.push_back(&packed_);
    for (OutputTree* tree : trees) {
      RETURN_IF_ERROR(MakeDirs((fs::path(staging.path()) / tree->dir_name).string()));
    }

    for (const TensorPlan& p : tensor_plans_) total_units_ += static_cast<int64_t>(p.stages.size());
    for (size_t shard = 0; shard < checkpoint_.shards().size(); ++shard) {
      RETURN_IF_ERROR(RunShard(static_cast<int>(shard), staging.path(), outputs));
    }
    if (events_.Cancelled()) return CancelledStatus();

    // Indexes mirror the input's sharding; then configs and companions.
    for (OutputTree* tree : trees) {
      if (checkpoint_.sharded()) {
        RETURN_IF_ERROR(WriteSmallFile(staging.path(), *tree, kSafetensorsIndexFileName,
                                       SafetensorsIndexJson(tree->weight_map, tree->tensor_bytes)));
      }
      RETURN_IF_ERROR(WriteCompanionFiles(checkpoint_.folder(), staging.path(), *tree,
                                          tree == &packed_ ? packed_options_ : nullptr));
    }

    RunResult result;
    BuildReport(&result.report);
    for (const StagePlan& stage : stages_) {
      events_.Metric(stage.label, kMetricStageSeconds, stage.seconds, "s");
      events_.Metric(stage.label, kMetricStageBytesIn, static_cast<double>(stage.bytes_in),
                     "bytes");
      events_.Metric(stage.label, kMetricStageBytesOut, static_cast<double>(stage.bytes_out),
                     "bytes");
      events_.Metric(stage.label, kMetricStageMeanRelativeError, MeanRelativeError(stage), "ratio");
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
      entries.push_back(tree->dir_name);
      result.artifacts.insert(result.artifacts.end(), tree->artifacts.begin(),
                              tree->artifacts.end());
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
  absl::Status RunShard(int shard, const std::string& staging, const Outputs& outputs) {
    const SafetensorsFile& file = *checkpoint_.shards()[shard];
    const std::string file_name = FileBaseName(file.path());
    std::vector<size_t> members;  // indexes into checkpoint_.tensors(), data order
    for (size_t i = 0; i < checkpoint_.tensors().size(); ++i) {
      if (checkpoint_.tensors()[i].shard == shard) members.push_back(i);
    }

    std::map<std::string, std::string> metadata = file.header().metadata;
    if (metadata.empty()) metadata["format"] = "pt";
    std::optional<SafetensorsWriter> dequantized_writer;
    std::optional<SafetensorsWriter> packed_writer;
    if (outputs.dequantized) {
      std::vector<SafetensorsTensorSpec> specs;
      for (size_t i : members) {
        const SafetensorsTensorInfo& info = checkpoint_.tensors()[i].info;
        specs.push_back({info.name, info.dtype, info.shape});
      }
      ASSIGN_OR_RETURN(
          SafetensorsWriter w,
          SafetensorsWriter::Open((fs::path(staging) / kDequantizedOutputDir / file_name).string(),
                                  specs, metadata));
      dequantized_writer.emplace(std::move(w));
    }
    if (outputs.packed) {
      std::vector<SafetensorsTensorSpec> specs;
      for (size_t i : members) {
        const SafetensorsTensorInfo& info = checkpoint_.tensors()[i].info;
        const TensorPlan& plan = tensor_plans_[i];
        if (plan.packing_stage < 0) {
          specs.push_back({info.name, info.dtype, info.shape});
          continue;
        }
        for (SafetensorsTensorSpec& spec :
             PackedLinearSpecs(plan.packed_prefix, info.shape[0], info.shape[1],
                               stages_[plan.packing_stage].rtn.bits, plan.group_size)) {
          specs.push_back(std::move(spec));
        }
      }
      std::map<std::string, std::string> packed_metadata = metadata;
      packed_metadata["quantization_config"] = QuantizationConfig(*packed_options_).dump();
      ASSIGN_OR_RETURN(
          SafetensorsWriter w,
          SafetensorsWriter::Open((fs::path(staging) / kPackedOutputDir / file_name).string(),
                                  specs, packed_metadata));
      packed_writer.emplace(std::move(w));
    }

    for (size_t i : members) {
      if (events_.Cancelled()) return CancelledStatus();
      const CheckpointTensor& tensor = checkpoint_.tensors()[i];
      const TensorPlan& plan = tensor_plans_[i];
      const std::string& name = tensor.info.name;
      ASSIGN_OR_RETURN(absl::string_view raw, checkpoint_.RawBytes(name));

      TensorResult result;
      if (!plan.stages.empty()) {
        ASSIGN_OR_RETURN(result, TransformTensor(tensor, plan));
      }
      // Everything this tensor produces is computed and validated before any
      // of it is written.
      std::optional<PackedLinear> packed;
      if (packed_writer && result.packing_source) {
        ASSIGN_OR_RETURN(packed, PackLinear(*result.packing_source, name));
      }
      if (dequantized_writer) {
        if (result.dequantized.defined()) {
          RETURN_IF_ERROR(dequantized_writer->WriteTensor(name, result.dequantized));
        } else {
          RETURN_IF_ERROR(dequantized_writer->WriteBytes(name, raw));
        }
        dequantized_.weight_map.emplace_back(name, file_name);
        dequantized_.tensor_bytes += tensor.info.NumBytes();
      }
      if (packed_writer) {
        if (packed) {
          const std::pair<const char*, const at::Tensor*> parts[] = {
              {kQweightSuffix, &packed->qweight},
              {kQzerosSuffix, &packed->qzeros},
              {kScalesSuffix, &packed->scales},
              {kGidxSuffix, &packed->g_idx}};
          for (const auto& [suffix, part] : parts) {
            const std::string part_name = plan.packed_prefix + suffix;
            RETURN_IF_ERROR(packed_writer->WriteTensor(part_name, *part));
            packed_.weight_map.emplace_back(part_name, file_name);
            packed_.tensor_bytes += part->nbytes();
          }
        } else if (result.dequantized.defined()) {
          // Targeted only by stages that change values without packing.
          RETURN_IF_ERROR(packed_writer->WriteTensor(name, result.dequantized));
          packed_.weight_map.emplace_back(name, file_name);
          packed_.tensor_bytes += tensor.info.NumBytes();
        } else {
          RETURN_IF_ERROR(packed_writer->WriteBytes(name, raw));
          packed_.weight_map.emplace_back(name, file_name);
          packed_.tensor_bytes += tensor.info.NumBytes();
        }
      }
    }

    if (events_.Cancelled()) return CancelledStatus();
    const std::pair<std::optional<SafetensorsWriter>*, OutputTree*> finished[] = {
        {&dequantized_writer, &dequantized_}, {&packed_writer, &packed_}};
    for (const auto& [writer, tree] : finished) {
      if (!writer->has_value()) continue;
      SafetensorsWriter& w = **writer;
      RETURN_IF_ERROR(w.Commit());
      tree->artifacts.push_back(ProducedArtifact{absl::StrCat(tree->dir_name, "/", file_name),
                                                 tree->format, w.bytes_written(), w.sha256()});
    }
    return absl::OkStatus();
  }

  // Passes one tensor through every stage that targets it, in stage order.
  absl::StatusOr<TensorResult> TransformTensor(const CheckpointTensor& tensor,
                                               const TensorPlan& plan) {
    const std::string& name = tensor.info.name;
    ASSIGN_OR_RETURN(at::Tensor current, checkpoint_.Load(name, device_));
    const at::ScalarType dtype = current.scalar_type();
    TensorResult result;
    for (int s : plan.stages) {
      if (events_.Cancelled()) return CancelledStatus();
      StagePlan& stage = stages_[s];
      const Clock::time_point start = Clock::now();
      const int64_t bytes_in = current.nbytes();
      std::string message;
      if (stage.method == Method::kSleep) {
        RETURN_IF_ERROR(SleepPolling(stage.sleep_millis, events_));
        stage.bytes_in += bytes_in;
        stage.bytes_out += bytes_in;
        message = absl::StrCat("sleep: ", name);
      } else {
        ASSIGN_OR_RETURN(QuantizedTensor q, QuantizeRtn(current, stage.rtn, name));
        RETURN_IF_ERROR(ValidateQuantized(q, name));
        ASSIGN_OR_RETURN(
            at::Tensor dequantized, CatchTorchErrors(name, [&]() -> absl::StatusOr<at::Tensor> {
              at::Tensor d = Dequantize(q, dtype);
              if (!at::isfinite(d).all().item<bool>()) {
                return absl::InternalError(
                    absl::StrCat("tensor '", name, "': dequantized values are not finite"));
              }
              return d;
            }));
        ASSIGN_OR_RETURN(const double error,
                         CatchTorchErrors(name, [&]() -> absl::StatusOr<double> {
                           return RelativeError(current, dequantized);
                         }));
        const int64_t bytes_out =
            PackedLinearBytes(q.out_features(), q.in_features(), q.bits, q.group_size);
        v1::TensorReport& report = stage.tensor_reports.emplace_back();
        report.set_name(name);
        for (int64_t d : tensor.info.shape) report.add_shape(d);
        report.set_bits(q.bits);
        report.set_relative_error(error);
        report.set_bytes_before(bytes_in);
        report.set_bytes_after(bytes_out);
        stage.bytes_in += bytes_in;
        stage.bytes_out += bytes_out;
        message = absl::StrFormat("rtn: %s %s %d-bit, relative error %.4g", name,
                                  ShapeString(tensor.info.shape), q.bits, error);
        current = dequantized;
        result.dequantized = dequantized;
        if (s == plan.packing_stage) result.packing_source = std::move(q);
      }
      stage.seconds += Seconds(Clock::now() - start);
      ++done_units_;
      events_.Progress(kWorkFraction * static_cast<double>(done_units_) /
                           static_cast<double>(std::max<int64_t>(total_units_, 1)),
                       stage.label,
                       absl::StrCat(message, " (", done_units_, "/", total_units_, ")"));
    }
    return result;
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
      const int64_t packed = PackedLinearBytes(
          info.shape[0], info.shape[1], stages_[plan.packing_stage].rtn.bits, plan.group_size);
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
      s->set_method(MethodName(stage.method));
      s->set_seconds(stage.seconds);
      s->set_bytes_in(stage.bytes_in);
      s->set_bytes_out(stage.bytes_out);
      s->set_mean_relative_error(MeanRelativeError(stage));
      for (const v1::TensorReport& t : stage.tensor_reports) *s->add_tensors() = t;
    }
  }

  const v1::JobSpec& spec_;
  const RunOptions& options_;
  Events& events_;
  c10::Device device_ = c10::Device(c10::kCPU);
  SafetensorsCheckpoint checkpoint_;
  std::vector<StagePlan> stages_;
  std::vector<TensorPlan> tensor_plans_;
  const RtnOptions* packed_options_ = nullptr;  // points into stages_
  OutputTree dequantized_;
  OutputTree packed_;
  int64_t total_units_ = 0;
  int64_t done_units_ = 0;
};

}  // namespace

absl::StatusOr<RunResult> RunJob(const compress::v1::JobSpec& spec, const RunOptions& options,
                                 const RunCallbacks& callbacks) {
  Events events(callbacks);
  // The boundary: nothing thrown inside the engine gets past here.
  return CatchTorchErrors("engine", [&]() -> absl::StatusOr<RunResult> {
    c10::InferenceMode inference_mode;
    JobRunner runner(spec, options, events);
    return runner.Run();
  });
}

}  // namespace compress::engine
