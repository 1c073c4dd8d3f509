// The GGUF v3 writer, parser and mapping (common/, no LibTorch).
#include "common/gguf_file.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/sha256.h"
#include "tests/testing/temp_dir.h"

namespace compress {
namespace {

namespace fs = std::filesystem;
using ::compress::testing::TempDir;
using ::testing::HasSubstr;

constexpr char kFile[] = "models/x.gguf";

// Builds GGUF bytes field by field, independently of the serializer, so
// tests can state exactly what is on disk (and write what the writer never would).
class Bytes {
 public:
  Bytes& Raw(absl::string_view s) {
    bytes_.append(s.data(), s.size());
    return *this;
  }
  Bytes& U8(uint8_t v) { return Number(v); }
  Bytes& U32(uint32_t v) { return Number(v); }
  Bytes& U64(uint64_t v) { return Number(v); }
  Bytes& Str(absl::string_view s) { return U64(s.size()).Raw(s); }
  Bytes& Zeros(size_t n) { return Raw(std::string(n, '\0')); }
  Bytes& PadTo(size_t alignment) { return Zeros((alignment - bytes_.size() % alignment) % alignment); }
  // "GGUF", version 3, the counts.
  Bytes& Start(uint64_t tensors, uint64_t kvs, uint32_t version = 3) {
    return Raw("GGUF").U32(version).U64(tensors).U64(kvs);
  }
  // A tensor info.
  Bytes& Tensor(absl::string_view name, std::vector<uint64_t> ne, uint32_t type, uint64_t offset) {
    Str(name).U32(static_cast<uint32_t>(ne.size()));
    for (uint64_t d : ne) U64(d);
    return U32(type).U64(offset);
  }
  const std::string& str() const { return bytes_; }
  size_t size() const { return bytes_.size(); }

 private:
  template <typename T>
  Bytes& Number(T v) {
    bytes_.append(reinterpret_cast<const char*>(&v), sizeof(T));
    return *this;
  }
  std::string bytes_;
};

absl::StatusOr<GgufHeader> Parse(const std::string& bytes) {
  return ParseGgufHeader(bytes, bytes.size(), kFile);
}

// The status is INVALID_ARGUMENT and names the file and every fragment.
void ExpectInvalid(const absl::Status& status, std::initializer_list<std::string> fragments) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr(kFile));
  for (const std::string& fragment : fragments) {
    EXPECT_THAT(std::string(status.message()), HasSubstr(fragment));
  }
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> Entries(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename());
  return names;
}

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string out(n, '\0');
  for (char& c : out) c = static_cast<char>(rng());
  return out;
}

// Writes `tensors` with data from RandomBytes; returns each tensor's data.
std::vector<std::string> WriteFile(const std::string& path, std::vector<GgufKeyValue> metadata,
                                   const std::vector<GgufTensorSpec>& tensors) {
  absl::StatusOr<GgufWriter> writer = GgufWriter::Open(path, std::move(metadata), tensors);
  EXPECT_TRUE(writer.ok()) << writer.status();
  if (!writer.ok()) return {};
  std::vector<std::string> data;
  for (size_t i = 0; i < tensors.size(); ++i) {
    data.push_back(RandomBytes(writer->header().tensors[i].bytes, static_cast<uint32_t>(i)));
    EXPECT_TRUE(writer->WriteTensor(tensors[i].name, data.back()).ok());
  }
  absl::Status committed = writer->Commit();
  EXPECT_TRUE(committed.ok()) << committed;
  // Hashed as written, on the writer's thread: the same as the file read back.
  absl::StatusOr<std::string> sha256 = Sha256OfFile(path);
  EXPECT_TRUE(sha256.ok());
  if (sha256.ok()) EXPECT_EQ(writer->sha256(), *sha256);
  return data;
}

// A small file with metadata of several kinds and two tensors, in memory.
std::string SmallValidFile() {
  absl::StatusOr<GgufHeader> header =
      LayoutGguf({{"general.architecture", GgufValue::String("llama")},
                  {"llama.context_length", GgufValue::Uint32(2048)},
                  {"tokenizer.ggml.tokens",
                   GgufValue::Array(std::vector<std::string>{"<unk>", "", "é"})},
                  {"tokenizer.ggml.scores", GgufValue::Array(std::vector<float>{0.f, -1.5f})},
                  {"flag", GgufValue::Bool(true)}},
                 {{"a", {4, 2}, GgufType::kF16}, {"b", {32}, GgufType::kQ8_0}});
  EXPECT_TRUE(header.ok()) << header.status();
  std::string file = SerializeGgufHeader(&*header);
  file += RandomBytes(header->DataSectionBytes(), 1);
  return file;
}

