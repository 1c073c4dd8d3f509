// Reading (mmap, single and sharded) and writing safetensors checkpoints.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "tests/engine/test_util.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/model/safetensors_reader.h"
#include "worker/engine/model/safetensors_writer.h"

namespace compress::engine {
namespace {

namespace fs = std::filesystem;
using testing::ExpectInvalidArgument;
using testing::ReadBytes;
using testing::SafetensorsBytes;
using testing::TempDir;
using testing::WriteBytes;

std::vector<std::pair<std::string, at::Tensor>> MixedTensors() {
  at::manual_seed(1);
  return {
      {"f32", at::randn({5, 7})},
      {"f16", at::randn({3, 9}).to(at::kHalf)},
      {"bf16", at::randn({11}).to(at::kBFloat16)},
      {"i64", at::arange(6, at::kLong).view({2, 3})},
      {"u8", at::arange(5, at::kByte)},
      {"scalar", at::scalar_tensor(2.5)},  // F64, 0-d
  };
}

TEST(SafetensorsIo, SingleFileRoundTripsEveryDtypeBitForBit) {
  TempDir dir;
  const std::string path = dir / "model.safetensors";
  const auto tensors = MixedTensors();
  ASSERT_TRUE(WriteSafetensorsFile(path, tensors, {{"format", "pt"}, {"note", "x"}}).ok());

  absl::StatusOr<SafetensorsCheckpoint> checkpoint = SafetensorsCheckpoint::Open(path);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_FALSE(checkpoint->sharded());
  ASSERT_EQ(checkpoint->tensors().size(), tensors.size());
  EXPECT_EQ(checkpoint->shards()[0]->header().metadata.at("note"), "x");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, expected] = tensors[i];
    SCOPED_TRACE(name);
    EXPECT_EQ(checkpoint->tensors()[i].info.name, name);  // data order = write order
    absl::StatusOr<at::Tensor> loaded = checkpoint->Load(name, at::kCPU);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_EQ(loaded->scalar_type(), expected.scalar_type());
    EXPECT_EQ(loaded->sizes(), expected.sizes());
    EXPECT_TRUE(loaded->equal(expected));
    absl::StatusOr<absl::string_view> raw = checkpoint->RawBytes(name);
    ASSERT_TRUE(raw.ok());
    EXPECT_EQ(*raw,
              absl::string_view(static_cast<const char*>(expected.data_ptr()), expected.nbytes()));
  }
  EXPECT_EQ(checkpoint->Load("missing", at::kCPU).status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsIo, HeaderAloneIsReadWithoutTheData) {
  TempDir dir;
  const std::string path = dir / "model.safetensors";
  ASSERT_TRUE(WriteSafetensorsFile(path, MixedTensors()).ok());
  absl::StatusOr<SafetensorsHeader> header = ReadSafetensorsHeader(path);
  ASSERT_TRUE(header.ok()) << header.status();
  absl::StatusOr<SafetensorsCheckpoint> checkpoint = SafetensorsCheckpoint::Open(path);
  ASSERT_TRUE(checkpoint.ok());
  const SafetensorsHeader& mapped = checkpoint->shards()[0]->header();
  ASSERT_EQ(header->tensors.size(), mapped.tensors.size());
  for (size_t i = 0; i < mapped.tensors.size(); ++i) {
    EXPECT_EQ(header->tensors[i].name, mapped.tensors[i].name);
    EXPECT_EQ(header->tensors[i].shape, mapped.tensors[i].shape);
    EXPECT_EQ(header->tensors[i].data_end, mapped.tensors[i].data_end);
  }
  EXPECT_EQ(header->DataSectionOffset() + header->DataSectionBytes(), fs::file_size(path));

  const std::string bytes = ReadBytes(path);
  WriteBytes(path, bytes.substr(0, bytes.size() - 3));
  ExpectInvalidArgument(ReadSafetensorsHeader(path).status(), {path, "tensor '", "beyond"});
  WriteBytes(path, bytes.substr(0, 20));
  ExpectInvalidArgument(ReadSafetensorsHeader(path).status(), {path, "header length"});
  EXPECT_EQ(ReadSafetensorsHeader(dir / "missing").status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsIo, ViewsAreZeroCopyPrivateAndOutliveTheCheckpoint) {
  TempDir dir;
  const std::string path = dir / "model.safetensors";
  at::Tensor w = at::arange(16, at::kFloat).view({4, 4});
  ASSERT_TRUE(WriteSafetensorsFile(path, {{"w", w}}).ok());
  const std::string before = ReadBytes(path);

  at::Tensor view;
  {
    absl::StatusOr<SafetensorsCheckpoint> checkpoint = SafetensorsCheckpoint::Open(path);
    ASSERT_TRUE(checkpoint.ok());
    absl::StatusOr<at::Tensor> v = checkpoint->View("w");
    ASSERT_TRUE(v.ok());
    absl::string_view raw = *checkpoint->RawBytes("w");
    EXPECT_EQ(v->data_ptr(), static_cast<const void*>(raw.data())) << "aligned data is not copied";
    view = *v;
  }
  EXPECT_TRUE(view.equal(w)) << "the view keeps the mapping alive";
  view.fill_(-1.0f);  // private pages: the file does not change
  EXPECT_EQ(ReadBytes(path), before);
}

TEST(SafetensorsIo, MisalignedTensorsAreCopiedCorrectly) {
  // An F16 tensor of 3 elements puts the F32 after it at an odd 2-byte offset.
  TempDir dir;
  const std::string path = dir / "odd.safetensors";
  at::Tensor h = at::tensor({1.0f, 2.0f, 3.0f}).to(at::kHalf);
  at::Tensor f = at::tensor({4.5f, -5.25f});
  ASSERT_TRUE(WriteSafetensorsFile(path, {{"h", h}, {"f", f}}).ok());
  absl::StatusOr<SafetensorsCheckpoint> checkpoint = SafetensorsCheckpoint::Open(path);
  ASSERT_TRUE(checkpoint.ok());
  absl::StatusOr<at::Tensor> view = checkpoint->View("f");
  ASSERT_TRUE(view.ok());
  EXPECT_TRUE(view->equal(f));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(view->data_ptr()) % alignof(float), 0u);
}

TEST(SafetensorsIo, ShardedCheckpointRoundTripsThroughTheIndex) {
  for (SafetensorsDtype dtype :
       {SafetensorsDtype::kF32, SafetensorsDtype::kF16, SafetensorsDtype::kBF16}) {
    SCOPED_TRACE(DtypeName(dtype));
    TempDir dir;
    RandomModelOptions options;
    options.dtype = dtype;
    options.seed = 3;
    ASSERT_TRUE(WriteRandomLlamaModel(options, dir / "single").ok());
    options.max_shard_bytes = 40000;
    ASSERT_TRUE(WriteRandomLlamaModel(options, dir / "sharded").ok());

    absl::StatusOr<SafetensorsCheckpoint> single = SafetensorsCheckpoint::Open(dir / "single");
    absl::StatusOr<SafetensorsCheckpoint> sharded = SafetensorsCheckpoint::Open(dir / "sharded");
    ASSERT_TRUE(single.ok()) << single.status();
    ASSERT_TRUE(sharded.ok()) << sharded.status();
    EXPECT_TRUE(sharded->sharded());
    EXPECT_GT(sharded->shards().size(), 2u);
    EXPECT_EQ(FileBaseName(sharded->shards()[0]->path()),
              ShardFileName(0, static_cast<int>(sharded->shards().size())));
    ASSERT_EQ(single->tensors().size(), sharded->tensors().size());
    for (const CheckpointTensor& t : single->tensors()) {
      SCOPED_TRACE(t.info.name);
      const CheckpointTensor* other = sharded->Find(t.info.name);
      ASSERT_NE(other, nullptr);
      EXPECT_EQ(other->info.dtype, dtype);
      EXPECT_EQ(*single->RawBytes(t.info.name), *sharded->RawBytes(t.info.name));
      absl::StatusOr<at::Tensor> a = single->Load(t.info.name, at::kCPU);
      ASSERT_TRUE(a.ok());
      EXPECT_EQ(a->scalar_type(), dtype == SafetensorsDtype::kF32   ? at::kFloat
                                  : dtype == SafetensorsDtype::kF16 ? at::kHalf
                                                                    : at::kBFloat16);
    }
  }
}

TEST(SafetensorsIo, WriterEnforcesTheDeclaredLayoutAndLeavesNothingBehind) {
  TempDir dir;
  const std::string path = dir / "out.safetensors";
  std::vector<SafetensorsTensorSpec> specs = {{"a", SafetensorsDtype::kF32, {2}},
                                              {"b", SafetensorsDtype::kF16, {3}}};
  {
    absl::StatusOr<SafetensorsWriter> writer = SafetensorsWriter::Open(path, specs);
    ASSERT_TRUE(writer.ok());
    EXPECT_EQ(writer->WriteTensor("b", at::zeros({3}, at::kHalf)).code(),
              absl::StatusCode::kFailedPrecondition);  // out of order
    EXPECT_EQ(writer->WriteTensor("a", at::zeros({3}, at::kFloat)).code(),
              absl::StatusCode::kInvalidArgument);  // wrong shape
    EXPECT_EQ(writer->WriteTensor("a", at::zeros({2}, at::kHalf)).code(),
              absl::StatusCode::kInvalidArgument);  // wrong dtype
    ASSERT_TRUE(writer->WriteTensor("a", at::ones({4}, at::kFloat).slice(0, 0, 4, 2)).ok())
        << "non-contiguous input is fine";
    EXPECT_EQ(writer->Commit().code(), absl::StatusCode::kFailedPrecondition);  // 'b' missing
  }
  EXPECT_TRUE(fs::is_empty(dir.path())) << "an uncommitted writer removes its temp file";

  absl::StatusOr<SafetensorsWriter> writer = SafetensorsWriter::Open(path, specs);
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE(writer->WriteTensor("a", at::ones({2})).ok());
  ASSERT_TRUE(writer->WriteBytes("b", std::string(6, '\0')).ok());
  EXPECT_FALSE(fs::exists(path)) << "invisible until committed";
  ASSERT_TRUE(writer->Commit().ok());
  EXPECT_EQ(static_cast<int64_t>(fs::file_size(path)), writer->bytes_written());
  EXPECT_EQ(writer->sha256().size(), 64u);
  EXPECT_EQ((ReadBytes(path).size() - 14) % 8, 0u) << "data section starts 8-byte aligned";
}

TEST(SafetensorsIo, MalformedFilesOnDiskAreInvalidArgumentNamingFileAndTensor) {
  TempDir dir;
  const std::string path = dir / "model.safetensors";
  ASSERT_TRUE(WriteSafetensorsFile(path, {{"layer.weight", at::ones({8, 8})}}).ok());
  const std::string good = ReadBytes(path);

  // Truncated file: the tensor's data runs past the end.
  WriteBytes(path, good.substr(0, good.size() - 1));
  ExpectInvalidArgument(SafetensorsCheckpoint::Open(path).status(),
                        {path, "tensor 'layer.weight'", "beyond the data section"});
  // Header lies about offsets.
  WriteBytes(path, SafetensorsBytes(
                       R"({"layer.weight":{"dtype":"F32","shape":[8,8],"data_offsets":[0,200]}})",
                       std::string(256, '\0')));
  ExpectInvalidArgument(SafetensorsCheckpoint::Open(path).status(),
                        {path, "tensor 'layer.weight'", "needs 256"});
  // Unsupported dtype.
  WriteBytes(path,
             SafetensorsBytes(
                 R"({"layer.weight":{"dtype":"Q4_0","shape":[2],"data_offsets":[0,2]}})", "xx"));
  ExpectInvalidArgument(SafetensorsCheckpoint::Open(path).status(),
                        {path, "tensor 'layer.weight'", "unsupported dtype 'Q4_0'"});
  // Header length beyond the file.
  std::string beyond = good;
  beyond[4] = 1;  // + 2^32
  WriteBytes(path, beyond);
  ExpectInvalidArgument(SafetensorsCheckpoint::Open(path).status(), {path, "header length"});
  // Empty file.
  WriteBytes(path, "");
  ExpectInvalidArgument(SafetensorsCheckpoint::Open(path).status(), {path, "too short"});
  // Missing file and empty folder.
  EXPECT_EQ(SafetensorsCheckpoint::Open(dir / "nope.safetensors").status().code(),
            absl::StatusCode::kNotFound);
  fs::create_directories(dir / "empty");
  ExpectInvalidArgument(SafetensorsCheckpoint::Open(dir / "empty").status(),
                        {"no .safetensors file"});
}

class ShardedIndex : public ::testing::Test {
 protected:
  void SetUp() override {
    RandomModelOptions options;
    options.num_layers = 1;
    options.max_shard_bytes = 20000;
    model_dir_ = dir_ / "model";
    ASSERT_TRUE(WriteRandomLlamaModel(options, model_dir_).ok());
    index_path_ = model_dir_ + "/" + kSafetensorsIndexFileName;
    ASSERT_TRUE(SafetensorsCheckpoint::Open(model_dir_).ok());
  }
  // Rewrites the weight_map entry of `tensor` to point at `shard`.
  void Remap(const std::string& tensor, const std::string& shard) {
    std::string index = ReadBytes(index_path_);
    const std::string key = "\"" + tensor + "\": \"";
    const size_t at = index.find(key);
    ASSERT_NE(at, std::string::npos);
    const size_t value_end = index.find('"', at + key.size());
    index.replace(at + key.size(), value_end - (at + key.size()), shard);
    WriteBytes(index_path_, index);
  }
  absl::Status Open() { return SafetensorsCheckpoint::Open(model_dir_).status(); }

