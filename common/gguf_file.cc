#include "common/gguf_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace compress {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "GGUF files here are little-endian; this code copies numbers as they are");

constexpr char kMagic[4] = {'G', 'G', 'U', 'F'};
// Bytes of the smallest possible entries, to bound counts by the bytes left
// before looping or allocating: a key-value is a key length, one key byte,
// a type and one value byte; a tensor info is a name length, one name byte,
// n_dims, one dim, a type and an offset.
constexpr uint64_t kMinKeyValueBytes = 8 + 1 + 4 + 1;
constexpr uint64_t kMinTensorInfoBytes = 8 + 1 + 4 + 8 + 4 + 8;

// One row per value type: the table is the spec.
struct ValueTypeInfo {
  GgufValueType type;
  const char* name;
  uint64_t element_bytes;  // 0: variable (STRING) or not an element (ARRAY)
};
constexpr ValueTypeInfo kValueTypes[] = {
    {GgufValueType::kUint8, "UINT8", 1},     {GgufValueType::kInt8, "INT8", 1},
    {GgufValueType::kUint16, "UINT16", 2},   {GgufValueType::kInt16, "INT16", 2},
    {GgufValueType::kUint32, "UINT32", 4},   {GgufValueType::kInt32, "INT32", 4},
    {GgufValueType::kFloat32, "FLOAT32", 4}, {GgufValueType::kBool, "BOOL", 1},
    {GgufValueType::kString, "STRING", 0},   {GgufValueType::kArray, "ARRAY", 0},
    {GgufValueType::kUint64, "UINT64", 8},   {GgufValueType::kInt64, "INT64", 8},
    {GgufValueType::kFloat64, "FLOAT64", 8},
};

const ValueTypeInfo* FindValueType(uint32_t id) {
  for (const ValueTypeInfo& row : kValueTypes) {
    if (static_cast<uint32_t>(row.type) == id) return &row;
  }
  return nullptr;
}

