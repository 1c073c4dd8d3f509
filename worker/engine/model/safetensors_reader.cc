#include "worker/engine/model/safetensors_reader.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status_macros.h"
#include "worker/engine/model/tensor_dtype.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace fs = std::filesystem;

struct MappedFile {
  void* data = nullptr;
  size_t size = 0;
  ~MappedFile() {
    if (data != nullptr) ::munmap(data, size);
  }
};

namespace {

std::string Quoted(absl::string_view s) { return absl::StrCat("'", s, "'"); }

absl::StatusOr<std::shared_ptr<MappedFile>> MapWholeFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    std::string msg = absl::StrCat("open ", path, ": ", std::strerror(err));
    if (err == ENOENT) return absl::NotFoundError(msg);
    if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
    return absl::InternalError(msg);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::InternalError(absl::StrCat("stat ", path, ": ", std::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  auto mapping = std::make_shared<MappedFile>();
  mapping->size = static_cast<size_t>(st.st_size);
  if (mapping->size > 0) {
    // Private and writable: ATen sees ordinary writable memory, and a write to
    // a view copies the page instead of changing the checkpoint (or faulting).
    // NORESERVE: the pages are backed by the file, not by swap.
    void* data =
        ::mmap(nullptr, mapping->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
    if (data == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat("mmap ", path, ": ", std::strerror(err)));
    }
    mapping->data = data;
  }
  ::close(fd);  // the mapping keeps the file open
  return mapping;
}

absl::Status InvalidIndex(const std::string& index_path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(index_path, ": ", what));
}

// A shard must be a plain file name in the index's own folder: no separator,
// no "." or "..", so an index can never point outside its checkpoint.
bool IsPlainFileName(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\\') == std::string::npos && name.find('\0') == std::string::npos;
}

}  // namespace

std::string FileBaseName(const std::string& path) { return fs::path(path).filename().string(); }

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> SafetensorsFile::Open(
    const std::string& path) {
  ASSIGN_OR_RETURN(std::shared_ptr<MappedFile> mapping, MapWholeFile(path));
  absl::string_view contents(static_cast<const char*>(mapping->data), mapping->size);
  ASSIGN_OR_RETURN(SafetensorsHeader header, ParseSafetensorsHeader(contents, mapping->size, path));
  return std::shared_ptr<const SafetensorsFile>(
      new SafetensorsFile(path, std::move(mapping), std::move(header)));
}

uint64_t SafetensorsFile::file_size() const { return mapping_->size; }

absl::string_view SafetensorsFile::Bytes(const SafetensorsTensorInfo& info) const {
  const char* base = static_cast<const char*>(mapping_->data) + header_.DataSectionOffset();
  return absl::string_view(base + info.data_begin, info.NumBytes());
}

void SafetensorsFile::ReleasePages(const SafetensorsTensorInfo& info) const {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  absl::string_view bytes = Bytes(info);
  // Only the pages wholly inside the tensor: its neighbours may be in use.
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(bytes.data()) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(bytes.data()) + bytes.size()) / page * page;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

absl::StatusOr<at::Tensor> SafetensorsFile::View(const SafetensorsTensorInfo& info) const {
  std::optional<at::ScalarType> type = ToScalarType(info.dtype);
  if (!type) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor ", Quoted(info.name),
                                                   ": dtype ", DtypeName(info.dtype),
                                                   " has no ATen equivalent"));
  }
  return CatchTorchErrors(
      absl::StrCat(path_, ": tensor ", Quoted(info.name)), [&]() -> absl::StatusOr<at::Tensor> {
        absl::string_view bytes = Bytes(info);
        auto options = at::TensorOptions().dtype(*type).device(at::kCPU);
        const bool aligned = reinterpret_cast<uintptr_t>(bytes.data()) %
                                 static_cast<uintptr_t>(DtypeBytes(info.dtype)) ==
                             0;
        if (!aligned || bytes.empty()) {
          // Misaligned data (legal in the format, e.g. after an odd-sized F16
          // tensor) would break vectorized kernels: copy it out.
          at::Tensor copy = at::empty(info.shape, options);
          if (!bytes.empty()) std::memcpy(copy.data_ptr(), bytes.data(), bytes.size());
          return copy;
        }
        std::shared_ptr<MappedFile> keep_alive = mapping_;
        return at::from_blob(
            const_cast<char*>(bytes.data()), info.shape,
            [keep_alive](void*) mutable { keep_alive.reset(); }, options);
      });
}

