#include "worker/engine/recipe/device.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <malloc.h>

#include <mutex>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "worker/engine/recipe/runner.h"

namespace compress::engine {

absl::StatusOr<c10::Device> ParseDevice(const std::string& device) {
  if (device.empty() || device == "cpu") return c10::Device(c10::kCPU);
  absl::string_view rest = device;
  if (!absl::ConsumePrefix(&rest, "cuda")) {
    return absl::InvalidArgumentError(
        absl::StrCat("device '", device, "' is not \"cpu\" or \"cuda:N\""));
  }
  int index = 0;
  if (!rest.empty()) {
    if (!absl::ConsumePrefix(&rest, ":") || rest.empty() ||
        rest.find_first_not_of("0123456789") != absl::string_view::npos ||
        !absl::SimpleAtoi(rest, &index) || index > 1023) {
      return absl::InvalidArgumentError(
          absl::StrCat("device '", device, "' is not \"cpu\" or \"cuda:N\""));
    }
  }
  if (!at::hasCUDA()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "device '", device, "' requested, but this LibTorch build or machine has no CUDA"));
  }
  const int count = static_cast<int>(at::getNumGPUs());
  if (index >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("device '", device, "' requested, but only ", count, " CUDA device(s) exist"));
  }
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
}

void ReturnLargeAllocationsToTheSystem() {
  static std::once_flag once;
  std::call_once(once, [] {
    // Setting either value turns off glibc's dynamic adjustment of both.
    ::mallopt(M_MMAP_THRESHOLD, 1 << 20);
    ::mallopt(M_TRIM_THRESHOLD, 4 << 20);
  });
}

void SetCpuThreads(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(threads);
}

}  // namespace compress::engine
