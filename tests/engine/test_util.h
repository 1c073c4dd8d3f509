// Shared helpers for the engine tests.
#pragma once

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <string>

#include "absl/status/status.h"

namespace compress::engine::testing {

// A fresh folder under the build tree (ENGINE_TEST_TMP_ROOT), removed after the test.
class TempDir {
 public:
  TempDir() {
    std::filesystem::create_directories(ENGINE_TEST_TMP_ROOT);
    std::string pattern = std::string(ENGINE_TEST_TMP_ROOT) + "/test-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) std::abort();
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline void WriteBytes(const std::string& path, const std::string& bytes) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// 8-byte little-endian length, the JSON, then the data section.
inline std::string SafetensorsBytes(const std::string& json, const std::string& data) {
  std::string out(8, '\0');
  const uint64_t n = json.size();
  std::memcpy(out.data(), &n, 8);
  return out + json + data;
}

// The status is INVALID_ARGUMENT and its message contains every fragment
// (the file name, the tensor name, the problem).
inline void ExpectInvalidArgument(const absl::Status& status,
                                  std::initializer_list<std::string> fragments) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  for (const std::string& fragment : fragments) {
    EXPECT_THAT(std::string(status.message()), ::testing::HasSubstr(fragment));
  }
}

// Weight rows that exercise a quantizer's every branch: normal, all zero,
// constant, all positive, all negative, outliers, tiny (float16-subnormal
// scales), large.
inline at::Tensor TrickyWeights(int64_t out, int64_t in, uint64_t seed) {
  at::manual_seed(seed);
  at::Tensor w = at::randn({out, in}) * 0.02;
  w[0].zero_();
  w[1].fill_(0.3);
  w[2] = at::rand({in}) * 0.05;
  w[3] = -at::rand({in}) * 0.05;
  w[4].index_fill_(0, at::arange(0, in, 37), 1.5);
  w[5] *= 1e-5;
  w[6] *= 5000;
  return w;
}

}  // namespace compress::engine::testing