  TempDir dir_;
  std::string model_dir_;
  std::string index_path_;
};

TEST_F(ShardedIndex, MissingShardIsInvalidArgumentNamingIndexAndTensor) {
  Remap("model.norm.weight", "model-00042-of-00042.safetensors");
  ExpectInvalidArgument(Open(), {index_path_, "'model.norm.weight'",
                                 "'model-00042-of-00042.safetensors'", "does not exist"});
}

TEST_F(ShardedIndex, PathEscapesAreRejected) {
  // The escape target exists and is a valid checkpoint: rejected by name alone.
  WriteBytes(dir_ / "outside.safetensors",
             ReadBytes(SafetensorsCheckpoint::Open(model_dir_)->shards()[0]->path()));
  for (const std::string& escape :
       {std::string("../outside.safetensors"), std::string("/etc/passwd"),
        std::string("sub/x.safetensors"), std::string(".."), std::string("")}) {
    SCOPED_TRACE(escape);
    SetUp();
    Remap("model.norm.weight", escape);
    ExpectInvalidArgument(Open(), {index_path_, "'model.norm.weight'", "not a file name"});
  }
}

TEST_F(ShardedIndex, IndexAndShardsMustAgree) {
  // The index maps a tensor to a shard that does not hold it.
  absl::StatusOr<SafetensorsCheckpoint> checkpoint = SafetensorsCheckpoint::Open(model_dir_);
  ASSERT_TRUE(checkpoint.ok());
  const std::string first_shard = FileBaseName(checkpoint->shards()[0]->path());
  Remap("lm_head.weight", first_shard);
  absl::Status status = Open();
  ExpectInvalidArgument(status, {index_path_, "'lm_head.weight'"});

  // Bad JSON and a missing weight_map.
  WriteBytes(index_path_, "{\"weight_map\": ");
  ExpectInvalidArgument(Open(), {index_path_, "not valid JSON"});
  WriteBytes(index_path_, "{\"metadata\": {}}");
  ExpectInvalidArgument(Open(), {index_path_, "weight_map"});
  WriteBytes(index_path_, "{\"weight_map\": {\"x\": 3}}");
  ExpectInvalidArgument(Open(), {index_path_, "'x'", "not a string"});
}

TEST_F(ShardedIndex, AMalformedShardIsReportedWithTheShardsName) {
  absl::StatusOr<SafetensorsCheckpoint> checkpoint = SafetensorsCheckpoint::Open(model_dir_);
  ASSERT_TRUE(checkpoint.ok());
  const std::string shard = checkpoint->shards()[1]->path();
  const std::string bytes = ReadBytes(shard);
  WriteBytes(shard, bytes.substr(0, bytes.size() - 8));
  ExpectInvalidArgument(Open(), {shard, "tensor '", "beyond the data section"});
}

}  // namespace
}  // namespace compress::engine
