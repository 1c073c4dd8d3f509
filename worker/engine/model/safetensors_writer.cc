#include "worker/engine/model/safetensors_writer.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "worker/engine/model/tensor_dtype.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

std::string Quoted(absl::string_view s) { return absl::StrCat("'", s, "'"); }

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

absl::StatusOr<SafetensorsWriter> SafetensorsWriter::Open(
    const std::string& path, const std::vector<SafetensorsTensorSpec>& tensors,
    const std::map<std::string, std::string>& metadata) {
  absl::StatusOr<SafetensorsHeader> header = LayoutSafetensors(tensors, metadata);
  if (!header.ok()) {
    return absl::Status(header.status().code(),
                        absl::StrCat(path, ": ", header.status().message()));
  }
  ASSIGN_OR_RETURN(std::string header_bytes, SerializeSafetensorsHeader(&*header));
  ASSIGN_OR_RETURN(AtomicFileWriter file, AtomicFileWriter::Open(path));
  SafetensorsWriter writer(path, std::move(file), *std::move(header));
  RETURN_IF_ERROR(writer.Append(header_bytes));
  return writer;
}

absl::Status SafetensorsWriter::Append(absl::string_view data) {
  hash_->Update(data);
  return file_.Write(data);
}

absl::StatusOr<const SafetensorsTensorInfo*> SafetensorsWriter::Expect(absl::string_view name) {
  if (next_ >= header_.tensors.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": tensor ", Quoted(name), " written after the last tensor"));
  }
  const SafetensorsTensorInfo& info = header_.tensors[next_];
  if (info.name != name) {
    return absl::FailedPreconditionError(absl::StrCat(
        path_, ": tensor ", Quoted(name), " written where ", Quoted(info.name), " was expected"));
  }
  return &info;
}

absl::Status SafetensorsWriter::WriteBytes(absl::string_view name, absl::string_view bytes) {
  ASSIGN_OR_RETURN(const SafetensorsTensorInfo* info, Expect(name));
  if (bytes.size() != info->NumBytes()) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor ", Quoted(name), " has ",
                                                   bytes.size(), " bytes, the header says ",
                                                   info->NumBytes()));
  }
  RETURN_IF_ERROR(Append(bytes));
  ++next_;
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::WriteTensor(absl::string_view name, const at::Tensor& tensor) {
  ASSIGN_OR_RETURN(const SafetensorsTensorInfo* info, Expect(name));
  absl::StatusOr<SafetensorsDtype> dtype = FromScalarType(tensor.scalar_type());
  if (!dtype.ok() || *dtype != info->dtype) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor ", Quoted(name), " has dtype ",
                                                   c10::toString(tensor.scalar_type()),
                                                   ", the header says ", DtypeName(info->dtype)));
  }
  if (tensor.sizes() != at::IntArrayRef(info->shape)) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor ", Quoted(name), " has shape ",
                                                   ShapeString(tensor.sizes()),
                                                   ", the header says ", ShapeString(info->shape)));
  }
  ASSIGN_OR_RETURN(at::Tensor host, CatchTorchErrors(absl::StrCat(path_, ": tensor ", Quoted(name)),
                                                     [&]() -> absl::StatusOr<at::Tensor> {
                                                       return tensor.to(at::kCPU).contiguous();
                                                     }));
  return WriteBytes(name,
                    absl::string_view(static_cast<const char*>(host.data_ptr()), host.nbytes()));
}

absl::Status SafetensorsWriter::Commit() {
  if (next_ != header_.tensors.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": commit after ", next_, " of ", header_.tensors.size(),
                     " tensors; next missing: ", Quoted(header_.tensors[next_].name)));
  }
  RETURN_IF_ERROR(file_.Commit());
  sha256_hex_ = hash_->Hex();
  return absl::OkStatus();
}

absl::StatusOr<SafetensorsTensorSpec> SpecOf(const std::string& name, const at::Tensor& tensor) {
  absl::StatusOr<SafetensorsDtype> dtype = FromScalarType(tensor.scalar_type());
  if (!dtype.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", Quoted(name), ": ", dtype.status().message()));
  }
  return SafetensorsTensorSpec{name, *dtype, tensor.sizes().vec()};
}

absl::Status WriteSafetensorsFile(const std::string& path,
                                  const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsTensorSpec> specs;
  for (const auto& [name, tensor] : tensors) {
    ASSIGN_OR_RETURN(SafetensorsTensorSpec spec, SpecOf(name, tensor));
    specs.push_back(std::move(spec));
  }
  ASSIGN_OR_RETURN(SafetensorsWriter writer, SafetensorsWriter::Open(path, specs, metadata));
  for (const auto& [name, tensor] : tensors) RETURN_IF_ERROR(writer.WriteTensor(name, tensor));
  return writer.Commit();
}

std::string ShardFileName(int index, int count) {
  char name[64];
  std::snprintf(name, sizeof(name), "model-%05d-of-%05d.safetensors", index + 1, count);
  return name;
}

std::string SafetensorsIndexJson(const std::vector<std::pair<std::string, std::string>>& weight_map,
                                 uint64_t total_size) {
  nlohmann::ordered_json map = nlohmann::ordered_json::object();
  for (const auto& [tensor, shard] : weight_map) map[tensor] = shard;
  nlohmann::ordered_json root = {{"metadata", {{"total_size", total_size}}},
                                 {"weight_map", std::move(map)}};
  // Names come from validated headers (valid UTF-8); replace, never throw.
  return root.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
}

}  // namespace compress::engine
