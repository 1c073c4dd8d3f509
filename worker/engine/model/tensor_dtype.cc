#include "worker/engine/model/tensor_dtype.h"

#include "absl/strings/str_cat.h"

namespace compress::engine {
namespace {

struct DtypePair {
  SafetensorsDtype safetensors;
  at::ScalarType aten;
};

// Types every supported LibTorch (1.13 and 2.x) has. F8 and unsigned 16/32/64
// exist only in newer releases and are passed through as bytes instead.
constexpr DtypePair kDtypePairs[] = {
    {SafetensorsDtype::kBool, at::kBool},  {SafetensorsDtype::kU8, at::kByte},
    {SafetensorsDtype::kI8, at::kChar},    {SafetensorsDtype::kI16, at::kShort},
    {SafetensorsDtype::kF16, at::kHalf},   {SafetensorsDtype::kBF16, at::kBFloat16},
    {SafetensorsDtype::kI32, at::kInt},    {SafetensorsDtype::kF32, at::kFloat},
    {SafetensorsDtype::kF64, at::kDouble}, {SafetensorsDtype::kI64, at::kLong},
};

}  // namespace

std::optional<at::ScalarType> ToScalarType(SafetensorsDtype dtype) {
  for (const DtypePair& p : kDtypePairs) {
    if (p.safetensors == dtype) return p.aten;
  }
  return std::nullopt;
}

absl::StatusOr<SafetensorsDtype> FromScalarType(at::ScalarType type) {
  for (const DtypePair& p : kDtypePairs) {
    if (p.aten == type) return p.safetensors;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("ATen dtype ", c10::toString(type), " has no safetensors equivalent"));
}

}  // namespace compress::engine