absl::StatusOr<SafetensorsCheckpoint> SafetensorsCheckpoint::Open(const std::string& path) {
  std::error_code ec;
  fs::file_status status = fs::status(path, ec);
  if (ec || !fs::exists(status))
    return absl::NotFoundError(absl::StrCat("model ", path, " does not exist"));

  SafetensorsCheckpoint checkpoint;
  std::vector<std::string> shard_paths;
  std::string index_path;
  if (fs::is_directory(status)) {
    checkpoint.folder_ = path;
    if (fs::exists(fs::path(path) / kSafetensorsIndexFileName)) {
      index_path = (fs::path(path) / kSafetensorsIndexFileName).string();
    } else if (fs::exists(fs::path(path) / kSingleSafetensorsFileName)) {
      shard_paths.push_back((fs::path(path) / kSingleSafetensorsFileName).string());
    } else {
      for (const fs::directory_entry& entry : fs::directory_iterator(path, ec)) {
        if (entry.path().extension() == ".safetensors")
          shard_paths.push_back(entry.path().string());
      }
      if (shard_paths.size() != 1) {
        return absl::InvalidArgumentError(absl::StrCat(
            "model folder ", path, " has no ", kSafetensorsIndexFileName, " and ",
            shard_paths.empty()
                ? "no .safetensors file"
                : absl::StrCat(shard_paths.size(), " .safetensors files (ambiguous)")));
      }
    }
  } else {
    if (absl::EndsWith(path, ".json")) {
      index_path = path;
    } else {
      shard_paths.push_back(path);
    }
    checkpoint.folder_ = fs::path(path).parent_path().string();
    if (checkpoint.folder_.empty()) checkpoint.folder_ = ".";
  }

  // shard file name -> tensor names the index assigns to it
  std::map<std::string, std::set<std::string>> index_assignment;
  if (!index_path.empty()) {
    checkpoint.sharded_ = true;
    absl::StatusOr<std::string> text = ReadFile(index_path, int64_t{256} << 20);
    if (!text.ok()) return text.status();
    nlohmann::json root;
    try {
      root = nlohmann::json::parse(*text);
    } catch (const nlohmann::json::exception& e) {
      return InvalidIndex(index_path, absl::StrCat("not valid JSON: ", e.what()));
    }
    if (!root.is_object()) return InvalidIndex(index_path, "not a JSON object");
    auto metadata = root.find("metadata");
    if (metadata != root.end() && !metadata->is_null()) {
      if (!metadata->is_object()) return InvalidIndex(index_path, "'metadata' is not an object");
      for (auto it = metadata->begin(); it != metadata->end(); ++it) {
        checkpoint.index_metadata_[it.key()] =
            it.value().is_string() ? it.value().get<std::string>() : it.value().dump();
      }
    }
    auto weight_map = root.find("weight_map");
    if (weight_map == root.end() || !weight_map->is_object()) {
      return InvalidIndex(index_path, "missing object 'weight_map'");
    }
    for (auto it = weight_map->begin(); it != weight_map->end(); ++it) {
      if (!it.value().is_string()) {
        return InvalidIndex(index_path,
                            absl::StrCat("tensor ", Quoted(it.key()), ": shard is not a string"));
      }
      const std::string& shard = it.value().get_ref<const std::string&>();
      if (!IsPlainFileName(shard)) {
        return InvalidIndex(index_path,
                            absl::StrCat("tensor ", Quoted(it.key()), ": shard ", Quoted(shard),
                                         " is not a file name in the model folder"));
      }
      index_assignment[shard].insert(it.key());
    }
    if (index_assignment.empty()) return InvalidIndex(index_path, "'weight_map' is empty");
    for (const auto& [shard, names] : index_assignment) {
      std::string shard_path = (fs::path(checkpoint.folder_) / shard).string();
      if (!fs::is_regular_file(shard_path, ec)) {
        return InvalidIndex(index_path,
                            absl::StrCat("tensor ", Quoted(*names.begin()), " maps to shard ",
                                         Quoted(shard), ", which does not exist"));
      }
      shard_paths.push_back(shard_path);
    }
  }

  for (const std::string& shard_path : shard_paths) {
    absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file = SafetensorsFile::Open(shard_path);
    if (!file.ok()) {
      // A shard the index names but that is unreadable is a malformed model.
      if (checkpoint.sharded_ && absl::IsNotFound(file.status())) {
        return InvalidIndex(index_path, file.status().message());
      }
      return file.status();
    }
    const int shard_number = static_cast<int>(checkpoint.shards_.size());
    const std::string shard_name = FileBaseName(shard_path);
    const std::set<std::string>* listed =
        checkpoint.sharded_ ? &index_assignment[shard_name] : nullptr;
    for (const SafetensorsTensorInfo& info : (*file)->header().tensors) {
      if (listed != nullptr && listed->count(info.name) == 0) {
        return InvalidIndex(
            index_path, absl::StrCat("tensor ", Quoted(info.name), " is in shard ",
                                     Quoted(shard_name), " but the index does not map it there"));
      }
      auto [it, inserted] = checkpoint.by_name_.emplace(info.name, checkpoint.tensors_.size());
      if (!inserted) {
        return InvalidIndex(
            index_path, absl::StrCat("tensor ", Quoted(info.name), " is in more than one shard"));
      }
      checkpoint.tensors_.push_back(CheckpointTensor{info, shard_number});
    }
    if (listed != nullptr) {
      for (const std::string& name : *listed) {
        if ((*file)->header().Find(name) == nullptr) {
          return InvalidIndex(index_path,
                              absl::StrCat("tensor ", Quoted(name), " maps to shard ",
                                           Quoted(shard_name), ", which has no such tensor"));
        }
      }
    }
    checkpoint.shards_.push_back(*std::move(file));
  }
  return checkpoint;
}

