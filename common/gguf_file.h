// GGUF v3 files (llama.cpp's format): the header as plain structs, a strict
// parser, a streaming writer and a read-only mapping for tensor bytes. No
// LibTorch here, so compressctl can inspect files and the server can check
// them; the quantizers that fill the tensors live in worker/engine/gguf/.
//
// File layout (llama.cpp's ggml/include/gguf.h and docs/gguf.md), all
// little-endian:
//   "GGUF" | u32 version = 3 | u64 tensor_count | u64 metadata_kv_count
//   metadata_kv_count x { string key | u32 value type | value }
//   tensor_count x { string name | u32 n_dims | n_dims x u64 ne
//                    | u32 ggml type | u64 offset }
//   zero padding to the alignment | data section
// A string is u64 byte length + UTF-8 bytes (no NUL). An ARRAY value is
// u32 element type | u64 count | elements. Offsets are relative to the data
// section and multiples of the alignment (metadata "general.alignment", a
// u32, default 32); each tensor's data is zero-padded to the alignment.
// ne[0] is the fastest-varying dimension: a PyTorch [out, in] weight has
// ne = {in, out}.
//
// The parser accepts what llama.cpp's gguf_init_from_file accepts (tensors
// packed in declaration order, names under 64 bytes, at most 4 dims, no
// arrays of arrays) and what this project's type table knows; the writer
// produces only such files. Every problem is INVALID_ARGUMENT naming the
// file and the key or tensor.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/files.h"
#include "common/gguf_types.h"
#include "common/sha256.h"

namespace compress {

inline constexpr uint32_t kGgufVersion = 3;
inline constexpr uint32_t kGgufDefaultAlignment = 32;
inline constexpr char kGgufAlignmentKey[] = "general.alignment";
inline constexpr int kGgufMaxDims = 4;  // GGML_MAX_DIMS
// llama.cpp stores names in char[GGML_MAX_NAME = 64] with the NUL.
inline constexpr size_t kGgufMaxTensorNameBytes = 63;
inline constexpr size_t kGgufMaxKeyBytes = 65535;  // the spec's limit
// The writer pads with up to alignment - 1 zero bytes per tensor; a larger
// alignment is legal but only ever a mistake.
inline constexpr uint32_t kGgufMaxWriterAlignment = 1 << 20;

// gguf.h's enum gguf_type: the id stored before each metadata value.
enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// "UINT32", "STRING", ... as gguf-py names them; "?" for an unknown id.
const char* GgufValueTypeName(GgufValueType type);

// The elements of an ARRAY value, one vector type per element type. Arrays
// of arrays are in the spec, but llama.cpp refuses them and so do we.
using GgufArray =
    std::variant<std::vector<uint8_t>, std::vector<int8_t>, std::vector<uint16_t>,
                 std::vector<int16_t>, std::vector<uint32_t>, std::vector<int32_t>,
                 std::vector<float>, std::vector<bool>, std::vector<std::string>,
                 std::vector<uint64_t>, std::vector<int64_t>, std::vector<double>>;

// One metadata value. Built with the named factories so that the stored type
// is always chosen on purpose (llama.cpp checks it: context_length is a
// UINT32, not an INT32).
class GgufValue {
 public:
  GgufValue() = default;  // UINT8 0
  static GgufValue Uint8(uint8_t v) { return GgufValue(v); }
  static GgufValue Int8(int8_t v) { return GgufValue(v); }
  static GgufValue Uint16(uint16_t v) { return GgufValue(v); }
  static GgufValue Int16(int16_t v) { return GgufValue(v); }
  static GgufValue Uint32(uint32_t v) { return GgufValue(v); }
  static GgufValue Int32(int32_t v) { return GgufValue(v); }
  static GgufValue Float32(float v) { return GgufValue(v); }
  static GgufValue Bool(bool v) { return GgufValue(v); }
  static GgufValue String(std::string v) { return GgufValue(std::move(v)); }
  static GgufValue Uint64(uint64_t v) { return GgufValue(v); }
  static GgufValue Int64(int64_t v) { return GgufValue(v); }
  static GgufValue Float64(double v) { return GgufValue(v); }
  // An array of the element type of the vector: Array(std::vector<std::string>{...})
  // is an array of STRING.
  template <typename T>
  static GgufValue Array(std::vector<T> elements) {
    return GgufValue(GgufArray(std::move(elements)));
  }