// ---------------------------------------------------------------- the bytes

TEST(GgufFile, HeaderBytesAreTheFormatByHand) {
  TempDir dir("gguf");
  const std::string path = dir.Sub("tiny.gguf");
  absl::StatusOr<GgufWriter> writer =
      GgufWriter::Open(path, {{"general.architecture", GgufValue::String("llama")}},
                       {{"w", {2}, GgufType::kF32}});
  ASSERT_TRUE(writer.ok()) << writer.status();
  const float w[2] = {1.0f, -2.0f};
  ASSERT_TRUE(writer->WriteTensor("w", std::string(reinterpret_cast<const char*>(w), 8)).ok());
  ASSERT_TRUE(writer->Commit().ok());

  // Written out byte by byte from docs/gguf.md.
  const char kHeaderFields[] =
      "GGUF"
      "\x03\0\0\0"              // version 3
      "\x01\0\0\0\0\0\0\0"      // tensor_count 1
      "\x01\0\0\0\0\0\0\0"      // metadata_kv_count 1
      "\x14\0\0\0\0\0\0\0"      // key length 20
      "general.architecture"    // key
      "\x08\0\0\0"              // value type STRING
      "\x05\0\0\0\0\0\0\0"      // string length 5
      "llama"                   //
      "\x01\0\0\0\0\0\0\0"      // name length 1
      "w"                       //
      "\x01\0\0\0"              // n_dims 1
      "\x02\0\0\0\0\0\0\0"      // ne[0] = 2
      "\0\0\0\0"                // type F32
      "\0\0\0\0\0\0\0\0";       // offset 0
  ASSERT_EQ(sizeof(kHeaderFields) - 1, 102u);
  std::string expected(kHeaderFields, 102);
  expected.append(26, '\0');  // padding: the data section starts at 128
  expected.append(reinterpret_cast<const char*>(w), 8);
  expected.append(24, '\0');  // w's padding to 32
  EXPECT_EQ(ReadAll(path), expected);
  EXPECT_EQ(writer->header().data_offset, 128u);
}

// ---------------------------------------------------------------- round trip

