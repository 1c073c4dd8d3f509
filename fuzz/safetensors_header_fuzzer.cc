// Fuzzes ParseSafetensorsHeader: the input is a whole .safetensors file.
// Besides "no crash, no sanitizer report", it checks what a caller relies
// on: a refusal is INVALID_ARGUMENT; an accepted header tiles the data
// section exactly; the header bytes alone (how ReadSafetensorsHeader parses
// a large file) give the same answer; and the writer's serialization of an
// accepted header parses back to the same tensors.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common/safetensors_header.h"
#include "fuzz/fuzz_check.h"

namespace compress {
namespace {

bool SameTensors(const SafetensorsHeader& a, const SafetensorsHeader& b) {
  if (a.tensors.size() != b.tensors.size() || a.metadata != b.metadata) return false;
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    const SafetensorsTensorInfo& x = a.tensors[i];
    const SafetensorsTensorInfo& y = b.tensors[i];
    if (x.name != y.name || x.dtype != y.dtype || x.shape != y.shape ||
        x.data_begin != y.data_begin || x.data_end != y.data_end) {
      return false;
    }
  }
  return true;
}

void CheckAccepted(const SafetensorsHeader& header, uint64_t file_size) {
  uint64_t cursor = 0;
  for (const SafetensorsTensorInfo& t : header.tensors) {
    FUZZ_CHECK(!t.name.empty() && t.name != "__metadata__", t.name);
    FUZZ_CHECK(t.data_begin == cursor, t.name);
    FUZZ_CHECK(t.NumBytes() == static_cast<uint64_t>(t.NumElements()) * DtypeBytes(t.dtype),
               t.name);
    FUZZ_CHECK(header.Find(t.name) != nullptr, t.name);
    cursor = t.data_end;
  }
  FUZZ_CHECK(cursor == header.DataSectionBytes(), "data section size");
  FUZZ_CHECK(header.DataSectionOffset() + header.DataSectionBytes() == file_size,
             "the header and the tensors do not account for the file");
}

}  // namespace
}  // namespace compress

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace compress;
  const absl::string_view file(reinterpret_cast<const char*>(data), size);
  const absl::StatusOr<SafetensorsHeader> header =
      ParseSafetensorsHeader(file, size, "fuzz.safetensors");
  if (!header.ok()) FUZZ_CHECK_REFUSAL(header.status());

  // Only the length prefix and the JSON, in a buffer of their own (ASan
  // catches a read past its end), with the size of the whole file.
  uint64_t json_bytes = 0;
  if (size >= 8) std::memcpy(&json_bytes, data, 8);
  if (size >= 8 && json_bytes <= size - 8) {
    const std::vector<char> prefix(file.begin(), file.begin() + 8 + json_bytes);
    const absl::StatusOr<SafetensorsHeader> from_prefix = ParseSafetensorsHeader(
        absl::string_view(prefix.data(), prefix.size()), size, "fuzz.safetensors");
    FUZZ_CHECK(from_prefix.ok() == header.ok(), from_prefix.status().ToString());
    if (header.ok()) FUZZ_CHECK(SameTensors(*header, *from_prefix), "prefix parse differs");
  }
  if (!header.ok()) return 0;
  CheckAccepted(*header, size);

  // What the writer makes of it parses back to the same header.
  SafetensorsHeader copy = *header;
  const absl::StatusOr<std::string> serialized = SerializeSafetensorsHeader(&copy);
  FUZZ_CHECK(serialized.ok(), serialized.status().ToString());
  FUZZ_CHECK(serialized->size() % 8 == 0, "serialized header not padded to 8 bytes");
  const absl::StatusOr<SafetensorsHeader> reparsed = ParseSafetensorsHeader(
      *serialized, serialized->size() + header->DataSectionBytes(), "roundtrip.safetensors");
  FUZZ_CHECK(reparsed.ok(), reparsed.status().ToString());
  FUZZ_CHECK(SameTensors(*header, *reparsed), "round trip differs");
  return 0;
}
