// safetensors dtype <-> ATen scalar type.
#pragma once

#include <c10/core/ScalarType.h>

#include <optional>

#include "absl/status/statusor.h"
#include "common/safetensors_header.h"

namespace compress::engine {

// The ATen type that holds `dtype` bit for bit, or nullopt when this LibTorch
// has none (U16, U32, U64, and the F8 types on LibTorch 1.x): such tensors
// are copied as raw bytes and never turned into at::Tensor.
std::optional<at::ScalarType> ToScalarType(SafetensorsDtype dtype);

// INVALID_ARGUMENT for a type safetensors cannot store.
absl::StatusOr<SafetensorsDtype> FromScalarType(at::ScalarType type);

}  // namespace compress::engine