TEST(GgufFile, EveryValueTypeAndArrayRoundTrips) {
  const std::vector<GgufKeyValue> metadata = {
      {"u8", GgufValue::Uint8(255)},
      {"i8", GgufValue::Int8(-128)},
      {"u16", GgufValue::Uint16(65535)},
      {"i16", GgufValue::Int16(-32768)},
      {"u32", GgufValue::Uint32(4294967295u)},
      {"i32", GgufValue::Int32(std::numeric_limits<int32_t>::min())},
      {"f32", GgufValue::Float32(-0.15625f)},
      {"f32.inf", GgufValue::Float32(std::numeric_limits<float>::infinity())},
      {"bool.true", GgufValue::Bool(true)},
      {"bool.false", GgufValue::Bool(false)},
      {"str", GgufValue::String("héllo — 日本語 🦙")},
      {"str.empty", GgufValue::String("")},
      {"str.nul", GgufValue::String(std::string("a\0b", 3))},
      {"u64", GgufValue::Uint64(std::numeric_limits<uint64_t>::max())},
      {"i64", GgufValue::Int64(std::numeric_limits<int64_t>::min())},
      {"f64", GgufValue::Float64(3.141592653589793)},
      {"arr.u8", GgufValue::Array(std::vector<uint8_t>{0, 1, 255})},
      {"arr.i8", GgufValue::Array(std::vector<int8_t>{-1, 127})},
      {"arr.u16", GgufValue::Array(std::vector<uint16_t>{7})},
      {"arr.i16", GgufValue::Array(std::vector<int16_t>{-7, 7})},
      {"arr.u32", GgufValue::Array(std::vector<uint32_t>{1, 2, 3})},
      {"arr.i32", GgufValue::Array(std::vector<int32_t>{-1, 0, 1})},
      {"arr.f32", GgufValue::Array(std::vector<float>{0.5f, -0.25f})},
      {"arr.bool", GgufValue::Array(std::vector<bool>{true, false, true})},
      {"arr.str", GgufValue::Array(std::vector<std::string>{"<s>", "", "▁the", "日本", "🦙"})},
      {"arr.u64", GgufValue::Array(std::vector<uint64_t>{1ull << 40})},
      {"arr.i64", GgufValue::Array(std::vector<int64_t>{-(1ll << 40)})},
      {"arr.f64", GgufValue::Array(std::vector<double>{1e300, -1e-300})},
      {"arr.empty", GgufValue::Array(std::vector<uint32_t>{})},
      {"arr.str.empty", GgufValue::Array(std::vector<std::string>{})},
  };
  TempDir dir("gguf");
  const std::string path = dir.Sub("values.gguf");
  WriteFile(path, metadata, {});
  absl::StatusOr<GgufHeader> header = ReadGgufHeader(path);
  ASSERT_TRUE(header.ok()) << header.status();
  ASSERT_EQ(header->metadata.size(), metadata.size());
  for (size_t i = 0; i < metadata.size(); ++i) {
    SCOPED_TRACE(metadata[i].key);
    EXPECT_EQ(header->metadata[i].key, metadata[i].key);  // insertion order kept
    EXPECT_EQ(header->metadata[i].value.type(), metadata[i].value.type());
    EXPECT_EQ(header->metadata[i].value.element_type(), metadata[i].value.element_type());
    EXPECT_TRUE(header->metadata[i].value == metadata[i].value);
  }
  EXPECT_TRUE(header->tensors.empty());
  EXPECT_EQ(header->data_offset % 32, 0u);
  EXPECT_EQ(fs::file_size(path), header->data_offset);

  // Typed accessors: the exact stored type or nothing.
  const GgufValue* u32 = header->FindMetadata("u32");
  ASSERT_NE(u32, nullptr);
  ASSERT_NE(u32->Get<uint32_t>(), nullptr);
  EXPECT_EQ(*u32->Get<uint32_t>(), 4294967295u);
  EXPECT_EQ(u32->Get<int32_t>(), nullptr);
  EXPECT_EQ(u32->Get<uint64_t>(), nullptr);
  EXPECT_FALSE(u32->is_array());
  const GgufValue* tokens = header->FindMetadata("arr.str");
  ASSERT_NE(tokens, nullptr);
  EXPECT_EQ(tokens->type(), GgufValueType::kArray);
  EXPECT_EQ(tokens->element_type(), GgufValueType::kString);
  EXPECT_EQ(tokens->array_size(), 5u);
  ASSERT_NE(tokens->Get<std::vector<std::string>>(), nullptr);
  EXPECT_EQ(tokens->Get<std::vector<std::string>>()->at(4), "🦙");
  EXPECT_EQ(tokens->Get<std::string>(), nullptr);
  EXPECT_EQ(*header->FindMetadata("str.nul")->Get<std::string>(), std::string("a\0b", 3));
  EXPECT_EQ(header->FindMetadata("missing"), nullptr);
  EXPECT_STREQ(GgufValueTypeName(GgufValueType::kFloat64), "FLOAT64");
}

