// Models and calibration data for the tests that run real processes.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

#include "tests/testing/subprocess.h"

namespace compress::testing {

// A random two-block Llama (vocabulary 512) from `worker_bin
// make-random-model`; returns the tool's exit status, its output in `output`.
inline int MakeRandomTestModel(const std::string& worker_bin, const std::string& folder,
                               int hidden, std::string* output) {
  return RunCommand({worker_bin, "make-random-model", "--out", folder, "--layers", "2", "--hidden",
                     std::to_string(hidden), "--intermediate", std::to_string(2 * hidden),
                     "--heads", "4", "--kv-heads", "2", "--vocab", "512"},
                    output);
}

// `count` pseudo-random ids below 512 as a calibration token file
// (little-endian uint32), the same every time.
inline void WriteCalibrationTokens(const std::string& path, int count) {
  std::ofstream out(path, std::ios::binary);
  uint32_t state = 12345;
  for (int i = 0; i < count; ++i) {
    state = state * 1103515245u + 12345u;
    const uint32_t id = (state >> 8) % 512;
    const char bytes[4] = {static_cast<char>(id & 0xff), static_cast<char>(id >> 8), 0, 0};
    out.write(bytes, 4);
  }
}

}  // namespace compress::testing
