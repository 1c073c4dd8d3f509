// GPU memory as the NVIDIA driver reports it (what nvidia-smi shows), read
// through libcuda.so.1 found at run time: the worker builds and runs
// without CUDA, and a CUDA LibTorch need not expose its allocator to us.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace compress::worker {

struct CudaMemory {
  int64_t total_bytes = 0;
  int64_t free_bytes = 0;
};

// "cuda:3" -> 3, "cuda" -> 0; nullopt for any other device.
std::optional<int> CudaDeviceIndex(const std::string& device);

// The device's total and free memory; nullopt without a driver or device.
std::optional<CudaMemory> QueryCudaMemory(int device);

}  // namespace compress::worker