TEST(GgufFile, TensorsOfSeveralTypesRoundTripWithAlignedOffsets) {
  const std::vector<GgufTensorSpec> specs = {
      {"token_embd.weight", GgufNeFromTorchShape({3, 2}), GgufType::kF32},  // ne {2, 3}
      {"f16", {5}, GgufType::kF16},
      {"bf16", {3, 1, 2}, GgufType::kBF16},
      {"q8_0", {64, 3}, GgufType::kQ8_0},
      {"q4_k", {256, 2}, GgufType::kQ4_K},
      {"q6_k", {512}, GgufType::kQ6_K},
      {"q4_0.4d", {32, 1, 2, 2}, GgufType::kQ4_0},
      {"empty", {0, 4}, GgufType::kF32},
      {"after_empty", {1}, GgufType::kF32},
  };
  const std::vector<uint64_t> expected_bytes = {
      24, 10, 12, 3 * 2 * 34, 2 * 144, 2 * 210, 4 * 18, 0, 4};
  TempDir dir("gguf");
  const std::string path = dir.Sub("tensors.gguf");
  std::vector<std::string> data =
      WriteFile(path, {{"general.architecture", GgufValue::String("llama")}}, specs);
  ASSERT_EQ(data.size(), specs.size());

  absl::StatusOr<GgufMappedFile> file = GgufMappedFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const GgufHeader& header = file->header();
  EXPECT_EQ(header.version, 3u);
  EXPECT_EQ(header.alignment, 32u);
  EXPECT_EQ(header.data_offset % 32, 0u);
  ASSERT_EQ(header.tensors.size(), specs.size());
  uint64_t cursor = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const GgufTensorInfo& t = header.tensors[i];
    SCOPED_TRACE(t.name);
    EXPECT_EQ(t.name, specs[i].name);
    EXPECT_EQ(t.ne, specs[i].ne);
    EXPECT_EQ(t.type, specs[i].type);
    EXPECT_EQ(t.bytes, expected_bytes[i]);
    EXPECT_EQ(t.offset, cursor);  // packed in order, each padded to 32
    EXPECT_EQ(t.offset % 32, 0u);
    cursor = (t.offset + t.bytes + 31) / 32 * 32;
    EXPECT_EQ(file->TensorBytes(t), data[i]);
  }
  EXPECT_EQ(header.tensors[0].TorchShape(), (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(header.tensors[0].ne, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(header.tensors[3].NumElements(), 192);
  EXPECT_EQ(header.DataSectionBytes(), cursor);
  EXPECT_EQ(fs::file_size(path), header.data_offset + cursor);

  absl::StatusOr<absl::string_view> by_name = file->TensorBytes("q4_k");
  ASSERT_TRUE(by_name.ok());
  EXPECT_EQ(*by_name, data[4]);
  EXPECT_EQ(file->TensorBytes("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(header.FindTensor("q6_k"), nullptr);
  EXPECT_EQ(header.FindTensor("q6"), nullptr);

  // A moved-from mapping leaves the new owner with the bytes.
  GgufMappedFile moved(*std::move(file));
  EXPECT_EQ(moved.TensorBytes(moved.header().tensors[5]), data[5]);
}

TEST(GgufFile, CustomAlignmentPadsEverythingToIt) {
  for (uint32_t alignment : {1u, 8u, 64u, 4096u}) {
    SCOPED_TRACE(alignment);
    TempDir dir("gguf");
    const std::string path = dir.Sub("aligned.gguf");
    std::vector<std::string> data = WriteFile(
        path, {{"general.alignment", GgufValue::Uint32(alignment)}},
        {{"a", {3}, GgufType::kF32}, {"b", {5}, GgufType::kF16}, {"c", {32}, GgufType::kQ8_0}});
    absl::StatusOr<GgufMappedFile> file = GgufMappedFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    const GgufHeader& header = file->header();
    EXPECT_EQ(header.alignment, alignment);
    EXPECT_EQ(header.data_offset % alignment, 0u);
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(header.tensors[i].offset % alignment, 0u);
      EXPECT_EQ(file->TensorBytes(header.tensors[i]), data[i]);
    }
    if (alignment == 1) {
      EXPECT_EQ(header.tensors[1].offset, 12u);
      EXPECT_EQ(header.tensors[2].offset, 22u);
    }
    EXPECT_EQ(fs::file_size(path), header.data_offset + header.DataSectionBytes());
  }
}

TEST(GgufFile, TensorBytesFollowTheTypeTable) {
  for (const GgufTypeInfo& type : kGgufTypes) {
    SCOPED_TRACE(type.name);
    absl::StatusOr<uint64_t> bytes = GgufTensorBytes(type.type, {type.block_elements * 2, 3}, "t");
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    EXPECT_EQ(*bytes, static_cast<uint64_t>(2 * type.block_bytes * 3));
    if (type.block_elements > 1) {
      absl::Status status =
          GgufTensorBytes(type.type, {type.block_elements + 1, 3}, "t").status();
      EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
      EXPECT_THAT(std::string(status.message()), HasSubstr("not a multiple of the block"));
      EXPECT_THAT(std::string(status.message()), HasSubstr(type.name));
    }
  }
  EXPECT_EQ(GgufNeFromTorchShape({4096, 11008}), (std::vector<int64_t>{11008, 4096}));
}

// ---------------------------------------------------------------- refusals

TEST(GgufFile, WriterRefusesBadDeclarationsAndLeavesNoFile) {
  TempDir dir("gguf");
  const std::string path = dir.Sub("bad.gguf");
  struct Case {
    std::vector<GgufKeyValue> metadata;
    std::vector<GgufTensorSpec> tensors;
    const char* problem;
  };
  const std::string long_name(64, 'n');
  const Case cases[] = {
      {{}, {{"a", {4}, GgufType::kF32}, {"a", {4}, GgufType::kF32}}, "tensor 'a' appears twice"},
      {{{"k", GgufValue::Uint8(1)}, {"k", GgufValue::Uint8(2)}}, {}, "key 'k' appears twice"},
      {{{"", GgufValue::Uint8(1)}}, {}, "key is empty"},
      {{}, {{"", {4}, GgufType::kF32}}, "name is empty"},
      {{}, {{long_name, {4}, GgufType::kF32}}, "over llama.cpp's limit of 63"},
      {{}, {{"bad\xff", {4}, GgufType::kF32}}, "not valid UTF-8"},
      {{{"bad\xc0\x80", GgufValue::Uint8(1)}}, {}, "not valid UTF-8"},
      {{{"s", GgufValue::String("\xed\xa0\x80")}}, {}, "key 's': the string value is not valid"},
      {{{"t", GgufValue::Array(std::vector<std::string>{"ok", "\xe6\x97"})}},
       {},
       "key 't': string 1 of the array is not valid UTF-8"},
      {{}, {{"w", {}, GgufType::kF32}}, "tensor 'w': ne [] has 0 dims"},
      {{}, {{"w", {1, 1, 1, 1, 1}, GgufType::kF32}}, "has 5 dims"},
      {{}, {{"w", {4, -1}, GgufType::kF32}}, "negative dimension"},
      {{}, {{"w", {1ll << 62, 1ll << 62}, GgufType::kF32}}, "overflows int64"},
      {{}, {{"w", {100, 2}, GgufType::kQ4_K}}, "ne[0] = 100 is not a multiple of the block of 256"},
      {{{"general.alignment", GgufValue::Uint32(48)}}, {}, "alignment 48 is not a power of two"},
      {{{"general.alignment", GgufValue::Uint32(0)}}, {}, "alignment 0"},
      {{{"general.alignment", GgufValue::Uint32(1u << 24)}}, {}, "up to 1048576"},
      {{{"general.alignment", GgufValue::Int32(32)}}, {}, "type INT32, but llama.cpp requires UINT32"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.problem);
    absl::StatusOr<GgufWriter> writer = GgufWriter::Open(path, c.metadata, c.tensors);
    EXPECT_EQ(writer.status().code(), absl::StatusCode::kInvalidArgument) << writer.status();
    EXPECT_THAT(std::string(writer.status().message()), HasSubstr(c.problem));
    EXPECT_THAT(std::string(writer.status().message()), HasSubstr(path));
  }
  EXPECT_TRUE(Entries(dir.path()).empty());
}

TEST(GgufFile, WriterChecksEachTensorsDataAndOrder) {
  TempDir dir("gguf");
  const std::string path = dir.Sub("model.gguf");
  absl::StatusOr<GgufWriter> writer = GgufWriter::Open(
      path, {}, {{"a", {4}, GgufType::kF32}, {"b", {32, 2}, GgufType::kQ8_0}});
  ASSERT_TRUE(writer.ok()) << writer.status();

  absl::Status status = writer->WriteTensor("b", std::string(68, 'b'));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("'b' written where 'a' (tensor 0) comes next"));

  status = writer->WriteTensor("a", std::string(15, 'a'));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("15 bytes given, but ne [4] of F32 is 16"));

  status = writer->Commit();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(status.message()), HasSubstr("tensor 'a' (1 of 2) was not written"));

  // Refused writes wrote nothing: the right ones still make a valid file.
  ASSERT_TRUE(writer->WriteTensor("a", std::string(16, 'a')).ok());
  status = writer->WriteTensor("b", std::string(67, 'b'));
  EXPECT_THAT(std::string(status.message()), HasSubstr("67 bytes given, but ne [32, 2] of Q8_0 is 68"));
  ASSERT_TRUE(writer->WriteTensor("b", std::string(68, 'b')).ok());
  status = writer->WriteTensor("c", "x");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("after all 2 declared tensors"));
  EXPECT_FALSE(fs::exists(path));  // nothing visible before Commit
  ASSERT_TRUE(writer->Commit().ok());

  absl::StatusOr<GgufMappedFile> file = GgufMappedFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(*file->TensorBytes("a"), std::string(16, 'a'));
  EXPECT_EQ(*file->TensorBytes("b"), std::string(68, 'b'));
  EXPECT_EQ(Entries(dir.path()), std::vector<std::string>{"model.gguf"});  // no temp left
}

