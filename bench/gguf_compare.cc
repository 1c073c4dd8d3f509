// Compares the tensors of two GGUF files by name: type, shape and bytes
// (metadata and tensor order may differ). For each tensor that differs it
// prints how many of its blocks differ. Exit 0 when every tensor of A is in
// B with the same bytes, 1 otherwise.
//
//   gguf_compare A.gguf B.gguf
#include <cstdio>
#include <string>

#include "common/gguf_file.h"
#include "common/gguf_types.h"

namespace {

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "gguf_compare: %s\n", status.ToString().c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: gguf_compare A.gguf B.gguf\n");
    return 2;
  }
  absl::StatusOr<compress::GgufMappedFile> a = compress::GgufMappedFile::Open(argv[1]);
  if (!a.ok()) return Fail(a.status());
  absl::StatusOr<compress::GgufMappedFile> b = compress::GgufMappedFile::Open(argv[2]);
  if (!b.ok()) return Fail(b.status());
  int identical = 0;
  int total = 0;
  for (const compress::GgufTensorInfo& tensor : a->header().tensors) {
    ++total;
    const compress::GgufTensorInfo* other = b->header().FindTensor(tensor.name);
    if (other == nullptr) {
      std::printf("%s: only in %s\n", tensor.name.c_str(), argv[1]);
      continue;
    }
    const std::string type = compress::GgufTypeOf(tensor.type).name;
    const std::string other_type = compress::GgufTypeOf(other->type).name;
    if (type != other_type || tensor.ne != other->ne) {
      std::printf("%s: %s vs %s, or another shape\n", tensor.name.c_str(), type.c_str(),
                  other_type.c_str());
      continue;
    }
    const absl::string_view bytes = a->TensorBytes(tensor);
    const absl::string_view other_bytes = b->TensorBytes(*other);
    if (bytes == other_bytes) {
      ++identical;
      continue;
    }
    const size_t block = static_cast<size_t>(compress::GgufTypeOf(tensor.type).block_bytes);
    size_t blocks = bytes.size() / block, differing = 0;
    for (size_t i = 0; i < blocks; ++i) {
      if (bytes.substr(i * block, block) != other_bytes.substr(i * block, block)) ++differing;
    }
    std::printf("%s (%s): %zu of %zu blocks differ\n", tensor.name.c_str(), type.c_str(),
                differing, blocks);
  }
  const bool same_count = a->header().tensors.size() == b->header().tensors.size();
  std::printf("%d of %d tensors identical%s\n", identical, total,
              same_count ? "" : " (the files hold different numbers of tensors)");
  return identical == total && same_count ? 0 : 1;
}
