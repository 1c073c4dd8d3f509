// The safetensors header parser and serializer (common/, no LibTorch).
#include "common/safetensors_header.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "tests/engine/test_util.h"

namespace compress {
namespace {

using engine::testing::ExpectInvalidArgument;
using engine::testing::SafetensorsBytes;

constexpr char kFile[] = "models/x.safetensors";

absl::StatusOr<SafetensorsHeader> Parse(const std::string& bytes) {
  return ParseSafetensorsHeader(bytes, bytes.size(), kFile);
}

// {"a": F32 [2, 3] at [0, 24), "b": BF16 [4] at [24, 32)} plus metadata.
std::string ValidFile() {
  return SafetensorsBytes(R"({"__metadata__":{"format":"pt"},)"
                          R"("b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]},)"
                          R"("a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})",
                          std::string(32, '\x01'));
}

TEST(SafetensorsHeader, ParsesTensorsInDataOrderWithMetadata) {
  absl::StatusOr<SafetensorsHeader> header = Parse(ValidFile());
  ASSERT_TRUE(header.ok()) << header.status();
  ASSERT_EQ(header->tensors.size(), 2u);
  EXPECT_EQ(header->tensors[0].name, "a");
  EXPECT_EQ(header->tensors[0].dtype, SafetensorsDtype::kF32);
  EXPECT_EQ(header->tensors[0].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(header->tensors[0].data_begin, 0u);
  EXPECT_EQ(header->tensors[0].data_end, 24u);
  EXPECT_EQ(header->tensors[1].name, "b");
  EXPECT_EQ(header->tensors[1].dtype, SafetensorsDtype::kBF16);
  EXPECT_EQ(header->tensors[1].NumElements(), 4);
  EXPECT_EQ(header->metadata.at("format"), "pt");
  EXPECT_EQ(header->DataSectionBytes(), 32u);
  EXPECT_EQ(header->DataSectionOffset() + 32, ValidFile().size());
  EXPECT_NE(header->Find("b"), nullptr);
  EXPECT_EQ(header->Find("c"), nullptr);
}

TEST(SafetensorsHeader, KnowsEveryDtypeAndWhichOnesAreWeights) {
  struct Row {
    const char* name;
    int bytes;
    bool weight;
  };
  for (const Row& row :
       {Row{"F32", 4, true}, Row{"F16", 2, true}, Row{"BF16", 2, true}, Row{"F64", 8, false},
        Row{"I64", 8, false}, Row{"I32", 4, false}, Row{"I16", 2, false}, Row{"I8", 1, false},
        Row{"U8", 1, false}, Row{"U16", 2, false}, Row{"U32", 4, false}, Row{"U64", 8, false},
        Row{"BOOL", 1, false}, Row{"F8_E4M3", 1, false}, Row{"F8_E5M2", 1, false}}) {
    SCOPED_TRACE(row.name);
    absl::StatusOr<SafetensorsDtype> dtype = ParseSafetensorsDtype(row.name);
    ASSERT_TRUE(dtype.ok());
    EXPECT_EQ(DtypeBytes(*dtype), row.bytes);
    EXPECT_EQ(IsWeightDtype(*dtype), row.weight);
    EXPECT_STREQ(DtypeName(*dtype), row.name);
  }
  EXPECT_FALSE(ParseSafetensorsDtype("f32").ok());
  EXPECT_FALSE(ParseSafetensorsDtype("F4").ok());
}

TEST(SafetensorsHeader, SerializesPaddedToEightBytesAndParsesBack) {
  absl::StatusOr<SafetensorsHeader> layout =
      LayoutSafetensors({{"w", SafetensorsDtype::kF16, {3, 5}},
                         {"ids", SafetensorsDtype::kI64, {7}},
                         {"scalar", SafetensorsDtype::kF32, {}},
                         {"empty", SafetensorsDtype::kU8, {0, 4}}},
                        {{"format", "pt"}});
  ASSERT_TRUE(layout.ok()) << layout.status();
  absl::StatusOr<std::string> prefix = SerializeSafetensorsHeader(&*layout);
  ASSERT_TRUE(prefix.ok()) << prefix.status();
  EXPECT_EQ(prefix->size() % 8, 0u);
  EXPECT_EQ(prefix->size(), 8 + layout->json_bytes);
  const std::string json = prefix->substr(8);
  EXPECT_EQ(json.find_first_not_of(' ', json.find_last_of('}') + 1), std::string::npos)
      << "the padding after the JSON is spaces";
  const uint64_t data_bytes = 30 + 56 + 4;
  EXPECT_EQ(layout->DataSectionBytes(), data_bytes);

  std::string file = *prefix + std::string(data_bytes, '\0');
  absl::StatusOr<SafetensorsHeader> parsed = Parse(file);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->tensors.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    SCOPED_TRACE(layout->tensors[i].name);
    EXPECT_EQ(parsed->tensors[i].name, layout->tensors[i].name);
    EXPECT_EQ(parsed->tensors[i].dtype, layout->tensors[i].dtype);
    EXPECT_EQ(parsed->tensors[i].shape, layout->tensors[i].shape);
    EXPECT_EQ(parsed->tensors[i].data_begin, layout->tensors[i].data_begin);
    EXPECT_EQ(parsed->tensors[i].data_end, layout->tensors[i].data_end);
  }
  EXPECT_EQ(parsed->metadata, layout->metadata);
}