TEST(GgufFile, WriterDroppedBeforeCommitLeavesNothing) {
  TempDir dir("gguf");
  const std::string path = dir.Sub("partial.gguf");
  {
    absl::StatusOr<GgufWriter> writer = GgufWriter::Open(
        path, {{"general.name", GgufValue::String("x")}},
        {{"a", {4}, GgufType::kF32}, {"b", {4}, GgufType::kF32}});
    ASSERT_TRUE(writer.ok()) << writer.status();
    ASSERT_TRUE(writer->WriteTensor("a", std::string(16, 'a')).ok());
    EXPECT_EQ(Entries(dir.path()).size(), 1u);  // the temp file, under another name
    EXPECT_FALSE(fs::exists(path));
  }
  EXPECT_TRUE(Entries(dir.path()).empty());

  // A finished file is not replaced by a later writer that is dropped.
  WriteFile(path, {}, {{"a", {4}, GgufType::kF32}});
  const std::string before = ReadAll(path);
  {
    absl::StatusOr<GgufWriter> writer = GgufWriter::Open(path, {}, {{"z", {8}, GgufType::kF32}});
    ASSERT_TRUE(writer.ok());
  }
  EXPECT_EQ(ReadAll(path), before);
  EXPECT_EQ(Entries(dir.path()), std::vector<std::string>{"partial.gguf"});
}