  GgufValueType type() const;  // kArray for arrays
  // An array's element type; a scalar's own type.
  GgufValueType element_type() const;
  bool is_array() const { return std::holds_alternative<GgufArray>(value_); }
  size_t array_size() const;  // 0 for scalars

  // The value if it is stored as exactly T (uint32_t, std::string,
  // std::vector<std::string>, ...), else nullptr.
  template <typename T>
  const T* Get() const {
    if constexpr (IsVector<T>::value) {
      const GgufArray* array = std::get_if<GgufArray>(&value_);
      return array == nullptr ? nullptr : std::get_if<T>(array);
    } else {
      return std::get_if<T>(&value_);
    }
  }

  // Calls f with the stored value: a scalar, a std::string or a GgufArray
  // (for printing and serializing without a switch over the type ids).
  template <typename F>
  decltype(auto) Visit(F&& f) const {
    return std::visit(std::forward<F>(f), value_);
  }

  bool operator==(const GgufValue& other) const { return value_ == other.value_; }
  bool operator!=(const GgufValue& other) const { return !(*this == other); }

 private:
  template <typename T>
  struct IsVector : std::false_type {};
  template <typename T>
  struct IsVector<std::vector<T>> : std::true_type {};

  using Storage = std::variant<uint8_t, int8_t, uint16_t, int16_t, uint32_t, int32_t, float, bool,
                               std::string, uint64_t, int64_t, double, GgufArray>;
  template <typename T>
  explicit GgufValue(T v) : value_(std::in_place_type<T>, std::move(v)) {}

  Storage value_;
};

struct GgufKeyValue {
  std::string key;
  GgufValue value;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: ne[0] varies fastest
  GgufType type = GgufType::kF32;
  uint64_t offset = 0;  // from the start of the data section
  uint64_t bytes = 0;   // without the padding that follows

  int64_t NumElements() const;
  // ne reversed: the PyTorch shape, [out, in] for a linear weight.
  std::vector<int64_t> TorchShape() const;
};

struct GgufHeader {
  uint32_t version = kGgufVersion;
  std::vector<GgufKeyValue> metadata;  // in file order
  std::vector<GgufTensorInfo> tensors;  // in file order, which is data order
  uint32_t alignment = kGgufDefaultAlignment;
  uint64_t data_offset = 0;  // absolute file offset of the data section

  const GgufValue* FindMetadata(absl::string_view key) const;  // linear scan
  const GgufTensorInfo* FindTensor(absl::string_view name) const;
  // Up to the end of the last tensor's padding.
  uint64_t DataSectionBytes() const;
};

// Converts between PyTorch's shape order and ggml's ne order (a reversal).
std::vector<int64_t> GgufNeFromTorchShape(const std::vector<int64_t>& torch_shape);

// Bytes of a tensor of `type` and dimensions `ne`. INVALID_ARGUMENT naming
// `tensor_name` for no or more than 4 dims, a negative dim, ne[0] not a
// multiple of the type's block, or an overflow.
absl::StatusOr<uint64_t> GgufTensorBytes(GgufType type, const std::vector<int64_t>& ne,
                                         absl::string_view tensor_name);

// ---------------------------------------------------------------- reading

// Parses and validates the header of a GGUF file of `file_size` bytes whose
// first bytes are `file_start` (the whole header at least; the data section
// may be left out). Every count and length is checked against the bytes
// left before anything is allocated. `file_name` is for messages only.
absl::StatusOr<GgufHeader> ParseGgufHeader(absl::string_view file_start, uint64_t file_size,
                                           absl::string_view file_name);

// Reads just the header of the file at `path` (it maps the file, so only
// the header's pages are read). NOT_FOUND if it cannot be opened.
absl::StatusOr<GgufHeader> ReadGgufHeader(const std::string& path);

// A GGUF file mapped read-only, with its validated header: tensors' bytes
// without copying them. Move-only; unmaps on destruction.
class GgufMappedFile {
 public:
  static absl::StatusOr<GgufMappedFile> Open(const std::string& path);
  GgufMappedFile(GgufMappedFile&& other) noexcept;
  GgufMappedFile& operator=(GgufMappedFile&& other) = delete;
  GgufMappedFile(const GgufMappedFile&) = delete;
  ~GgufMappedFile();