TEST(SafetensorsHeader, LayoutRejectsDuplicateAndNegativeShapes) {
  EXPECT_EQ(LayoutSafetensors(
                {{"a", SafetensorsDtype::kF32, {1}}, {"a", SafetensorsDtype::kF32, {1}}}, {})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LayoutSafetensors({{"a", SafetensorsDtype::kF32, {-1}}}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SafetensorsHeader, RejectsBadLengthPrefix) {
  ExpectInvalidArgument(Parse("").status(), {kFile, "too short"});
  ExpectInvalidArgument(Parse("\x05\0\0").status(), {kFile, "too short"});
  // Length beyond the file.
  std::string beyond = SafetensorsBytes("{}", "");
  beyond[0] = 100;
  ExpectInvalidArgument(Parse(beyond).status(), {kFile, "header length 100", "beyond"});
  // Absurd length (> 100 MB), even though the file claims to be that large.
  std::string absurd(16, '\0');
  const uint64_t huge = uint64_t{1} << 40;
  std::memcpy(absurd.data(), &huge, 8);
  ExpectInvalidArgument(ParseSafetensorsHeader(absurd, uint64_t{1} << 41, kFile).status(),
                        {kFile, "over the limit"});
}

TEST(SafetensorsHeader, RejectsBadJson) {
  ExpectInvalidArgument(Parse(SafetensorsBytes("{\"a\": ", "")).status(),
                        {kFile, "not valid JSON"});
  ExpectInvalidArgument(Parse(SafetensorsBytes("[1, 2]", "")).status(),
                        {kFile, "not a JSON object"});
  ExpectInvalidArgument(
      Parse(SafetensorsBytes(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                             R"("a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                             "xx"))
          .status(),
      {kFile, "'a' twice"});
  ExpectInvalidArgument(Parse(SafetensorsBytes(R"({"__metadata__":{"k":1}})", "")).status(),
                        {kFile, "__metadata__", "'k'"});
  ExpectInvalidArgument(Parse(SafetensorsBytes(R"({"t": 5})", "")).status(),
                        {kFile, "'t'", "not a JSON object"});
}

TEST(SafetensorsHeader, RejectsBadTensorEntriesNamingFileAndTensor) {
  struct Case {
    const char* json;
    const char* problem;
  };
  const Case cases[] = {
      {R"({"w":{"shape":[1],"data_offsets":[0,4]}})", "missing field 'dtype'"},
      {R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", "missing field 'shape'"},
      {R"({"w":{"dtype":"F32","shape":[1]}})", "missing field 'data_offsets'"},
      {R"({"w":{"dtype":"F7","shape":[1],"data_offsets":[0,4]}})", "unsupported dtype 'F7'"},
      {R"({"w":{"dtype":3,"shape":[1],"data_offsets":[0,4]}})", "'dtype' is not a string"},
      {R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "negative dimension"},
      {R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", "non-integer"},
      {R"({"w":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", "'shape' is not an array"},
      {R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})",
       "overflows int64"},
      {R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,4]}})",
       "overflows int64"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", "end before begin"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", "[begin, end]"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-1,3]}})", "not a non-negative integer"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", "needs 8"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.json);
    ExpectInvalidArgument(Parse(SafetensorsBytes(c.json, "abcd")).status(),
                          {kFile, "tensor 'w'", c.problem});
  }
}

TEST(SafetensorsHeader, RejectsOffsetsThatDoNotTileTheData) {
  // Beyond the data section: the file was truncated.
  ExpectInvalidArgument(
      Parse(SafetensorsBytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", "abcd"))
          .status(),
      {kFile, "tensor 'w'", "beyond the data section", "truncated"});
  // Overlap: both tensors named.
  ExpectInvalidArgument(
      Parse(SafetensorsBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                             std::string(12, 'x')))
          .status(),
      {kFile, "tensor 'b'", "overlap tensor 'a'"});
  // A gap of bytes that belong to no tensor.
  ExpectInvalidArgument(
      Parse(SafetensorsBytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                             std::string(12, 'x')))
          .status(),
      {kFile, "tensor 'b'", "gap"});
  // Trailing bytes after the last tensor.
  ExpectInvalidArgument(
      Parse(SafetensorsBytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                             std::string(6, 'x')))
          .status(),
      {kFile, "cover only 4", "'a'"});
}

TEST(SafetensorsHeader, EveryTruncationIsInvalidArgumentNeverACrash) {
  const std::string file = ValidFile();
  for (size_t length = 0; length < file.size(); ++length) {
    SCOPED_TRACE(length);
    std::string truncated = file.substr(0, length);
    absl::StatusOr<SafetensorsHeader> header = Parse(truncated);
    EXPECT_EQ(header.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(header.status().message()), ::testing::HasSubstr(kFile));
  }
}

TEST(SafetensorsHeader, CorruptedHeaderBytesNeverCrash) {
  const std::string file = ValidFile();
  std::mt19937 rng(7);
  for (int trial = 0; trial < 2000; ++trial) {
    std::string corrupted = file;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) {
      const size_t at = rng() % (corrupted.size() - 32);  // header bytes only
      corrupted[at] = static_cast<char>(rng());
    }
    absl::StatusOr<SafetensorsHeader> header = Parse(corrupted);
    if (!header.ok()) {
      ASSERT_EQ(header.status().code(), absl::StatusCode::kInvalidArgument) << header.status();
      continue;
    }
    // Whatever still parses is self-consistent.
    uint64_t cursor = 0;
    for (const SafetensorsTensorInfo& t : header->tensors) {
      ASSERT_EQ(t.data_begin, cursor);
      ASSERT_EQ(t.NumBytes(), static_cast<uint64_t>(t.NumElements()) * DtypeBytes(t.dtype));
      cursor = t.data_end;
    }
    ASSERT_EQ(cursor + header->DataSectionOffset(), corrupted.size());
  }
}

}  // namespace
}  // namespace compress
