// Reading safetensors checkpoints by mmap: one file, or the shards a
// model.safetensors.index.json lists. Tensors are materialized lazily, one at
// a time, as zero-copy views of the mapping or as owned copies.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <optional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/safetensors_header.h"

namespace compress::engine {

inline constexpr char kSafetensorsIndexFileName[] = "model.safetensors.index.json";
inline constexpr char kSingleSafetensorsFileName[] = "model.safetensors";

struct MappedFile;  // a private, copy-on-write mapping of a whole file

// One mmapped safetensors file with its validated header.
class SafetensorsFile {
 public:
  // NOT_FOUND if the file cannot be opened; INVALID_ARGUMENT (naming the
  // file and tensor) for any malformed header.
  static absl::StatusOr<std::shared_ptr<const SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  uint64_t file_size() const;
  // The tensor's bytes inside the mapping; `info` must come from header().
  absl::string_view Bytes(const SafetensorsTensorInfo& info) const;
  // A tensor over the tensor's bytes, valid for as long as any copy of it
  // lives (it keeps the mapping alive). Zero-copy when the bytes are aligned
  // for the dtype, a copy otherwise. Writes to it change private pages only,
  // never the file. INVALID_ARGUMENT for a dtype ATen cannot hold.
  absl::StatusOr<at::Tensor> View(const SafetensorsTensorInfo& info) const;
  // Drops this process's pages of the tensor's bytes (they stay in the page
  // cache), so that streaming through a checkpoint keeps resident memory at
  // the tensors in use rather than the whole file. A view of the tensor
  // still alive reads the file's bytes again on its next access: writes made
  // through it are lost.
  void ReleasePages(const SafetensorsTensorInfo& info) const;

 private:
  SafetensorsFile(std::string path, std::shared_ptr<MappedFile> mapping, SafetensorsHeader header)
      : path_(std::move(path)), mapping_(std::move(mapping)), header_(std::move(header)) {}

  std::string path_;
  std::shared_ptr<MappedFile> mapping_;
  SafetensorsHeader header_;
};

struct CheckpointTensor {
  SafetensorsTensorInfo info;  // offsets are relative to its shard's data section
  int shard = 0;               // index into SafetensorsCheckpoint::shards()
};

// A whole checkpoint, single-file or sharded. Opening validates every header
// and, for a sharded one, that the index and the shards agree exactly.
class SafetensorsCheckpoint {
 public:
  // `path` is a .safetensors file, or a folder holding
  // model.safetensors.index.json, else model.safetensors, else exactly one
  // *.safetensors file. Index problems (bad JSON, a shard name with a path
  // separator or "..", a missing shard, a tensor the shard lacks or the index
  // omits) are INVALID_ARGUMENT naming the index file and the tensor.
  static absl::StatusOr<SafetensorsCheckpoint> Open(const std::string& path);

  // The folder the checkpoint's files live in (config.json, tokenizer files).
  const std::string& folder() const { return folder_; }
  // True when opened through model.safetensors.index.json.
  bool sharded() const { return sharded_; }
  const std::map<std::string, std::string>& index_metadata() const { return index_metadata_; }
  // In file-name order for an index (Hugging Face's names sort by shard
  // number), else the single file.
  const std::vector<std::shared_ptr<const SafetensorsFile>>& shards() const { return shards_; }
  // Shard after shard, and within a shard in data order: the order in which
  // streaming through the checkpoint reads the files sequentially.
  const std::vector<CheckpointTensor>& tensors() const { return tensors_; }
  const CheckpointTensor* Find(absl::string_view name) const;

  absl::StatusOr<absl::string_view> RawBytes(absl::string_view name) const;
  // See SafetensorsFile::View.
  absl::StatusOr<at::Tensor> View(absl::string_view name) const;
  // An owned copy on `device` in the stored dtype, or in `dtype` when given.
  // The mapping's pages of the tensor are released afterwards (ReleasePages).
  absl::StatusOr<at::Tensor> Load(absl::string_view name, const at::Device& device,
                                  std::optional<at::ScalarType> dtype = std::nullopt) const;
  // See SafetensorsFile::ReleasePages; nothing for an unknown name.
  void ReleasePages(absl::string_view name) const;

 private:
  std::string folder_;
  bool sharded_ = false;
  std::map<std::string, std::string> index_metadata_;
  std::vector<std::shared_ptr<const SafetensorsFile>> shards_;
  std::vector<CheckpointTensor> tensors_;
  std::map<std::string, size_t, std::less<>> by_name_;
};

// Base name of a file path ("a/b/model.safetensors" -> "model.safetensors").
std::string FileBaseName(const std::string& path);

}  // namespace compress::engine