// The value type id of each C++ type a value or an array element is stored as.
template <typename T>
constexpr GgufValueType ValueTypeOf() {
  if constexpr (std::is_same_v<T, uint8_t>) return GgufValueType::kUint8;
  else if constexpr (std::is_same_v<T, int8_t>) return GgufValueType::kInt8;
  else if constexpr (std::is_same_v<T, uint16_t>) return GgufValueType::kUint16;
  else if constexpr (std::is_same_v<T, int16_t>) return GgufValueType::kInt16;
  else if constexpr (std::is_same_v<T, uint32_t>) return GgufValueType::kUint32;
  else if constexpr (std::is_same_v<T, int32_t>) return GgufValueType::kInt32;
  else if constexpr (std::is_same_v<T, float>) return GgufValueType::kFloat32;
  else if constexpr (std::is_same_v<T, bool>) return GgufValueType::kBool;
  else if constexpr (std::is_same_v<T, std::string>) return GgufValueType::kString;
  else if constexpr (std::is_same_v<T, uint64_t>) return GgufValueType::kUint64;
  else if constexpr (std::is_same_v<T, int64_t>) return GgufValueType::kInt64;
  else if constexpr (std::is_same_v<T, double>) return GgufValueType::kFloat64;
  else if constexpr (std::is_same_v<T, GgufArray>) return GgufValueType::kArray;
  else static_assert(sizeof(T) == 0, "not a GGUF value type");
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the C++ type of a scalar or STRING value type
// and returns its result. `type` must not be kArray.
template <typename F>
absl::Status WithCppType(GgufValueType type, F&& f) {
  switch (type) {
    case GgufValueType::kUint8: return f(TypeTag<uint8_t>{});
    case GgufValueType::kInt8: return f(TypeTag<int8_t>{});
    case GgufValueType::kUint16: return f(TypeTag<uint16_t>{});
    case GgufValueType::kInt16: return f(TypeTag<int16_t>{});
    case GgufValueType::kUint32: return f(TypeTag<uint32_t>{});
    case GgufValueType::kInt32: return f(TypeTag<int32_t>{});
    case GgufValueType::kFloat32: return f(TypeTag<float>{});
    case GgufValueType::kBool: return f(TypeTag<bool>{});
    case GgufValueType::kString: return f(TypeTag<std::string>{});
    case GgufValueType::kUint64: return f(TypeTag<uint64_t>{});
    case GgufValueType::kInt64: return f(TypeTag<int64_t>{});
    case GgufValueType::kFloat64: return f(TypeTag<double>{});
    case GgufValueType::kArray: break;
  }
  return absl::InternalError("WithCppType: not a scalar type");
}

std::string Quoted(absl::string_view s) { return absl::StrCat("'", s, "'"); }

std::string NeString(const std::vector<int64_t>& ne) {
  return absl::StrCat("ne [", absl::StrJoin(ne, ", "), "]");
}

bool IsPowerOfTwo(uint64_t n) { return n != 0 && (n & (n - 1)) == 0; }

// `n` rounded up to a multiple of `alignment` (a power of two); false on overflow.
bool PadTo(uint64_t n, uint64_t alignment, uint64_t* padded) {
  if (__builtin_add_overflow(n, alignment - 1, padded)) return false;
  *padded &= ~(alignment - 1);
  return true;
}

// Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF.
bool IsValidUtf8(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    int extra = 0;
    uint32_t min = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      extra = 1, min = 0x80, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      extra = 2, min = 0x800, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      extra = 3, min = 0x10000, cp = c & 0x07;
    } else {
      return false;
    }
    if (s.size() - i <= static_cast<size_t>(extra)) return false;  // cut short
    for (int k = 1; k <= extra; ++k) {
      const auto next = static_cast<unsigned char>(s[i + k]);
      if ((next & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (next & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += extra + 1;
  }
  return true;
}

// ---------------------------------------------------------------- serializing

template <typename T>
void AppendNumber(T value, std::string* out) {
  out->append(reinterpret_cast<const char*>(&value), sizeof(T));
}

void AppendString(absl::string_view s, std::string* out) {
  AppendNumber<uint64_t>(s.size(), out);
  out->append(s.data(), s.size());
}

template <typename T>
void AppendElement(const T& value, std::string* out) {
  if constexpr (std::is_same_v<T, std::string>) {
    AppendString(value, out);
  } else if constexpr (std::is_same_v<T, bool>) {
    out->push_back(value ? 1 : 0);  // one byte, whatever sizeof(bool) is
  } else {
    AppendNumber<T>(value, out);
  }
}

// The value type id, then the value.
void AppendValue(const GgufValue& value, std::string* out) {
  AppendNumber(static_cast<uint32_t>(value.type()), out);
  value.Visit([out](const auto& v) {
    using T = std::decay_t<decltype(v)>;
    if constexpr (std::is_same_v<T, GgufArray>) {
      std::visit(
          [out](const auto& elements) {
            using E = typename std::decay_t<decltype(elements)>::value_type;
            AppendNumber(static_cast<uint32_t>(ValueTypeOf<E>()), out);
            AppendNumber<uint64_t>(elements.size(), out);
            for (const auto& e : elements) AppendElement<E>(e, out);
          },
          v);
    } else {
      AppendElement<T>(v, out);
    }
  });
}

// Checks what llama.cpp would refuse in a value: strings that are not UTF-8.
absl::Status CheckValueStrings(const GgufKeyValue& kv) {
  if (const std::string* s = kv.value.Get<std::string>(); s != nullptr && !IsValidUtf8(*s)) {
    return absl::InvalidArgumentError(
        absl::StrCat("key ", Quoted(kv.key), ": the string value is not valid UTF-8"));
  }
  if (const auto* strings = kv.value.Get<std::vector<std::string>>(); strings != nullptr) {
    for (size_t i = 0; i < strings->size(); ++i) {
      if (!IsValidUtf8((*strings)[i])) {
        return absl::InvalidArgumentError(absl::StrCat("key ", Quoted(kv.key), ": string ", i,
                                                       " of the array is not valid UTF-8"));
      }
    }
  }
  return absl::OkStatus();
}

// The alignment a file with this metadata has: general.alignment or 32.
absl::StatusOr<uint32_t> AlignmentOf(const std::vector<GgufKeyValue>& metadata,
                                     uint64_t max_alignment) {
  for (const GgufKeyValue& kv : metadata) {
    if (kv.key != kGgufAlignmentKey) continue;
    const uint32_t* alignment = kv.value.Get<uint32_t>();
    if (alignment == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("key ", Quoted(kv.key), ": type ", GgufValueTypeName(kv.value.type()),
                       ", but llama.cpp requires UINT32"));
    }
    if (!IsPowerOfTwo(*alignment) || *alignment > max_alignment) {
      return absl::InvalidArgumentError(absl::StrCat("key ", Quoted(kv.key), ": alignment ",
                                                     *alignment, " is not a power of two",
                                                     max_alignment < UINT32_MAX
                                                         ? absl::StrCat(" up to ", max_alignment)
                                                         : ""));
    }
    return *alignment;
  }
  return kGgufDefaultAlignment;
}

// ---------------------------------------------------------------- parsing

class HeaderParser {
 public:
  HeaderParser(absl::string_view bytes, uint64_t file_size, absl::string_view file)
      : bytes_(bytes.substr(0, std::min<uint64_t>(bytes.size(), file_size))),
        file_size_(file_size),
        file_(file) {}

  absl::StatusOr<GgufHeader> Parse() {
    GgufHeader header;
    RETURN_IF_ERROR(ParseFixedHeader(&header));
    uint64_t tensor_count = 0;
    uint64_t kv_count = 0;
    RETURN_IF_ERROR(Read(&tensor_count, "", "tensor_count"));
    RETURN_IF_ERROR(Read(&kv_count, "", "metadata_kv_count"));
    RETURN_IF_ERROR(CheckCount(kv_count, kMinKeyValueBytes, "metadata_kv_count"));
    RETURN_IF_ERROR(CheckCount(tensor_count, kMinTensorInfoBytes, "tensor_count"));

    std::unordered_set<std::string> keys;
    for (uint64_t i = 0; i < kv_count; ++i) {
      GgufKeyValue kv;
      RETURN_IF_ERROR(ParseKeyValue(i, &kv));
      if (!keys.insert(kv.key).second) {
        return Invalid(absl::StrCat("key ", Quoted(kv.key), " appears twice"));
      }
      header.metadata.push_back(std::move(kv));
    }
    absl::StatusOr<uint32_t> alignment = AlignmentOf(header.metadata, UINT32_MAX);
    if (!alignment.ok()) return Invalid(alignment.status().message());
    header.alignment = *alignment;

    std::unordered_set<std::string> names;
    for (uint64_t i = 0; i < tensor_count; ++i) {
      GgufTensorInfo tensor;
      RETURN_IF_ERROR(ParseTensorInfo(i, &tensor));
      if (!names.insert(tensor.name).second) {
        return InvalidTensor(tensor.name, "the name appears twice");
      }
      header.tensors.push_back(std::move(tensor));
    }
    // pos_ <= file_size_, so this cannot overflow for alignments up to 2^32.
    PadTo(pos_, header.alignment, &header.data_offset);
    RETURN_IF_ERROR(CheckDataLayout(header));
    return header;
  }

 private:
  absl::Status Invalid(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(file_, ": ", what));
  }
  absl::Status InvalidTensor(absl::string_view name, absl::string_view what) const {
    return Invalid(absl::StrCat("tensor ", Quoted(name), ": ", what));
  }

  uint64_t Remaining() const { return bytes_.size() - pos_; }

  // `context` ("key 'x': ", "tensor 3: ") and `what` name the field.
  absl::Status Truncated(absl::string_view context, absl::string_view what,
                         uint64_t needed) const {
    return Invalid(absl::StrCat(
        context, what, " at byte ", pos_, " needs ", needed, " bytes but ",
        bytes_.size() < file_size_
            ? absl::StrCat("only the first ", bytes_.size(), " bytes of the file were read")
            : absl::StrCat("the file ends at byte ", file_size_, " (truncated?)")));
  }

  template <typename T>
  absl::Status Read(T* out, absl::string_view context, absl::string_view what) {
    if (Remaining() < sizeof(T)) return Truncated(context, what, sizeof(T));
    std::memcpy(out, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }

  absl::Status ReadString(std::string* out, absl::string_view context, absl::string_view what) {
    uint64_t length = 0;
    RETURN_IF_ERROR(Read(&length, context, absl::StrCat(what, " length")));
    if (length > Remaining()) return Truncated(context, what, length);
    out->assign(bytes_.data() + pos_, length);
    pos_ += length;
    return absl::OkStatus();
  }

  // Where counts that do not fit come from, when only a prefix was given.
  std::string PrefixNote() const {
    return bytes_.size() < file_size_
               ? absl::StrCat(" (only the first ", bytes_.size(), " bytes of the file were read)")
               : "";
  }

  absl::Status CheckCount(uint64_t count, uint64_t min_bytes_each, absl::string_view what) const {
    if (count > Remaining() / min_bytes_each) {
      return Invalid(absl::StrCat(what, " ", count, " cannot fit in the ", Remaining(),
                                  " bytes left (at least ", min_bytes_each, " bytes each)",
                                  PrefixNote()));
    }
    return absl::OkStatus();
  }

  absl::Status ParseFixedHeader(GgufHeader* header) {
    if (bytes_.size() < sizeof(kMagic) ||
        std::memcmp(bytes_.data(), kMagic, sizeof(kMagic)) != 0) {
      if (bytes_.size() < sizeof(kMagic) && file_size_ < sizeof(kMagic)) {
        return Invalid(absl::StrCat("file of ", file_size_, " bytes is too short for a GGUF header"));
      }
      return Invalid("not a GGUF file (it does not start with the magic 'GGUF')");
    }
    pos_ = sizeof(kMagic);
    RETURN_IF_ERROR(Read(&header->version, "", "version"));
    if (header->version == kGgufVersion) return absl::OkStatus();
    if ((header->version & 0xFFFF) == 0) {
      return Invalid(absl::StrCat("version ", header->version,
                                  " looks byte-swapped: a big-endian GGUF file, which this "
                                  "reader does not support"));
    }
    if (header->version == 1 || header->version == 2) {
      return Invalid(absl::StrCat("GGUF version ", header->version,
                                  " is not supported; only version 3 is (convert the model "
                                  "again with a current llama.cpp)"));
    }
    return Invalid(absl::StrCat("unknown GGUF version ", header->version, " (only 3 is known)"));
  }

  absl::Status ParseKeyValue(uint64_t index, GgufKeyValue* kv) {
    const std::string context = absl::StrCat("metadata entry ", index, ": ");
    RETURN_IF_ERROR(ReadString(&kv->key, context, "key"));
    if (kv->key.empty()) return Invalid(absl::StrCat(context, "empty key"));
    if (!IsValidUtf8(kv->key)) return Invalid(absl::StrCat(context, "key is not valid UTF-8"));
    const std::string key_context = absl::StrCat("key ", Quoted(kv->key), ": ");
    uint32_t type_id = 0;
    RETURN_IF_ERROR(Read(&type_id, key_context, "value type"));
    const ValueTypeInfo* type = FindValueType(type_id);
    if (type == nullptr) {
      return Invalid(absl::StrCat(key_context, "unknown value type ", type_id));
    }
    if (type->type != GgufValueType::kArray) {
      return WithCppType(type->type, [&](auto tag) -> absl::Status {
        using T = typename decltype(tag)::type;
        T value{};
        RETURN_IF_ERROR(ReadElement(&value, key_context, "value"));
        kv->value = MakeValue(std::move(value));
        return absl::OkStatus();
      });
    }
    uint32_t element_id = 0;
    uint64_t count = 0;
    RETURN_IF_ERROR(Read(&element_id, key_context, "array element type"));
    const ValueTypeInfo* element = FindValueType(element_id);
    if (element == nullptr) {
      return Invalid(absl::StrCat(key_context, "unknown array element type ", element_id));
    }
    if (element->type == GgufValueType::kArray) {
      return Invalid(absl::StrCat(key_context,
                                  "arrays of arrays are not supported (llama.cpp refuses them too)"));
    }
    RETURN_IF_ERROR(Read(&count, key_context, "array length"));
    // A STRING element is at least its 8-byte length.
    const uint64_t min_element_bytes = element->element_bytes == 0 ? 8 : element->element_bytes;
    if (count > Remaining() / min_element_bytes) {
      return Invalid(absl::StrCat(key_context, "array of ", count, " ", element->name,
                                  " cannot fit in the ", Remaining(), " bytes left",
                                  PrefixNote()));
    }
    return WithCppType(element->type, [&](auto tag) -> absl::Status {
      using T = typename decltype(tag)::type;
      std::vector<T> elements;
      elements.reserve(count);  // bounded by the bytes left, checked above
      for (uint64_t i = 0; i < count; ++i) {
        T value{};
        RETURN_IF_ERROR(ReadElement(&value, key_context, absl::StrCat("array element ", i)));
        elements.push_back(std::move(value));
      }
      kv->value = GgufValue::Array(std::move(elements));
      return absl::OkStatus();
    });
  }

  template <typename T>
  absl::Status ReadElement(T* out, absl::string_view context, absl::string_view what) {
    if constexpr (std::is_same_v<T, std::string>) {
      return ReadString(out, context, what);
    } else if constexpr (std::is_same_v<T, bool>) {
      uint8_t byte = 0;
      RETURN_IF_ERROR(Read(&byte, context, what));
      if (byte > 1) {
        return Invalid(absl::StrCat(context, what, " is a BOOL of byte value ",
                                    static_cast<int>(byte), ", not 0 or 1"));
      }
      *out = byte == 1;
      return absl::OkStatus();
    } else {
      return Read(out, context, what);
    }
  }

  template <typename T>
  static GgufValue MakeValue(T v) {
    if constexpr (std::is_same_v<T, uint8_t>) return GgufValue::Uint8(v);
    else if constexpr (std::is_same_v<T, int8_t>) return GgufValue::Int8(v);
    else if constexpr (std::is_same_v<T, uint16_t>) return GgufValue::Uint16(v);
    else if constexpr (std::is_same_v<T, int16_t>) return GgufValue::Int16(v);
    else if constexpr (std::is_same_v<T, uint32_t>) return GgufValue::Uint32(v);
    else if constexpr (std::is_same_v<T, int32_t>) return GgufValue::Int32(v);
    else if constexpr (std::is_same_v<T, float>) return GgufValue::Float32(v);
    else if constexpr (std::is_same_v<T, bool>) return GgufValue::Bool(v);
    else if constexpr (std::is_same_v<T, std::string>) return GgufValue::String(std::move(v));
    else if constexpr (std::is_same_v<T, uint64_t>) return GgufValue::Uint64(v);
    else if constexpr (std::is_same_v<T, int64_t>) return GgufValue::Int64(v);
    else if constexpr (std::is_same_v<T, double>) return GgufValue::Float64(v);
  }

  absl::Status ParseTensorInfo(uint64_t index, GgufTensorInfo* tensor) {
    const std::string index_context = absl::StrCat("tensor ", index, ": ");
    RETURN_IF_ERROR(ReadString(&tensor->name, index_context, "name"));
    if (tensor->name.empty()) return Invalid(absl::StrCat(index_context, "empty name"));
    if (tensor->name.size() > kGgufMaxTensorNameBytes) {
      return InvalidTensor(tensor->name,
                           absl::StrCat("name of ", tensor->name.size(), " bytes is over ",
                                        "llama.cpp's limit of ", kGgufMaxTensorNameBytes));
    }
    if (!IsValidUtf8(tensor->name)) {
      return Invalid(absl::StrCat(index_context, "name is not valid UTF-8"));
    }
    const std::string context = absl::StrCat("tensor ", Quoted(tensor->name), ": ");
    uint32_t n_dims = 0;
    RETURN_IF_ERROR(Read(&n_dims, context, "n_dims"));
    if (n_dims < 1 || n_dims > kGgufMaxDims) {
      return InvalidTensor(tensor->name,
                           absl::StrCat("n_dims ", n_dims, " is not in 1..", kGgufMaxDims));
    }
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t dim = 0;
      RETURN_IF_ERROR(Read(&dim, context, absl::StrCat("ne[", d, "]")));
      if (dim > static_cast<uint64_t>(INT64_MAX)) {
        return InvalidTensor(tensor->name, absl::StrCat("ne[", d, "] = ", dim, " overflows int64"));
      }
      tensor->ne.push_back(static_cast<int64_t>(dim));
    }
    uint32_t type_id = 0;
    RETURN_IF_ERROR(Read(&type_id, context, "type"));
    std::optional<GgufTypeInfo> type = FindGgufType(type_id);
    if (!type) {
      std::vector<std::string> known;
      for (const GgufTypeInfo& row : kGgufTypes) {
        known.push_back(absl::StrCat(row.name, "=", static_cast<uint32_t>(row.type)));
      }
      return InvalidTensor(tensor->name,
                           absl::StrCat("ggml type id ", type_id, " is not one this reader knows (",
                                        absl::StrJoin(known, ", "), ")"));
    }
    tensor->type = type->type;
    absl::StatusOr<uint64_t> bytes = GgufTensorBytes(tensor->type, tensor->ne, tensor->name);
    if (!bytes.ok()) return Invalid(bytes.status().message());
    tensor->bytes = *bytes;
    return Read(&tensor->offset, context, "offset");
  }

  // llama.cpp's rule: tensors follow each other in declaration order, each
  // at the previous one's end rounded up to the alignment, from offset 0;
  // and the file ends with the last tensor's padding.
  absl::Status CheckDataLayout(const GgufHeader& header) const {
    uint64_t cursor = 0;  // relative to the data section
    const GgufTensorInfo* previous = nullptr;
    for (const GgufTensorInfo& t : header.tensors) {
      if (t.offset % header.alignment != 0) {
        return InvalidTensor(t.name, absl::StrCat("offset ", t.offset,
                                                  " is not a multiple of the alignment ",
                                                  header.alignment));
      }
      if (t.offset != cursor) {
        const std::string after =
            previous == nullptr
                ? std::string("the data section starts at 0")
                : absl::StrCat("tensor ", Quoted(previous->name), " [", previous->offset, ", ",
                               previous->offset + previous->bytes, ") ends at ", cursor,
                               " with its padding");
        return InvalidTensor(
            t.name, absl::StrCat("offset ", t.offset,
                                 t.offset < cursor ? " overlaps the data before it: "
                                                   : " leaves a gap (llama.cpp packs tensors in "
                                                     "order): ",
                                 after));
      }
      uint64_t end = 0;
      uint64_t padded_end = 0;
      if (__builtin_add_overflow(header.data_offset, t.offset, &end) ||
          __builtin_add_overflow(end, t.bytes, &end) || end > file_size_) {
        return InvalidTensor(
            t.name, absl::StrCat("data [", t.offset, ", ", t.offset + t.bytes,
                                 ") of the data section at byte ", header.data_offset,
                                 " reaches beyond the end of the file (", file_size_,
                                 " bytes; truncated?)"));
      }
      if (!PadTo(t.offset + t.bytes, header.alignment, &padded_end)) {
        return InvalidTensor(t.name, "offset plus size overflows");
      }
      cursor = padded_end;
      previous = &t;
    }
    uint64_t expected_size = 0;
    if (__builtin_add_overflow(header.data_offset, cursor, &expected_size)) {
      return Invalid("data section size overflows");
    }
    if (file_size_ != expected_size) {
      return Invalid(absl::StrCat(
          "the file has ", file_size_, " bytes but the header and ", header.tensors.size(),
          " tensors (each padded to ", header.alignment, " bytes) account for ", expected_size,
          file_size_ < expected_size ? " (truncated?)" : " (trailing bytes)"));
    }
    return absl::OkStatus();
  }

  absl::string_view bytes_;
  uint64_t file_size_;
  std::string file_;
  uint64_t pos_ = 0;
};

}  // namespace