// A write that fails on the writer's thread (here the file size limit) is
// reported by the next call, and no file is left behind.
TEST(GgufFile, AFailedWriteIsReportedAndLeavesNothing) {
  TempDir dir("gguf");
  const std::string path = dir.Sub("big.gguf");
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    signal(SIGXFSZ, SIG_IGN);  // an oversize write fails with EFBIG instead
    const rlimit limit{1 << 20, 1 << 20};
    setrlimit(RLIMIT_FSIZE, &limit);
    const int code = [&] {  // the writer is gone (its temp file too) before _exit
      absl::StatusOr<GgufWriter> writer = GgufWriter::Open(
          path, {}, {{"a", {1 << 19}, GgufType::kF32}, {"b", {4}, GgufType::kF32}});
      if (!writer.ok()) return 10;
      absl::Status status = writer->WriteTensor("a", std::string(2 << 20, 'a'));
      if (status.ok()) status = writer->WriteTensor("b", std::string(16, 'b'));
      if (status.ok()) status = writer->Commit();
      if (status.ok()) return 11;
      if (status.message().find("File too large") == absl::string_view::npos) return 12;
      if (writer->Commit().ok()) return 13;  // still refused
      return 0;
    }();
    _exit(code);
  }
  int wait_status = 0;
  ASSERT_EQ(waitpid(child, &wait_status, 0), child);
  ASSERT_TRUE(WIFEXITED(wait_status));
  EXPECT_EQ(WEXITSTATUS(wait_status), 0);
  EXPECT_TRUE(Entries(dir.path()).empty());
}