  const GgufHeader& header() const { return header_; }
  // The tensor's `bytes` bytes (no padding). NOT_FOUND naming the file for
  // an unknown name.
  absl::StatusOr<absl::string_view> TensorBytes(absl::string_view name) const;
  absl::string_view TensorBytes(const GgufTensorInfo& tensor) const;

 private:
  GgufMappedFile(std::string path, GgufHeader header, const char* data, size_t size)
      : path_(std::move(path)), header_(std::move(header)), data_(data), size_(size) {}
  std::string path_;
  GgufHeader header_;
  const char* data_ = nullptr;  // the mapping, or nullptr for an empty file
  size_t size_ = 0;
};

// ---------------------------------------------------------------- writing

// What a writer knows before writing: the tensors in the order their data
// will follow the header.
struct GgufTensorSpec {
  std::string name;
  std::vector<int64_t> ne;  // ggml order (see GgufNeFromTorchShape)
  GgufType type = GgufType::kF32;
};

// Checks the metadata and tensors and assigns offsets (each tensor padded to
// the alignment, in the given order). The alignment is the metadata's
// "general.alignment" when present (a UINT32 power of two), else 32.
// INVALID_ARGUMENT for an empty, duplicate, over-long or non-UTF-8 key or
// name, a string value that is not UTF-8, a bad shape for the type.
absl::StatusOr<GgufHeader> LayoutGguf(std::vector<GgufKeyValue> metadata,
                                      const std::vector<GgufTensorSpec>& tensors);

// The bytes before the data section: magic through tensor infos plus the
// zero padding, header.data_offset bytes in all (which it sets).
std::string SerializeGgufHeader(GgufHeader* header);

// Streams a GGUF file: the header at Open, then each tensor's bytes in the
// declared order, then Commit. The file appears (temp file, fsync, rename)
// only on Commit; a writer destroyed before that leaves nothing behind.
// Writing and hashing run on a thread of the writer's own, so the caller
// encodes the next tensor meanwhile; at most one tensor waits beside the one
// being written. A failed write is reported by the next call.
class GgufWriter {
 public:
  // Validates as LayoutGguf does and writes the header to a temp file next
  // to `path`.
  static absl::StatusOr<GgufWriter> Open(const std::string& path,
                                         std::vector<GgufKeyValue> metadata,
                                         const std::vector<GgufTensorSpec>& tensors);
  GgufWriter(GgufWriter&&) noexcept;
  GgufWriter& operator=(GgufWriter&&) = delete;
  ~GgufWriter();

  // The next tensor's data: `name` must be the next declared tensor and
  // `data` exactly its size (INVALID_ARGUMENT otherwise, nothing written).
  absl::Status WriteTensor(absl::string_view name, std::string data);
  // FAILED_PRECONDITION if a tensor was not written or a write failed.
  absl::Status Commit();

  const GgufHeader& header() const { return header_; }
  // The file's sha256 (lowercase hex), hashed as it was written; set by Commit.
  const std::string& sha256() const { return sha256_hex_; }

 private:
  class Pipeline;
  GgufWriter(std::string path, GgufHeader header, std::unique_ptr<Pipeline> pipeline);
  std::string path_;
  GgufHeader header_;
  std::unique_ptr<Pipeline> pipeline_;
  std::string sha256_hex_;
  size_t next_tensor_ = 0;
  bool broken_ = false;  // a write failed part-way: the file is unusable
};

}  // namespace compress
