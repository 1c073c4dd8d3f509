#include "worker/cuda_memory.h"

#include <dlfcn.h>

#include <mutex>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace compress::worker {
namespace {

// The few driver API entry points used (CUresult is an int, 0 = success).
struct Driver {
  using Init = int (*)(unsigned int);
  using DeviceGet = int (*)(int*, int);
  using TotalMem = int (*)(size_t*, int);
  using PrimaryCtxRetain = int (*)(void**, int);
  using PrimaryCtxRelease = int (*)(int);
  using CtxPush = int (*)(void*);
  using CtxPop = int (*)(void**);
  using MemGetInfo = int (*)(size_t*, size_t*);
  Init init = nullptr;
  DeviceGet device_get = nullptr;
  TotalMem total_mem = nullptr;
  PrimaryCtxRetain retain = nullptr;
  PrimaryCtxRelease release = nullptr;
  CtxPush push = nullptr;
  CtxPop pop = nullptr;
  MemGetInfo mem_get_info = nullptr;
  bool ok = false;
};

const Driver& LoadDriver() {
  static Driver driver;
  static std::once_flag once;
  std::call_once(once, [] {
    void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr) return;
    auto find = [&](const char* name) { return dlsym(library, name); };
    driver.init = reinterpret_cast<Driver::Init>(find("cuInit"));
    driver.device_get = reinterpret_cast<Driver::DeviceGet>(find("cuDeviceGet"));
    driver.total_mem = reinterpret_cast<Driver::TotalMem>(find("cuDeviceTotalMem_v2"));
    driver.retain = reinterpret_cast<Driver::PrimaryCtxRetain>(find("cuDevicePrimaryCtxRetain"));
    driver.release = reinterpret_cast<Driver::PrimaryCtxRelease>(find("cuDevicePrimaryCtxRelease_v2"));
    driver.push = reinterpret_cast<Driver::CtxPush>(find("cuCtxPushCurrent_v2"));
    driver.pop = reinterpret_cast<Driver::CtxPop>(find("cuCtxPopCurrent_v2"));
    driver.mem_get_info = reinterpret_cast<Driver::MemGetInfo>(find("cuMemGetInfo_v2"));
    driver.ok = driver.init && driver.device_get && driver.total_mem && driver.retain &&
                driver.release && driver.push && driver.pop && driver.mem_get_info &&
                driver.init(0) == 0;
  });
  return driver;
}

}  // namespace

std::optional<int> CudaDeviceIndex(const std::string& device) {
  absl::string_view rest = device;
  if (!absl::ConsumePrefix(&rest, "cuda")) return std::nullopt;
  if (rest.empty()) return 0;
  int index = 0;
  if (!absl::ConsumePrefix(&rest, ":") || !absl::SimpleAtoi(rest, &index) || index < 0) {
    return std::nullopt;
  }
  return index;
}

std::optional<CudaMemory> QueryCudaMemory(int device) {
  const Driver& driver = LoadDriver();
  if (!driver.ok) return std::nullopt;
  int handle = 0;
  size_t total = 0, free_bytes = 0, total_in_context = 0;
  if (driver.device_get(&handle, device) != 0 || driver.total_mem(&total, handle) != 0) {
    return std::nullopt;
  }
  // The primary context is the one LibTorch uses: retaining it adds none.
  void* context = nullptr;
  if (driver.retain(&context, handle) != 0) return std::nullopt;
  bool read = false;
  if (driver.push(context) == 0) {
    read = driver.mem_get_info(&free_bytes, &total_in_context) == 0;
    void* popped = nullptr;
    driver.pop(&popped);
  }
  driver.release(handle);
  if (!read) return std::nullopt;
  return CudaMemory{static_cast<int64_t>(total), static_cast<int64_t>(free_bytes)};
}

}  // namespace compress::worker
