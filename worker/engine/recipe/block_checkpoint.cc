#include "worker/engine/recipe/block_checkpoint.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "worker/engine/model/safetensors_reader.h"
#include "worker/engine/model/safetensors_writer.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

// Entry names inside the file.
constexpr char kValuesPrefix[] = "values/";
constexpr char kPartsPrefix[] = "parts/";
constexpr char kImportancePrefix[] = "importance/";
constexpr char kStagesEntry[] = "stages";  // a serialized JobReport, one StageReport per stage
constexpr char kMetadataKey[] = "block";

absl::Status Malformed(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(
      absl::StrCat("block checkpoint ", path, ": ", what));
}

}  // namespace

std::string BlockCheckpointName(int64_t layer) {
  return absl::StrFormat("%s/layer-%05d.safetensors", kBlockCheckpointDir, layer);
}

absl::Status WriteBlockCheckpoint(const std::string& path, const BlockCheckpoint& checkpoint) {
  compress::v1::JobReport stages;
  for (const CheckpointedStage& stage : checkpoint.stages) {
    compress::v1::StageReport* report = stages.add_stages();
    report->set_seconds(stage.seconds);
    report->set_bytes_in(stage.bytes_in);
    report->set_bytes_out(stage.bytes_out);
    for (const compress::v1::TensorReport& t : stage.tensor_reports) *report->add_tensors() = t;
  }
  const std::string serialized = stages.SerializeAsString();

  nlohmann::ordered_json tensors = nlohmann::ordered_json::array();
  std::vector<std::pair<std::string, at::Tensor>> entries;
  for (const CheckpointedTensor& t : checkpoint.tensors) {
    nlohmann::ordered_json entry;
    entry["name"] = t.name;
    entry["values"] = t.values.defined();
    entry["importance"] = t.importance.defined();
    nlohmann::ordered_json parts = nlohmann::ordered_json::array();
    if (t.values.defined()) entries.emplace_back(kValuesPrefix + t.name, t.values);
    for (const auto& [part, tensor] : t.packed_parts) {
      parts.push_back(part);
      entries.emplace_back(kPartsPrefix + part, tensor);
    }
    if (t.importance.defined()) entries.emplace_back(kImportancePrefix + t.name, t.importance);
    entry["parts"] = std::move(parts);
    tensors.push_back(std::move(entry));
  }
  ASSIGN_OR_RETURN(at::Tensor stage_bytes, CatchTorchErrors(path, [&]() -> absl::StatusOr<at::Tensor> {
                     at::Tensor bytes = at::empty({static_cast<int64_t>(serialized.size())}, at::kByte);
                     if (!serialized.empty()) {
                       std::memcpy(bytes.data_ptr(), serialized.data(), serialized.size());
                     }
                     return bytes;
                   }));
  entries.emplace_back(kStagesEntry, stage_bytes);

  nlohmann::ordered_json metadata;
  metadata["layer"] = checkpoint.layer;
  metadata["units"] = checkpoint.units;
  metadata["stages"] = checkpoint.stages.size();
  metadata["tensors"] = std::move(tensors);
  return WriteSafetensorsFile(path, entries, {{"format", "pt"}, {kMetadataKey, metadata.dump()}});
}

absl::StatusOr<BlockCheckpoint> ReadBlockCheckpoint(const std::string& path, int64_t layer,
                                                    size_t stages) {
  ASSIGN_OR_RETURN(const SafetensorsCheckpoint file, SafetensorsCheckpoint::Open(path));
  const std::map<std::string, std::string>& metadata = file.shards().front()->header().metadata;
  auto found = metadata.find(kMetadataKey);
  if (found == metadata.end()) return Malformed(path, "no block metadata");
  nlohmann::json parsed = nlohmann::json::parse(found->second, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded() || !parsed.is_object()) return Malformed(path, "metadata is not JSON");

  BlockCheckpoint checkpoint;
  try {
    checkpoint.layer = parsed.at("layer").get<int64_t>();
    checkpoint.units = parsed.at("units").get<int64_t>();
    if (checkpoint.layer != layer) {
      return Malformed(path, absl::StrCat("holds layer ", checkpoint.layer, ", expected ", layer));
    }
    if (parsed.at("stages").get<size_t>() != stages) {
      return Malformed(path, absl::StrCat("has ", parsed.at("stages").get<size_t>(),
                                          " stages, the recipe ", stages));
    }
    for (const nlohmann::json& entry : parsed.at("tensors")) {
      CheckpointedTensor& t = checkpoint.tensors.emplace_back();
      t.name = entry.at("name").get<std::string>();
      if (entry.at("values").get<bool>()) {
        ASSIGN_OR_RETURN(t.values, file.Load(kValuesPrefix + t.name, at::kCPU));
      }
      for (const nlohmann::json& part : entry.at("parts")) {
        const std::string name = part.get<std::string>();
        ASSIGN_OR_RETURN(at::Tensor tensor, file.Load(kPartsPrefix + name, at::kCPU));
        t.packed_parts.emplace_back(name, std::move(tensor));
      }
      if (entry.at("importance").get<bool>()) {
        ASSIGN_OR_RETURN(t.importance, file.Load(kImportancePrefix + t.name, at::kCPU));
      }
    }
  } catch (const nlohmann::json::exception& e) {
    return Malformed(path, absl::StrCat("metadata: ", e.what()));
  }
  ASSIGN_OR_RETURN(const absl::string_view stage_bytes, file.RawBytes(kStagesEntry));
  compress::v1::JobReport report;
  if (!report.ParseFromArray(stage_bytes.data(), static_cast<int>(stage_bytes.size())) ||
      static_cast<size_t>(report.stages_size()) != stages) {
    return Malformed(path, "stage reports do not parse");
  }
  for (const compress::v1::StageReport& s : report.stages()) {
    CheckpointedStage& stage = checkpoint.stages.emplace_back();
    stage.seconds = s.seconds();
    stage.bytes_in = s.bytes_in();
    stage.bytes_out = s.bytes_out();
    stage.tensor_reports.assign(s.tensors().begin(), s.tensors().end());
  }
  return checkpoint;
}

}  // namespace compress::engine