// ---------------------------------------------------------------- values

const char* GgufValueTypeName(GgufValueType type) {
  const ValueTypeInfo* row = FindValueType(static_cast<uint32_t>(type));
  return row == nullptr ? "?" : row->name;
}

GgufValueType GgufValue::type() const {
  return std::visit([](const auto& v) { return ValueTypeOf<std::decay_t<decltype(v)>>(); },
                    value_);
}

GgufValueType GgufValue::element_type() const {
  const GgufArray* array = std::get_if<GgufArray>(&value_);
  if (array == nullptr) return type();
  return std::visit(
      [](const auto& elements) {
        return ValueTypeOf<typename std::decay_t<decltype(elements)>::value_type>();
      },
      *array);
}

size_t GgufValue::array_size() const {
  const GgufArray* array = std::get_if<GgufArray>(&value_);
  if (array == nullptr) return 0;
  return std::visit([](const auto& elements) { return elements.size(); }, *array);
}

// ---------------------------------------------------------------- header

int64_t GgufTensorInfo::NumElements() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;  // checked not to overflow when parsed or laid out
  return n;
}

std::vector<int64_t> GgufTensorInfo::TorchShape() const { return {ne.rbegin(), ne.rend()}; }

std::vector<int64_t> GgufNeFromTorchShape(const std::vector<int64_t>& torch_shape) {
  return {torch_shape.rbegin(), torch_shape.rend()};
}