const CheckpointTensor* SafetensorsCheckpoint::Find(absl::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<absl::string_view> SafetensorsCheckpoint::RawBytes(absl::string_view name) const {
  const CheckpointTensor* t = Find(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("no tensor ", Quoted(name)));
  return shards_[t->shard]->Bytes(t->info);
}

absl::StatusOr<at::Tensor> SafetensorsCheckpoint::View(absl::string_view name) const {
  const CheckpointTensor* t = Find(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("no tensor ", Quoted(name)));
  return shards_[t->shard]->View(t->info);
}

absl::StatusOr<at::Tensor> SafetensorsCheckpoint::Load(absl::string_view name,
                                                       const at::Device& device,
                                                       std::optional<at::ScalarType> dtype) const {
  ASSIGN_OR_RETURN(at::Tensor view, View(name));
  absl::StatusOr<at::Tensor> loaded = CatchTorchErrors(
      absl::StrCat("load tensor ", Quoted(name)), [&]() -> absl::StatusOr<at::Tensor> {
        // Always a fresh tensor, never a view of the mapping.
        return view.to(device, dtype.value_or(view.scalar_type()), /*non_blocking=*/false,
                       /*copy=*/true);
      });
  view = at::Tensor();
  ReleasePages(name);
  return loaded;
}

void SafetensorsCheckpoint::ReleasePages(absl::string_view name) const {
  const CheckpointTensor* t = Find(name);
  if (t != nullptr) shards_[t->shard]->ReleasePages(t->info);
}

}  // namespace compress::engine
