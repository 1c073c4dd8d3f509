#include "common/safetensors_header.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace compress {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors is little-endian; this code reads it in place");

constexpr SafetensorsDtypeInfo kDtypeTable[] = {
    {SafetensorsDtype::kBool, "BOOL", 1, false},
    {SafetensorsDtype::kU8, "U8", 1, false},
    {SafetensorsDtype::kI8, "I8", 1, false},
    {SafetensorsDtype::kI16, "I16", 2, false},
    {SafetensorsDtype::kU16, "U16", 2, false},
    {SafetensorsDtype::kF16, "F16", 2, true},
    {SafetensorsDtype::kBF16, "BF16", 2, true},
    {SafetensorsDtype::kI32, "I32", 4, false},
    {SafetensorsDtype::kU32, "U32", 4, false},
    {SafetensorsDtype::kF32, "F32", 4, true},
    {SafetensorsDtype::kF64, "F64", 8, false},
    {SafetensorsDtype::kI64, "I64", 8, false},
    {SafetensorsDtype::kU64, "U64", 8, false},
    {SafetensorsDtype::kF8E4M3, "F8_E4M3", 1, false},
    {SafetensorsDtype::kF8E5M2, "F8_E5M2", 1, false},
};

std::string Quoted(absl::string_view s) { return absl::StrCat("'", s, "'"); }

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status Invalid(absl::string_view file, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(file, ": ", what));
}

absl::Status InvalidTensor(absl::string_view file, absl::string_view tensor,
                           absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(file, ": tensor ", Quoted(tensor), ": ", what));
}

// Elements and bytes of a shape, or an error on a negative dimension or an
// overflow of int64.
absl::StatusOr<uint64_t> ShapeBytes(const std::vector<int64_t>& shape, SafetensorsDtype dtype,
                                    absl::string_view file, absl::string_view tensor) {
  int64_t elements = 1;
  for (int64_t d : shape) {
    if (d < 0) {
      return InvalidTensor(file, tensor,
                           absl::StrCat("negative dimension in shape ", ShapeString(shape)));
    }
    if (__builtin_mul_overflow(elements, d, &elements)) {
      return InvalidTensor(file, tensor,
                           absl::StrCat("shape ", ShapeString(shape), " overflows int64"));
    }
  }
  int64_t bytes = 0;
  if (__builtin_mul_overflow(elements, static_cast<int64_t>(DtypeBytes(dtype)), &bytes)) {
    return InvalidTensor(file, tensor,
                         absl::StrCat("byte size of shape ", ShapeString(shape), " ",
                                      DtypeName(dtype), " overflows int64"));
  }
  return static_cast<uint64_t>(bytes);
}

// Rejects duplicate keys in any JSON object: nlohmann would silently keep the
// last one, and two entries for one tensor name mean a corrupt header.
class DuplicateKeyCheck {
 public:
  bool operator()(int /*depth*/, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    if (event == Event::object_start) {
      open_objects_.emplace_back();
    } else if (event == Event::object_end) {
      if (!open_objects_.empty()) open_objects_.pop_back();
    } else if (event == Event::key && !open_objects_.empty()) {
      const std::string& key = parsed.get_ref<const std::string&>();
      if (!open_objects_.back().insert(key).second && duplicate_.empty()) duplicate_ = key;
    }
    return true;
  }
  const std::string& duplicate() const { return duplicate_; }

 private:
  std::vector<std::set<std::string>> open_objects_;
  std::string duplicate_;
};

absl::StatusOr<uint64_t> ParseOffset(const nlohmann::json& value, absl::string_view file,
                                     absl::string_view tensor) {
  if (!value.is_number_unsigned()) {
    return InvalidTensor(
        file, tensor,
        absl::StrCat("data_offsets entry ", value.dump(), " is not a non-negative integer"));
  }
  return value.get<uint64_t>();
}

