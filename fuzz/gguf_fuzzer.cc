// Fuzzes ParseGgufHeader, the in-memory parse that GgufMappedFile::Open and
// ReadGgufHeader run over a mapped file: the input is a whole .gguf file.
// Besides "no crash, no sanitizer report", it checks what a caller relies
// on: a refusal is INVALID_ARGUMENT; every accepted tensor's bytes lie
// inside the file, aligned, at the size its type and shape give (what
// GgufMappedFile::TensorBytes hands out unchecked); the header bytes alone
// give the same answer; and the writer lays the same tensors out at the
// same offsets and serializes a header that parses back the same.
#include <cstdint>
#include <string>
#include <vector>

#include "common/gguf_file.h"
#include "fuzz/fuzz_check.h"

namespace compress {
namespace {

bool SameTensors(const std::vector<GgufTensorInfo>& a, const std::vector<GgufTensorInfo>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].ne != b[i].ne || a[i].type != b[i].type ||
        a[i].offset != b[i].offset || a[i].bytes != b[i].bytes) {
      return false;
    }
  }
  return true;
}

bool SameKeys(const GgufHeader& a, const GgufHeader& b) {
  if (a.metadata.size() != b.metadata.size()) return false;
  for (size_t i = 0; i < a.metadata.size(); ++i) {
    // Types and sizes, not values: a float NaN is not equal to itself.
    const GgufValue& x = a.metadata[i].value;
    const GgufValue& y = b.metadata[i].value;
    if (a.metadata[i].key != b.metadata[i].key || x.type() != y.type() ||
        x.element_type() != y.element_type() || x.array_size() != y.array_size()) {
      return false;
    }
  }
  return true;
}

void CheckAccepted(const GgufHeader& header, uint64_t file_size) {
  FUZZ_CHECK(header.alignment != 0 && (header.alignment & (header.alignment - 1)) == 0,
             "alignment not a power of two");
  FUZZ_CHECK(header.data_offset % header.alignment == 0, "data section not aligned");
  FUZZ_CHECK(header.data_offset <= file_size, "data section past the end");
  for (const GgufTensorInfo& t : header.tensors) {
    FUZZ_CHECK(t.offset % header.alignment == 0, t.name);
    FUZZ_CHECK(t.offset <= file_size && t.bytes <= file_size &&
                   header.data_offset + t.offset + t.bytes <= file_size,
               t.name);
    const absl::StatusOr<uint64_t> bytes = GgufTensorBytes(t.type, t.ne, t.name);
    FUZZ_CHECK(bytes.ok() && *bytes == t.bytes, t.name);
    FUZZ_CHECK(header.FindTensor(t.name) == &t, t.name);
  }
  FUZZ_CHECK(header.data_offset + header.DataSectionBytes() == file_size,
             "the header and the tensors do not account for the file");
  for (const GgufKeyValue& kv : header.metadata) {
    FUZZ_CHECK(header.FindMetadata(kv.key) == &kv.value, kv.key);
  }
}

}  // namespace
}  // namespace compress

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace compress;
  const absl::string_view file(reinterpret_cast<const char*>(data), size);
  const absl::StatusOr<GgufHeader> header = ParseGgufHeader(file, size, "fuzz.gguf");
  if (!header.ok()) {
    FUZZ_CHECK_REFUSAL(header.status());
    return 0;
  }
  CheckAccepted(*header, size);

  // The header bytes alone, in a buffer of their own (ASan catches a read
  // past its end), with the size of the whole file.
  const std::vector<char> prefix(file.begin(), file.begin() + header->data_offset);
  const absl::StatusOr<GgufHeader> from_prefix =
      ParseGgufHeader(absl::string_view(prefix.data(), prefix.size()), size, "fuzz.gguf");
  FUZZ_CHECK(from_prefix.ok(), from_prefix.status().ToString());
  FUZZ_CHECK(SameTensors(header->tensors, from_prefix->tensors) && SameKeys(*header, *from_prefix),
             "prefix parse differs");

  // The writer's layout of the same declarations: same offsets, same header
  // size. (It refuses some files the reader takes: string values that are
  // not UTF-8, alignments over 1 MiB.)
  std::vector<GgufTensorSpec> specs;
  for (const GgufTensorInfo& t : header->tensors) specs.push_back({t.name, t.ne, t.type});
  const absl::StatusOr<GgufHeader> layout = LayoutGguf(header->metadata, specs);
  if (layout.ok()) {
    FUZZ_CHECK(SameTensors(layout->tensors, header->tensors), "writer layout differs");
    FUZZ_CHECK(layout->data_offset == header->data_offset && layout->alignment == header->alignment,
               "writer header size differs");
  }

  // Serialized again and followed by the same data section, it parses back.
  GgufHeader copy = *header;
  std::string rebuilt = SerializeGgufHeader(&copy);
  FUZZ_CHECK(copy.data_offset == header->data_offset, "serialized header size differs");
  rebuilt.append(file.data() + header->data_offset, size - header->data_offset);
  const absl::StatusOr<GgufHeader> reparsed = ParseGgufHeader(rebuilt, rebuilt.size(), "rebuilt");
  FUZZ_CHECK(reparsed.ok(), reparsed.status().ToString());
  FUZZ_CHECK(SameTensors(header->tensors, reparsed->tensors) && SameKeys(*header, *reparsed),
             "round trip differs");
  return 0;
}
