// The safetensors file header: parsing with strict validation, and
// serialization for writers. No LibTorch here, so the server can inspect a
// checkpoint (names, shapes, sizes) without linking the engine.
//
// File layout (https://github.com/huggingface/safetensors):
//   u64 little-endian N | N bytes of JSON | data section
// The JSON is an object mapping each tensor name to
//   {"dtype": "F16", "shape": [4096, 4096], "data_offsets": [begin, end]}
// with offsets relative to the start of the data section, plus an optional
// "__metadata__" object of string to string.
//
// Validation follows the reference implementation: tensors tile the data
// section exactly (sorted by offset, no gap, no overlap, nothing after the
// last tensor) and each tensor's byte span equals shape product * dtype size.
// Every problem is INVALID_ARGUMENT naming the file and, where there is one,
// the tensor.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace compress {

// Every dtype string the format defines. Only kF32, kF16 and kBF16 are
// weight dtypes the engine computes on; the others are known (parsed, sized,
// copied through unchanged) but never quantized.
enum class SafetensorsDtype {
  kBool,
  kU8,
  kI8,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64,
  kF8E4M3,
  kF8E5M2,
};

// One row per dtype: the table is the spec.
struct SafetensorsDtypeInfo {
  SafetensorsDtype dtype;
  const char* name;  // as written in the header, e.g. "BF16"
  int element_bytes;
  bool is_weight_dtype;  // F32, F16, BF16: the engine quantizes these
};

const SafetensorsDtypeInfo& DtypeInfo(SafetensorsDtype dtype);
// "F16" -> kF16; INVALID_ARGUMENT for a string the format does not define.
absl::StatusOr<SafetensorsDtype> ParseSafetensorsDtype(absl::string_view name);
inline const char* DtypeName(SafetensorsDtype d) { return DtypeInfo(d).name; }
inline int DtypeBytes(SafetensorsDtype d) { return DtypeInfo(d).element_bytes; }
inline bool IsWeightDtype(SafetensorsDtype d) { return DtypeInfo(d).is_weight_dtype; }

struct SafetensorsTensorInfo {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::kF32;
  std::vector<int64_t> shape;
  // Byte range [data_begin, data_end) relative to the data section.
  uint64_t data_begin = 0;
  uint64_t data_end = 0;

  int64_t NumElements() const;  // 1 for a scalar (empty shape)
  uint64_t NumBytes() const { return data_end - data_begin; }
};

struct SafetensorsHeader {
  // In data order (ascending data_begin), which for files we write is also
  // the order the writer was given.
  std::vector<SafetensorsTensorInfo> tensors;
  std::map<std::string, std::string> metadata;  // "__metadata__"
  uint64_t json_bytes = 0;                      // N

  uint64_t DataSectionOffset() const { return 8 + json_bytes; }
  uint64_t DataSectionBytes() const;
  const SafetensorsTensorInfo* Find(absl::string_view name) const;  // linear scan
};

// Headers larger than this are rejected before reading them (the reference
// implementation's limit).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

// Parses and validates the header of a safetensors file of `file_size` bytes
// whose first bytes are `file_start` (at least 8 + N of them, or the whole
// file when it is shorter). `file_name` is used in error messages only.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::string_view file_start,
                                                         uint64_t file_size,
                                                         absl::string_view file_name);

// Reads just the header of the file at `path` (not the data).
absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeader(const std::string& path);

// What a writer knows before writing: names, dtypes and shapes, in the order
// their data will follow the header.
struct SafetensorsTensorSpec {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::kF32;
  std::vector<int64_t> shape;
};

// Assigns contiguous data offsets in the given order. INVALID_ARGUMENT for an
// empty or duplicate name, a negative dimension or a size that overflows.
absl::StatusOr<SafetensorsHeader> LayoutSafetensors(
    const std::vector<SafetensorsTensorSpec>& tensors,
    const std::map<std::string, std::string>& metadata);

// The first 8 + N bytes of the file: length prefix and JSON, padded with
// spaces so that the data section starts at a multiple of 8 bytes (as the
// reference implementation does, which keeps mmapped tensors aligned).
// Sets header->json_bytes to N. INVALID_ARGUMENT if a name or metadata
// string is not valid UTF-8.
absl::StatusOr<std::string> SerializeSafetensorsHeader(SafetensorsHeader* header);

}  // namespace compress