const GgufValue* GgufHeader::FindMetadata(absl::string_view key) const {
  for (const GgufKeyValue& kv : metadata) {
    if (kv.key == key) return &kv.value;
  }
  return nullptr;
}

const GgufTensorInfo* GgufHeader::FindTensor(absl::string_view name) const {
  for (const GgufTensorInfo& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

uint64_t GgufHeader::DataSectionBytes() const {
  if (tensors.empty()) return 0;
  const GgufTensorInfo& last = tensors.back();
  uint64_t end = 0;
  PadTo(last.offset + last.bytes, alignment, &end);  // validated when parsed or laid out
  return end;
}

absl::StatusOr<uint64_t> GgufTensorBytes(GgufType type, const std::vector<int64_t>& ne,
                                         absl::string_view tensor_name) {
  auto invalid = [&](absl::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", Quoted(tensor_name), ": ", NeString(ne), " ", what));
  };
  const GgufTypeInfo& info = GgufTypeOf(type);
  if (ne.empty() || ne.size() > static_cast<size_t>(kGgufMaxDims)) {
    return invalid(absl::StrCat("has ", ne.size(), " dims; GGUF allows 1 to ", kGgufMaxDims));
  }
  int64_t elements = 1;
  for (int64_t d : ne) {
    if (d < 0) return invalid("has a negative dimension");
    if (__builtin_mul_overflow(elements, d, &elements)) return invalid("overflows int64");
  }
  if (ne[0] % info.block_elements != 0) {
    return invalid(absl::StrCat("of ", info.name, ": ne[0] = ", ne[0],
                                " is not a multiple of the block of ", info.block_elements));
  }
  // (ne[0] / block) * block_bytes * ne[1] * ...: whole rows of whole blocks.
  int64_t bytes = 0;
  if (__builtin_mul_overflow(elements / info.block_elements, info.block_bytes, &bytes)) {
    return invalid(absl::StrCat("of ", info.name, ": the byte size overflows int64"));
  }
  return static_cast<uint64_t>(bytes);
}

// ---------------------------------------------------------------- reading

absl::StatusOr<GgufHeader> ParseGgufHeader(absl::string_view file_start, uint64_t file_size,
                                           absl::string_view file_name) {
  return HeaderParser(file_start, file_size, file_name).Parse();
}

absl::StatusOr<GgufMappedFile> GgufMappedFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    const std::string message = absl::StrCat("open ", path, ": ", std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(message) : absl::PermissionDeniedError(message);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  const char* data = nullptr;
  if (size > 0) {  // mmap refuses a length of 0
    void* mapping = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (mapping == MAP_FAILED) {
      const std::string message = absl::StrCat("mmap ", path, ": ", std::strerror(errno));
      ::close(fd);
      return absl::InternalError(message);
    }
    data = static_cast<const char*>(mapping);
  }
  ::close(fd);  // the mapping stays valid
  absl::StatusOr<GgufHeader> header =
      ParseGgufHeader(absl::string_view(data == nullptr ? "" : data, size), size, path);
  if (!header.ok()) {
    if (data != nullptr) ::munmap(const_cast<char*>(data), size);
    return header.status();
  }
  return GgufMappedFile(path, *std::move(header), data, size);
}

GgufMappedFile::GgufMappedFile(GgufMappedFile&& other) noexcept
    : path_(std::move(other.path_)),
      header_(std::move(other.header_)),
      data_(other.data_),
      size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

GgufMappedFile::~GgufMappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<char*>(data_), size_);
}

