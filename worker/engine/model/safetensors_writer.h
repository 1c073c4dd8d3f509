// Writing safetensors files: the header first (every name, dtype and shape is
// known up front), then each tensor's data in order, one tensor at a time, so
// a checkpoint never has to fit in memory. The file appears under its final
// name only on Commit() (compress::AtomicFileWriter: temp name, fsync,
// rename); an uncommitted writer removes its temp file.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/files.h"
#include "common/safetensors_header.h"
#include "common/sha256.h"

namespace compress::engine {

class SafetensorsWriter {
 public:
  // Writes the header for `tensors`, whose data must then be written in the
  // same order. Default metadata {"format": "pt"} is what PyTorch loaders
  // (transformers' safe_open) expect.
  static absl::StatusOr<SafetensorsWriter> Open(
      const std::string& path, const std::vector<SafetensorsTensorSpec>& tensors,
      const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

  // Appends the next tensor. Its name, dtype and shape must match the next
  // spec; it may live on any device and need not be contiguous.
  absl::Status WriteTensor(absl::string_view name, const at::Tensor& tensor);
  // Appends the next tensor from its raw little-endian bytes (pass-through
  // copies, and dtypes ATen lacks).
  absl::Status WriteBytes(absl::string_view name, absl::string_view bytes);
  // FAILED_PRECONDITION unless every tensor was written; then makes the file
  // durable and visible under its final name.
  absl::Status Commit();

  const SafetensorsHeader& header() const { return header_; }
  int64_t bytes_written() const { return file_.bytes_written(); }
  // The file's sha256, lowercase hex; valid after Commit().
  const std::string& sha256() const { return sha256_hex_; }

 private:
  SafetensorsWriter(std::string path, AtomicFileWriter file, SafetensorsHeader header)
      : path_(std::move(path)),
        file_(std::move(file)),
        header_(std::move(header)),
        hash_(std::make_unique<Sha256>()) {}
  absl::Status Append(absl::string_view data);
  absl::StatusOr<const SafetensorsTensorInfo*> Expect(absl::string_view name);

  std::string path_;
  AtomicFileWriter file_;
  SafetensorsHeader header_;
  std::unique_ptr<Sha256> hash_;
  size_t next_ = 0;
  std::string sha256_hex_;
};

// Writes `tensors` (already in memory) as one file. For tests and small files.
absl::Status WriteSafetensorsFile(const std::string& path,
                                  const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata = {
                                      {"format", "pt"}});

// The spec (name, dtype, shape) of an in-memory tensor. INVALID_ARGUMENT for
// an ATen dtype safetensors cannot store.
absl::StatusOr<SafetensorsTensorSpec> SpecOf(const std::string& name, const at::Tensor& tensor);

// Hugging Face's shard naming: ShardFileName(0, 3) == "model-00001-of-00003.safetensors".
std::string ShardFileName(int index, int count);

// The text of model.safetensors.index.json: {"metadata": {"total_size": N},
// "weight_map": {tensor: shard file}}.
std::string SafetensorsIndexJson(const std::vector<std::pair<std::string, std::string>>& weight_map,
                                 uint64_t total_size);

}  // namespace compress::engine
