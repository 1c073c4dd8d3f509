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

}  // namespace compress::engine