TEST(GgufFile, ParserRejectsBadHeadersNamingFileKeyAndTensor) {
  struct Case {
    std::string bytes;
    std::vector<std::string> fragments;
  };
  const uint64_t huge = uint64_t{1} << 62;
  const std::vector<Case> cases = {
      {"", {"file of 0 bytes is too short"}},
      {"GGU", {"file of 3 bytes", "too short"}},
      {Bytes().Raw("GGUX").U32(3).U64(0).U64(0).str(), {"not a GGUF file", "magic"}},
      {Bytes().Start(0, 0, 2).str(), {"GGUF version 2 is not supported", "only version 3"}},
      {Bytes().Start(0, 0, 1).str(), {"GGUF version 1"}},
      {Bytes().Start(0, 0, 0x03000000).str(), {"byte-swapped", "big-endian"}},
      {Bytes().Start(0, 0, 4).str(), {"unknown GGUF version 4"}},
      {Bytes().Start(huge, 0).str(), {"tensor_count 4611686018427387904 cannot fit"}},
      {Bytes().Start(0, huge).str(), {"metadata_kv_count", "cannot fit"}},
      {Bytes().Start(0, 1).Str("k").U32(13).U32(0).str(), {"key 'k'", "unknown value type 13"}},
      {Bytes().Start(0, 1).Str("k").U32(9).U32(77).U64(0).str(),
       {"key 'k'", "unknown array element type 77"}},
      {Bytes().Start(0, 1).Str("k").U32(9).U32(9).U64(0).str(),
       {"key 'k'", "arrays of arrays are not supported"}},
      {Bytes().Start(0, 1).Str("k").U32(9).U32(4).U64(huge).str(),
       {"key 'k'", "array of 4611686018427387904 UINT32 cannot fit"}},
      {Bytes().Start(0, 1).Str("k").U32(9).U32(8).U64(3).Str("a").str(),
       {"key 'k'", "array of 3 STRING cannot fit"}},
      {Bytes().Start(0, 1).Str("k").U32(8).U64(huge).Zeros(8).str(),
       {"key 'k'", "value at byte", "needs 4611686018427387904 bytes", "truncated"}},
      {Bytes().Start(0, 1).U64(huge).Zeros(16).str(), {"metadata entry 0", "key at byte"}},
      {Bytes().Start(0, 1).Str("").U32(0).U8(0).Zeros(8).str(), {"metadata entry 0: empty key"}},
      {Bytes().Start(0, 1).Str("b").U32(7).U8(2).Zeros(8).str(),
       {"key 'b'", "BOOL of byte value 2"}},
      {Bytes().Start(0, 2).Str("k").U32(0).U8(1).Str("k").U32(0).U8(2).str(),
       {"key 'k' appears twice"}},
      {Bytes().Start(0, 1).Str("general.alignment").U32(5).U32(32).PadTo(32).str(),
       {"'general.alignment'", "type INT32", "requires UINT32"}},
      {Bytes().Start(0, 1).Str("general.alignment").U32(4).U32(24).PadTo(32).str(),
       {"alignment 24 is not a power of two"}},
      {Bytes().Start(1, 0).Tensor("w", {4}, 99, 0).PadTo(32).Zeros(32).str(),
       {"tensor 'w'", "ggml type id 99 is not one this reader knows", "Q4_K=12"}},
      {Bytes().Start(1, 0).Tensor("w", {4}, 9, 0).PadTo(32).Zeros(32).str(),
       {"tensor 'w'", "ggml type id 9"}},
      {Bytes().Start(1, 0).Tensor("w", {1, 1, 1, 1, 1}, 0, 0).PadTo(32).Zeros(32).str(),
       {"tensor 'w'", "n_dims 5 is not in 1..4"}},
      {Bytes().Start(1, 0).Tensor("w", {}, 0, 0).PadTo(32).Zeros(32).str(),
       {"tensor 'w'", "n_dims 0"}},
      {Bytes().Start(1, 0).Tensor("w", {uint64_t{1} << 63}, 0, 0).PadTo(32).str(),
       {"tensor 'w'", "ne[0] = 9223372036854775808 overflows int64"}},
      {Bytes().Start(1, 0).Tensor("w", {1u << 31, 1u << 31, 1u << 31}, 0, 0).PadTo(32).str(),
       {"tensor 'w'", "overflows int64"}},
      {Bytes().Start(1, 0).Tensor("w", {100}, 12, 0).PadTo(32).str(),
       {"tensor 'w'", "ne[0] = 100 is not a multiple of the block of 256"}},
      {Bytes().Start(1, 0).Tensor(std::string(64, 'x'), {4}, 0, 0).PadTo(32).Zeros(32).str(),
       {"name of 64 bytes is over llama.cpp's limit of 63"}},
      {Bytes().Start(1, 0).Tensor("", {4}, 0, 0).PadTo(32).Zeros(32).str(),
       {"tensor 0: empty name"}},
      {Bytes().Start(2, 0).Tensor("w", {4}, 0, 0).Tensor("w", {4}, 0, 32).PadTo(32).Zeros(64).str(),
       {"tensor 'w': the name appears twice"}},
      {Bytes().Start(1, 0).Tensor("w", {4}, 0, 8).PadTo(32).Zeros(64).str(),
       {"tensor 'w'", "offset 8 is not a multiple of the alignment 32"}},
      {Bytes().Start(1, 0).Tensor("w", {4}, 0, 32).PadTo(32).Zeros(64).str(),
       {"tensor 'w'", "offset 32 leaves a gap", "the data section starts at 0"}},
      {Bytes().Start(2, 0).Tensor("a", {16}, 0, 0).Tensor("b", {4}, 0, 32).PadTo(32).Zeros(96).str(),
       {"tensor 'b'", "offset 32 overlaps", "tensor 'a' [0, 64) ends at 64"}},
      {Bytes().Start(2, 0).Tensor("a", {4}, 0, 0).Tensor("b", {4}, 0, 64).PadTo(32).Zeros(96).str(),
       {"tensor 'b'", "offset 64 leaves a gap", "'a' [0, 16) ends at 32"}},
      {Bytes().Start(1, 0).Tensor("w", {16}, 0, 0).PadTo(32).Zeros(60).str(),
       {"tensor 'w'", "data [0, 64)", "beyond the end of the file", "truncated"}},
      {Bytes().Start(1, 0).Tensor("w", {4}, 0, 0).PadTo(32).Zeros(20).str(),
       {"account for", "(truncated?)"}},
      {Bytes().Start(1, 0).Tensor("w", {4}, 0, 0).PadTo(32).Zeros(33).str(),
       {"account for", "(trailing bytes)"}},
      {Bytes().Start(0, 0).PadTo(32).Zeros(5).str(), {"account for 32 (trailing bytes)"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.fragments[0]);
    absl::StatusOr<GgufHeader> header = Parse(c.bytes);
    ASSERT_FALSE(header.ok());
    ExpectInvalid(header.status(), {});
    for (const std::string& fragment : c.fragments) {
      EXPECT_THAT(std::string(header.status().message()), HasSubstr(fragment));
    }
  }
}

TEST(GgufFile, ParserAcceptsHandWrittenFilesTheWriterWouldMake) {
  // The minimal file: no metadata, no tensors, padded to 32.
  absl::StatusOr<GgufHeader> empty = Parse(Bytes().Start(0, 0).PadTo(32).str());
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->data_offset, 32u);

  // Alignment 16 from the metadata; two F32 tensors.
  Bytes file;
  file.Start(2, 1).Str("general.alignment").U32(4).U32(16);
  file.Tensor("a", {3}, 0, 0).Tensor("b", {2, 2}, 0, 16).PadTo(16);
  const size_t data_offset = file.size();
  file.Zeros(32);
  absl::StatusOr<GgufHeader> header = Parse(file.str());
  ASSERT_TRUE(header.ok()) << header.status();
  EXPECT_EQ(header->alignment, 16u);
  EXPECT_EQ(header->data_offset, data_offset);
  EXPECT_EQ(header->tensors[1].bytes, 16u);
  EXPECT_EQ(header->tensors[1].TorchShape(), (std::vector<int64_t>{2, 2}));

  // Only the header given, but the file is longer: the data is not needed.
  absl::StatusOr<GgufHeader> prefix =
      ParseGgufHeader(file.str().substr(0, data_offset), file.size(), kFile);
  ASSERT_TRUE(prefix.ok()) << prefix.status();
  EXPECT_EQ(prefix->tensors.size(), 2u);
  // Less than the header: says so rather than "truncated".
  absl::Status short_read = ParseGgufHeader(file.str().substr(0, 40), file.size(), kFile).status();
  ExpectInvalid(short_read, {"only the first 40 bytes of the file were read"});
}