absl::string_view GgufMappedFile::TensorBytes(const GgufTensorInfo& tensor) const {
  // In range: the parser checked data_offset + offset + bytes <= size.
  return absl::string_view(data_ + header_.data_offset + tensor.offset, tensor.bytes);
}

absl::StatusOr<absl::string_view> GgufMappedFile::TensorBytes(absl::string_view name) const {
  const GgufTensorInfo* tensor = header_.FindTensor(name);
  if (tensor == nullptr) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor ", Quoted(name)));
  }
  return TensorBytes(*tensor);
}

absl::StatusOr<GgufHeader> ReadGgufHeader(const std::string& path) {
  ASSIGN_OR_RETURN(GgufMappedFile file, GgufMappedFile::Open(path));
  return file.header();
}

// ---------------------------------------------------------------- writing

absl::StatusOr<GgufHeader> LayoutGguf(std::vector<GgufKeyValue> metadata,
                                      const std::vector<GgufTensorSpec>& tensors) {
  GgufHeader header;
  std::unordered_set<std::string> keys;
  for (const GgufKeyValue& kv : metadata) {
    if (kv.key.empty()) return absl::InvalidArgumentError("a metadata key is empty");
    if (kv.key.size() > kGgufMaxKeyBytes || !IsValidUtf8(kv.key)) {
      return absl::InvalidArgumentError(absl::StrCat("key ", Quoted(kv.key), ": over ",
                                                     kGgufMaxKeyBytes,
                                                     " bytes or not valid UTF-8"));
    }
    if (!keys.insert(kv.key).second) {
      return absl::InvalidArgumentError(absl::StrCat("key ", Quoted(kv.key), " appears twice"));
    }
    RETURN_IF_ERROR(CheckValueStrings(kv));
  }
  ASSIGN_OR_RETURN(header.alignment, AlignmentOf(metadata, kGgufMaxWriterAlignment));
  header.metadata = std::move(metadata);

  std::unordered_set<std::string> names;
  uint64_t cursor = 0;
  for (const GgufTensorSpec& spec : tensors) {
    if (spec.name.empty()) return absl::InvalidArgumentError("a tensor name is empty");
    if (spec.name.size() > kGgufMaxTensorNameBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", Quoted(spec.name), ": name of ", spec.name.size(),
                       " bytes is over llama.cpp's limit of ", kGgufMaxTensorNameBytes));
    }
    if (!IsValidUtf8(spec.name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", Quoted(spec.name), ": name is not valid UTF-8"));
    }
    if (!names.insert(spec.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", Quoted(spec.name), " appears twice"));
    }
    ASSIGN_OR_RETURN(uint64_t bytes, GgufTensorBytes(spec.type, spec.ne, spec.name));
    GgufTensorInfo info;
    info.name = spec.name;
    info.ne = spec.ne;
    info.type = spec.type;
    info.offset = cursor;
    info.bytes = bytes;
    if (__builtin_add_overflow(cursor, bytes, &cursor) ||
        !PadTo(cursor, header.alignment, &cursor)) {
      return absl::InvalidArgumentError("the total tensor size overflows");
    }
    header.tensors.push_back(std::move(info));
  }
  // The data section starts after the header, so its offset is known only
  // once the header is serialized.
  SerializeGgufHeader(&header);
  return header;
}

