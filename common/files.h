// Files that are either whole or absent: write to a temp name, fsync, rename.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace compress {

// Writes `contents` to `path` atomically (temp file in the same folder,
// fsync, rename, fsync of the folder). Creates parent folders.
absl::Status WriteFileAtomic(const std::string& path, absl::string_view contents);

// An open temporary file that becomes `final_path` only on Commit(). If the
// object is destroyed uncommitted, the temp file is removed.
class AtomicFileWriter {
 public:
  static absl::StatusOr<AtomicFileWriter> Open(const std::string& final_path);
  AtomicFileWriter(AtomicFileWriter&& other) noexcept;
  AtomicFileWriter& operator=(AtomicFileWriter&&) = delete;
  ~AtomicFileWriter();

  absl::Status Write(absl::string_view data);
  absl::Status Commit();  // fsync, rename, fsync folder
  int64_t bytes_written() const { return bytes_written_; }
  const std::string& temp_path() const { return temp_path_; }

 private:
  AtomicFileWriter(std::string final_path, std::string temp_path, int fd)
      : final_path_(std::move(final_path)), temp_path_(std::move(temp_path)), fd_(fd) {}
  std::string final_path_;
  std::string temp_path_;
  int fd_ = -1;
  int64_t bytes_written_ = 0;
};

absl::StatusOr<std::string> ReadFile(const std::string& path, int64_t max_bytes = int64_t{1} << 30);
absl::Status MakeDirs(const std::string& path);

}  // namespace compress