TEST(GgufFile, EveryTruncationIsInvalidArgumentNeverACrash) {
  const std::string file = SmallValidFile();
  ASSERT_TRUE(Parse(file).ok()) << Parse(file).status();
  for (size_t length = 0; length < file.size(); ++length) {
    SCOPED_TRACE(length);
    ExpectInvalid(Parse(file.substr(0, length)).status(), {});
  }
}

TEST(GgufFile, CorruptedBytesNeverCrashAndWhatParsesIsConsistent) {
  const std::string file = SmallValidFile();
  absl::StatusOr<GgufHeader> valid = Parse(file);
  ASSERT_TRUE(valid.ok());
  const size_t header_bytes = valid->data_offset;
  std::mt19937 rng(7);
  int parsed = 0;
  for (int trial = 0; trial < 5000; ++trial) {
    std::string corrupted = file;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) {
      const size_t at = rng() % header_bytes;
      // Half the time a single flipped bit, else a random byte.
      if (rng() % 2 == 0) {
        corrupted[at] = static_cast<char>(corrupted[at] ^ (1 << (rng() % 8)));
      } else {
        corrupted[at] = static_cast<char>(rng());
      }
    }
    absl::StatusOr<GgufHeader> header = Parse(corrupted);
    if (!header.ok()) {
      ASSERT_EQ(header.status().code(), absl::StatusCode::kInvalidArgument) << header.status();
      ASSERT_THAT(std::string(header.status().message()), HasSubstr(kFile));
      continue;
    }
    ++parsed;
    // Whatever still parses is self-consistent.
    uint64_t cursor = 0;
    for (const GgufTensorInfo& t : header->tensors) {
      ASSERT_EQ(t.offset, cursor);
      ASSERT_EQ(t.offset % header->alignment, 0u);
      absl::StatusOr<uint64_t> bytes = GgufTensorBytes(t.type, t.ne, t.name);
      ASSERT_TRUE(bytes.ok());
      ASSERT_EQ(*bytes, t.bytes);
      cursor = (t.offset + t.bytes + header->alignment - 1) / header->alignment * header->alignment;
    }
    ASSERT_EQ(header->data_offset + cursor, corrupted.size());
  }
  // Flips inside string values and float payloads keep the file valid.
  EXPECT_GT(parsed, 0);
}

TEST(GgufFile, RandomGarbageAfterTheMagicIsRejected) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 2000; ++trial) {
    std::string bytes = Bytes().Start(rng() % 4, rng() % 4).str();
    bytes += RandomBytes(rng() % 200, static_cast<uint32_t>(trial));
    absl::StatusOr<GgufHeader> header = Parse(bytes);
    if (!header.ok()) {
      ASSERT_EQ(header.status().code(), absl::StatusCode::kInvalidArgument) << header.status();
    }
  }
}

TEST(GgufFile, ReadingMissingOrEmptyFiles) {
  TempDir dir("gguf");
  EXPECT_EQ(ReadGgufHeader(dir.Sub("missing.gguf")).status().code(), absl::StatusCode::kNotFound);
  const std::string empty = dir.Sub("empty.gguf");
  std::ofstream(empty).close();
  absl::Status status = ReadGgufHeader(empty).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr(empty));
  EXPECT_EQ(GgufMappedFile::Open(dir.path()).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace compress