std::string SerializeGgufHeader(GgufHeader* header) {
  std::string out(kMagic, sizeof(kMagic));
  AppendNumber<uint32_t>(kGgufVersion, &out);
  AppendNumber<uint64_t>(header->tensors.size(), &out);
  AppendNumber<uint64_t>(header->metadata.size(), &out);
  for (const GgufKeyValue& kv : header->metadata) {
    AppendString(kv.key, &out);
    AppendValue(kv.value, &out);
  }
  for (const GgufTensorInfo& t : header->tensors) {
    AppendString(t.name, &out);
    AppendNumber<uint32_t>(static_cast<uint32_t>(t.ne.size()), &out);
    for (int64_t d : t.ne) AppendNumber<uint64_t>(static_cast<uint64_t>(d), &out);
    AppendNumber<uint32_t>(static_cast<uint32_t>(t.type), &out);
    AppendNumber<uint64_t>(t.offset, &out);
  }
  PadTo(out.size(), header->alignment, &header->data_offset);
  out.resize(header->data_offset, '\0');
  return out;
}

// The writer's thread: appends queued chunks to the temp file and hashes
// them, in order. Owns the file, so a moved GgufWriter keeps working.
class GgufWriter::Pipeline {
 public:
  explicit Pipeline(AtomicFileWriter file) : file_(std::move(file)) {
    thread_ = std::thread([this] { Run(); });
  }
  ~Pipeline() { Finish(); }  // joins; the temp file goes with file_ unless committed

