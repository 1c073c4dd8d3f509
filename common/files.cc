#include "common/files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace compress {
namespace {

absl::Status ErrnoStatus(absl::string_view what, const std::string& path) {
  int err = errno;
  std::string msg = absl::StrCat(what, " ", path, ": ", std::strerror(err));
  // Out of room: the disk, a quota, or the process's file size limit.
  if (err == ENOSPC || err == EDQUOT || err == EFBIG) return absl::ResourceExhaustedError(msg);
  if (err == ENOENT) return absl::NotFoundError(msg);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
  return absl::InternalError(msg);
}

absl::Status FsyncDir(const std::string& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return ErrnoStatus("open folder", dir);
  ::fsync(fd);
  ::close(fd);
  return absl::OkStatus();
}

std::string TempName(const std::string& final_path) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  return absl::StrCat(final_path, ".tmp-", ::getpid(), "-", rng() % 1000000000);
}

}  // namespace

absl::Status MakeDirs(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) return absl::InternalError(absl::StrCat("create folder ", path, ": ", ec.message()));
  return absl::OkStatus();
}

absl::StatusOr<AtomicFileWriter> AtomicFileWriter::Open(const std::string& final_path) {
  std::string parent = std::filesystem::path(final_path).parent_path().string();
  if (!parent.empty()) {
    absl::Status s = MakeDirs(parent);
    if (!s.ok()) return s;
  }
  std::string temp = TempName(final_path);
  int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus("create", temp);
  return AtomicFileWriter(final_path, temp, fd);
}

AtomicFileWriter::AtomicFileWriter(AtomicFileWriter&& other) noexcept
    : final_path_(std::move(other.final_path_)),
      temp_path_(std::move(other.temp_path_)),
      fd_(other.fd_),
      bytes_written_(other.bytes_written_) {
  other.fd_ = -1;
  other.temp_path_.clear();
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!temp_path_.empty()) ::unlink(temp_path_.c_str());
}

absl::Status AtomicFileWriter::Write(absl::string_view data) {
  if (fd_ < 0) return absl::FailedPreconditionError("write after commit: " + final_path_);
  const char* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    ssize_t n = ::write(fd_, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("write", temp_path_);
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  bytes_written_ += static_cast<int64_t>(data.size());
  return absl::OkStatus();
}

absl::Status AtomicFileWriter::Commit() {
  if (fd_ < 0) return absl::FailedPreconditionError("commit twice: " + final_path_);
  if (::fsync(fd_) != 0) return ErrnoStatus("fsync", temp_path_);
  if (::close(fd_) != 0) {
    fd_ = -1;
    return ErrnoStatus("close", temp_path_);
  }
  fd_ = -1;
  if (::rename(temp_path_.c_str(), final_path_.c_str()) != 0) return ErrnoStatus("rename", temp_path_);
  temp_path_.clear();
  return FsyncDir(std::filesystem::path(final_path_).parent_path().string());
}

absl::Status WriteFileAtomic(const std::string& path, absl::string_view contents) {
  absl::StatusOr<AtomicFileWriter> writer = AtomicFileWriter::Open(path);
  if (!writer.ok()) return writer.status();
  absl::Status s = writer->Write(contents);
  if (!s.ok()) return s;
  return writer->Commit();
}

absl::StatusOr<std::string> ReadFile(const std::string& path, int64_t max_bytes) {
  std::error_code ec;
  auto size = std::filesystem::file_size(path, ec);
  if (ec) return absl::NotFoundError(absl::StrCat("read ", path, ": ", ec.message()));
  if (static_cast<int64_t>(size) > max_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("read ", path, ": ", size, " bytes is over the limit of ", max_bytes));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("open ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace compress