absl::StatusOr<SafetensorsTensorInfo> ParseTensorEntry(const std::string& name,
                                                       const nlohmann::json& entry,
                                                       absl::string_view file) {
  if (name.empty()) return Invalid(file, "a tensor has an empty name");
  if (!entry.is_object()) return InvalidTensor(file, name, "entry is not a JSON object");
  SafetensorsTensorInfo info;
  info.name = name;

  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end()) return InvalidTensor(file, name, "missing field 'dtype'");
  if (!dtype_it->is_string()) return InvalidTensor(file, name, "'dtype' is not a string");
  absl::StatusOr<SafetensorsDtype> dtype =
      ParseSafetensorsDtype(dtype_it->get_ref<const std::string&>());
  if (!dtype.ok()) return InvalidTensor(file, name, dtype.status().message());
  info.dtype = *dtype;

  auto shape_it = entry.find("shape");
  if (shape_it == entry.end()) return InvalidTensor(file, name, "missing field 'shape'");
  if (!shape_it->is_array()) return InvalidTensor(file, name, "'shape' is not an array");
  for (const nlohmann::json& dim : *shape_it) {
    if (dim.is_number_integer() && !dim.is_number_unsigned()) {
      return InvalidTensor(file, name,
                           absl::StrCat("negative dimension in shape ", shape_it->dump()));
    }
    if (!dim.is_number_unsigned()) {
      return InvalidTensor(
          file, name, absl::StrCat("shape ", shape_it->dump(), " has a non-integer dimension"));
    }
    uint64_t d = dim.get<uint64_t>();
    if (d > static_cast<uint64_t>(INT64_MAX)) {
      return InvalidTensor(file, name,
                           absl::StrCat("shape ", shape_it->dump(), " overflows int64"));
    }
    info.shape.push_back(static_cast<int64_t>(d));
  }

  auto offsets_it = entry.find("data_offsets");
  if (offsets_it == entry.end()) return InvalidTensor(file, name, "missing field 'data_offsets'");
  if (!offsets_it->is_array() || offsets_it->size() != 2) {
    return InvalidTensor(file, name, "'data_offsets' is not an array [begin, end]");
  }
  absl::StatusOr<uint64_t> begin = ParseOffset((*offsets_it)[0], file, name);
  if (!begin.ok()) return begin.status();
  absl::StatusOr<uint64_t> end = ParseOffset((*offsets_it)[1], file, name);
  if (!end.ok()) return end.status();
  if (*end < *begin) {
    return InvalidTensor(file, name,
                         absl::StrCat("data_offsets [", *begin, ", ", *end, "] end before begin"));
  }
  info.data_begin = *begin;
  info.data_end = *end;

  absl::StatusOr<uint64_t> expected = ShapeBytes(info.shape, info.dtype, file, name);
  if (!expected.ok()) return expected.status();
  if (info.NumBytes() != *expected) {
    return InvalidTensor(
        file, name,
        absl::StrCat("data_offsets [", info.data_begin, ", ", info.data_end, "] span ",
                     info.NumBytes(), " bytes but shape ", ShapeString(info.shape), " of ",
                     DtypeName(info.dtype), " needs ", *expected));
  }
  return info;
}