  // Queues `data` and `zeros` zero bytes after it (waiting while another
  // chunk waits); the first write error, if one happened.
  absl::Status Push(std::string data, size_t zeros = 0) {
    std::unique_lock<std::mutex> lock(mu_);
    room_.wait(lock, [&] { return waiting_.empty() || !status_.ok(); });
    if (!status_.ok()) return status_;
    waiting_.push_back({std::move(data), zeros});
    work_.notify_one();
    return absl::OkStatus();
  }

  // Writes what is queued and stops the thread; the first write error.
  absl::Status Finish() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      closing_ = true;
    }
    work_.notify_one();
    if (thread_.joinable()) thread_.join();
    return status_;
  }

  AtomicFileWriter& file() { return file_; }
  std::string Sha256Hex() { return hash_.Hex(); }

 private:
  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      work_.wait(lock, [&] { return !waiting_.empty() || closing_; });
      if (waiting_.empty()) return;  // closing, all written
      Chunk chunk = std::move(waiting_.front());
      waiting_.pop_front();
      room_.notify_one();
      const bool failed = !status_.ok();
      lock.unlock();
      absl::Status written;
      if (!failed) {
        const std::string zeros(chunk.zeros, '\0');
        for (absl::string_view part : {absl::string_view(chunk.data), absl::string_view(zeros)}) {
          if (written.ok()) written = file_.Write(part);
          if (written.ok()) hash_.Update(part);
        }
      }
      lock.lock();
      if (!written.ok() && status_.ok()) {
        status_ = written;
        room_.notify_all();
      }
    }
  }

  struct Chunk {
    std::string data;
    size_t zeros = 0;  // padding written after it
  };
  AtomicFileWriter file_;
  Sha256 hash_;
  std::mutex mu_;
  std::condition_variable work_;  // a chunk is queued, or closing
  std::condition_variable room_;  // the queue has room, or a write failed
  std::deque<Chunk> waiting_;
  bool closing_ = false;
  absl::Status status_;
  std::thread thread_;
};

