// Parsing the device a job runs on. The engine never assumes CUDA: every
// tensor is placed on the device parsed here, explicitly.
#pragma once

#include <c10/core/Device.h>

#include <string>

#include "absl/status/statusor.h"

namespace compress::engine {

// "cpu" (or empty) and "cuda" / "cuda:N". INVALID_ARGUMENT for anything
// else; FAILED_PRECONDITION for a CUDA device this LibTorch build or machine
// does not have.
absl::StatusOr<c10::Device> ParseDevice(const std::string& device);

// Makes glibc serve every allocation of 1 MiB or more with its own mmap and
// give it back on free. By default glibc raises that threshold to the size
// of each large block freed (up to 32 MiB), after which tensor-sized
// buffers come from the heap and stay resident: streaming a 2.4 GB model
// through RTN then kept ~1.3x its size in RSS instead of ~0.1x. Process
// wide and idempotent; RunJob calls it.
void ReturnLargeAllocationsToTheSystem();

}  // namespace compress::engine