// Tensors must tile [0, data_bytes) exactly: sorted by offset, each starts
// where the previous ended and the last ends at the end of the file.
absl::Status CheckTiling(std::vector<SafetensorsTensorInfo>& tensors, uint64_t data_bytes,
                         absl::string_view file) {
  std::sort(tensors.begin(), tensors.end(), [](const auto& a, const auto& b) {
    return std::tie(a.data_begin, a.data_end, a.name) < std::tie(b.data_begin, b.data_end, b.name);
  });
  uint64_t cursor = 0;
  const SafetensorsTensorInfo* previous = nullptr;
  for (const SafetensorsTensorInfo& t : tensors) {
    if (t.data_end > data_bytes) {
      return InvalidTensor(file, t.name,
                           absl::StrCat("data_offsets [", t.data_begin, ", ", t.data_end,
                                        "] reach beyond the data section of ", data_bytes,
                                        " bytes (file truncated?)"));
    }
    if (t.data_begin < cursor) {
      return InvalidTensor(file, t.name,
                           absl::StrCat("data_offsets [", t.data_begin, ", ", t.data_end,
                                        "] overlap tensor ", Quoted(previous->name), " [",
                                        previous->data_begin, ", ", previous->data_end, "]"));
    }
    if (t.data_begin > cursor) {
      return InvalidTensor(file, t.name,
                           absl::StrCat("data_offsets begin at ", t.data_begin, " but the ",
                                        previous ? "previous tensor ends" : "data section starts",
                                        " at ", cursor, " (a gap of unowned bytes)"));
    }
    cursor = t.data_end;
    previous = &t;
  }
  if (cursor != data_bytes) {
    return Invalid(
        file, absl::StrCat("the data section has ", data_bytes, " bytes but tensors ",
                           "cover only ", cursor,
                           previous ? absl::StrCat(" (last tensor ", Quoted(previous->name), ")")
                                    : std::string()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::map<std::string, std::string>> ParseMetadata(const nlohmann::json& value,
                                                                 absl::string_view file) {
  if (!value.is_object()) return Invalid(file, "'__metadata__' is not a JSON object");
  std::map<std::string, std::string> metadata;
  for (auto it = value.begin(); it != value.end(); ++it) {
    if (!it.value().is_string()) {
      return Invalid(
          file, absl::StrCat("'__metadata__' value for ", Quoted(it.key()), " is not a string"));
    }
    metadata[it.key()] = it.value().get<std::string>();
  }
  return metadata;
}

}  // namespace

const SafetensorsDtypeInfo& DtypeInfo(SafetensorsDtype dtype) {
  for (const SafetensorsDtypeInfo& row : kDtypeTable) {
    if (row.dtype == dtype) return row;
  }
  return kDtypeTable[0];  // unreachable: every enumerator has a row
}

absl::StatusOr<SafetensorsDtype> ParseSafetensorsDtype(absl::string_view name) {
  for (const SafetensorsDtypeInfo& row : kDtypeTable) {
    if (name == row.name) return row.dtype;
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported dtype ", Quoted(name)));
}

int64_t SafetensorsTensorInfo::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated not to overflow when parsed
  return n;
}

uint64_t SafetensorsHeader::DataSectionBytes() const {
  return tensors.empty() ? 0 : tensors.back().data_end;
}

const SafetensorsTensorInfo* SafetensorsHeader::Find(absl::string_view name) const {
  for (const SafetensorsTensorInfo& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::string_view file_start,
                                                         uint64_t file_size,
                                                         absl::string_view file_name) {
  if (file_size < 8 || file_start.size() < 8) {
    return Invalid(file_name, absl::StrCat("file of ", file_size,
                                           " bytes is too short for the 8-byte header length"));
  }
  uint64_t json_bytes = 0;
  std::memcpy(&json_bytes, file_start.data(), 8);  // little-endian, asserted above
  if (json_bytes > kMaxSafetensorsHeaderBytes) {
    return Invalid(file_name, absl::StrCat("header length ", json_bytes, " is over the limit of ",
                                           kMaxSafetensorsHeaderBytes, " bytes"));
  }
  if (json_bytes > file_size - 8) {
    return Invalid(file_name, absl::StrCat("header length ", json_bytes, " reaches beyond the ",
                                           "end of the file (", file_size, " bytes)"));
  }
  if (file_start.size() < 8 + json_bytes) {
    return Invalid(file_name, "header not fully read");
  }
  absl::string_view json_text = file_start.substr(8, json_bytes);

  SafetensorsHeader header;
  header.json_bytes = json_bytes;
  nlohmann::json root;
  DuplicateKeyCheck duplicates;
  try {
    root = nlohmann::json::parse(json_text.begin(), json_text.end(), std::ref(duplicates));
  } catch (const nlohmann::json::exception& e) {
    return Invalid(file_name, absl::StrCat("header is not valid JSON: ", e.what()));
  }
  if (!duplicates.duplicate().empty()) {
    return Invalid(file_name,
                   absl::StrCat("header has the key ", Quoted(duplicates.duplicate()), " twice"));
  }
  if (!root.is_object()) return Invalid(file_name, "header is not a JSON object");

  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == "__metadata__") {
      absl::StatusOr<std::map<std::string, std::string>> metadata =
          ParseMetadata(it.value(), file_name);
      if (!metadata.ok()) return metadata.status();
      header.metadata = *std::move(metadata);
      continue;
    }
    absl::StatusOr<SafetensorsTensorInfo> info = ParseTensorEntry(it.key(), it.value(), file_name);
    if (!info.ok()) return info.status();
    header.tensors.push_back(*std::move(info));
  }
  absl::Status tiling = CheckTiling(header.tensors, file_size - 8 - json_bytes, file_name);
  if (!tiling.ok()) return tiling;
  return header;
}

absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeader(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return absl::NotFoundError(absl::StrCat("open ", path));
  const uint64_t file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  std::string prefix(std::min<uint64_t>(file_size, 8), '\0');
  in.read(prefix.data(), static_cast<std::streamsize>(prefix.size()));
  if (prefix.size() == 8) {
    uint64_t json_bytes = 0;
    std::memcpy(&json_bytes, prefix.data(), 8);
    // Read the JSON only when its length is plausible; the parser reports the rest.
    if (json_bytes <= kMaxSafetensorsHeaderBytes && json_bytes <= file_size - 8) {
      prefix.resize(8 + json_bytes);
      in.read(prefix.data() + 8, static_cast<std::streamsize>(json_bytes));
      if (!in) return absl::DataLossError(absl::StrCat("read ", path, ": short read"));
    }
  }
  return ParseSafetensorsHeader(prefix, file_size, path);
}

absl::StatusOr<SafetensorsHeader> LayoutSafetensors(
    const std::vector<SafetensorsTensorSpec>& tensors,
    const std::map<std::string, std::string>& metadata) {
  SafetensorsHeader header;
  header.metadata = metadata;
  std::set<std::string> names;
  uint64_t cursor = 0;
  for (const SafetensorsTensorSpec& spec : tensors) {
    if (spec.name.empty() || spec.name == "__metadata__") {
      return absl::InvalidArgumentError(absl::StrCat("invalid tensor name ", Quoted(spec.name)));
    }
    if (!names.insert(spec.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", Quoted(spec.name), " twice"));
    }
    absl::StatusOr<uint64_t> bytes = ShapeBytes(spec.shape, spec.dtype, "(writer)", spec.name);
    if (!bytes.ok()) return bytes.status();
    SafetensorsTensorInfo info;
    info.name = spec.name;
    info.dtype = spec.dtype;
    info.shape = spec.shape;
    info.data_begin = cursor;
    if (__builtin_add_overflow(cursor, *bytes, &cursor)) {
      return absl::InvalidArgumentError("total tensor size overflows");
    }
    info.data_end = cursor;
    header.tensors.push_back(std::move(info));
  }
  return header;
}

absl::StatusOr<std::string> SerializeSafetensorsHeader(SafetensorsHeader* header) {
  // ordered_json keeps tensors in data order, which makes headers readable.
  nlohmann::ordered_json root = nlohmann::ordered_json::object();
  if (!header->metadata.empty()) {
    nlohmann::ordered_json metadata = nlohmann::ordered_json::object();
    for (const auto& [key, value] : header->metadata) metadata[key] = value;
    root["__metadata__"] = std::move(metadata);
  }
  for (const SafetensorsTensorInfo& t : header->tensors) {
    root[t.name] = {{"dtype", DtypeName(t.dtype)},
                    {"shape", t.shape},
                    {"data_offsets", {t.data_begin, t.data_end}}};
  }
  std::string json_text;
  try {
    json_text = root.dump();
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors header: ", e.what()));
  }
  json_text.append((8 - json_text.size() % 8) % 8, ' ');
  header->json_bytes = json_text.size();
  std::string out(8, '\0');
  const uint64_t n = json_text.size();
  std::memcpy(out.data(), &n, 8);
  out += json_text;
  return out;
}

}  // namespace compress