GgufWriter::GgufWriter(std::string path, GgufHeader header, std::unique_ptr<Pipeline> pipeline)
    : path_(std::move(path)), header_(std::move(header)), pipeline_(std::move(pipeline)) {}
GgufWriter::GgufWriter(GgufWriter&&) noexcept = default;
GgufWriter::~GgufWriter() = default;

absl::StatusOr<GgufWriter> GgufWriter::Open(const std::string& path,
                                            std::vector<GgufKeyValue> metadata,
                                            const std::vector<GgufTensorSpec>& tensors) {
  absl::StatusOr<GgufHeader> header = LayoutGguf(std::move(metadata), tensors);
  if (!header.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", header.status().message()));
  }
  std::string header_bytes = SerializeGgufHeader(&*header);
  ASSIGN_OR_RETURN(AtomicFileWriter file, AtomicFileWriter::Open(path));
  auto pipeline = std::make_unique<Pipeline>(std::move(file));
  RETURN_IF_ERROR(pipeline->Push(std::move(header_bytes)));
  return GgufWriter(path, *std::move(header), std::move(pipeline));
}

absl::Status GgufWriter::WriteTensor(absl::string_view name, std::string data) {
  if (broken_) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": an earlier write failed"));
  }
  if (next_tensor_ >= header_.tensors.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": tensor ", Quoted(name), " written after all ",
                     header_.tensors.size(), " declared tensors"));
  }
  const GgufTensorInfo& tensor = header_.tensors[next_tensor_];
  if (name != tensor.name) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor ", Quoted(name),
                                                   " written where ", Quoted(tensor.name),
                                                   " (tensor ", next_tensor_, ") comes next"));
  }
  if (data.size() != tensor.bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        path_, ": tensor ", Quoted(name), ": ", data.size(), " bytes given, but ",
        NeString(tensor.ne), " of ", GgufTypeOf(tensor.type).name, " is ", tensor.bytes));
  }
  uint64_t padded = 0;
  PadTo(tensor.bytes, header_.alignment, &padded);
  absl::Status queued = pipeline_->Push(std::move(data), padded - tensor.bytes);
  if (!queued.ok()) {
    broken_ = true;
    return queued;
  }
  ++next_tensor_;
  return absl::OkStatus();
}

absl::Status GgufWriter::Commit() {
  if (broken_) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": an earlier write failed"));
  }
  if (next_tensor_ < header_.tensors.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": tensor ", Quoted(header_.tensors[next_tensor_].name), " (",
                     next_tensor_ + 1, " of ", header_.tensors.size(), ") was not written"));
  }
  if (absl::Status written = pipeline_->Finish(); !written.ok()) {
    broken_ = true;
    return written;
  }
  // The same rule the reader applies: the file ends with the last padding.
  const uint64_t expected = header_.data_offset + header_.DataSectionBytes();
  const int64_t bytes_written = pipeline_->file().bytes_written();
  if (static_cast<uint64_t>(bytes_written) != expected) {
    return absl::InternalError(
        absl::StrCat(path_, ": wrote ", bytes_written, " bytes, expected ", expected));
  }
  RETURN_IF_ERROR(pipeline_->file().Commit());
  sha256_hex_ = pipeline_->Sha256Hex();
  return absl::OkStatus();
}

}  // namespace compress
