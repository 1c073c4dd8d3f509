// A scratch folder under the build tree (ctest runs tests from the build
// folder), removed at scope end.
#pragma once

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <string>

namespace compress::testing {

class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "t") {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::current_path() / "test-tmp" /
            ("compress-" + prefix + "-" + std::to_string(getpid()) + "-" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string path() const { return path_.string(); }
  std::string Sub(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

}  // namespace compress::testing
