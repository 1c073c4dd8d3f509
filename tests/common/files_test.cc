#include "common/files.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tests/testing/temp_dir.h"

namespace compress {
namespace {

namespace fs = std::filesystem;
using ::compress::testing::TempDir;

std::vector<std::string> Entries(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename());
  return names;
}

TEST(FilesTest, WriteFileAtomicWritesContentAndCreatesParents) {
  TempDir dir;
  const std::string path = dir.Sub("a/b/out.bin");
  ASSERT_TRUE(WriteFileAtomic(path, std::string("first\0binary", 12)).ok());
  absl::StatusOr<std::string> read = ReadFile(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, std::string("first\0binary", 12));

  ASSERT_TRUE(WriteFileAtomic(path, "second").ok());  // replaces
  EXPECT_EQ(ReadFile(path).value_or(""), "second");
  EXPECT_EQ(Entries(fs::path(dir.path()) / "a/b"),
            std::vector<std::string>{"out.bin"});  // no temp left
}

TEST(FilesTest, UncommittedWriterLeavesNoFileAndNoTemp) {
  TempDir dir;
  const std::string path = dir.Sub("partial.bin");
  {
    absl::StatusOr<AtomicFileWriter> writer = AtomicFileWriter::Open(path);
    ASSERT_TRUE(writer.ok()) << writer.status();
    ASSERT_TRUE(writer->Write("half of it").ok());
    EXPECT_TRUE(fs::exists(writer->temp_path()));
  }
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(Entries(dir.path()).empty());
}

TEST(FilesTest, CommitRenamesIntoPlace) {
  TempDir dir;
  const std::string path = dir.Sub("model.safetensors");
  absl::StatusOr<AtomicFileWriter> writer = AtomicFileWriter::Open(path);
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE(writer->Write("abc").ok());
  ASSERT_TRUE(writer->Write("def").ok());
  EXPECT_EQ(writer->bytes_written(), 6);
  EXPECT_FALSE(fs::exists(path));  // invisible until committed
  const std::string temp = writer->temp_path();
  ASSERT_TRUE(writer->Commit().ok());
  EXPECT_EQ(ReadFile(path).value_or(""), "abcdef");
  EXPECT_FALSE(fs::exists(temp));
  EXPECT_EQ(writer->Write("more").code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(writer->Commit().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(FilesTest, MovedWriterOwnsTheTempFile) {
  TempDir dir;
  const std::string path = dir.Sub("moved.bin");
  absl::StatusOr<AtomicFileWriter> writer = AtomicFileWriter::Open(path);
  ASSERT_TRUE(writer.ok());
  AtomicFileWriter moved(std::move(*writer));
  ASSERT_TRUE(moved.Write("x").ok());
  ASSERT_TRUE(moved.Commit().ok());
  EXPECT_EQ(ReadFile(path).value_or(""), "x");
  EXPECT_EQ(Entries(dir.path()), std::vector<std::string>{"moved.bin"});
}

TEST(FilesTest, ReadFileErrors) {
  TempDir dir;
  EXPECT_EQ(ReadFile(dir.Sub("missing")).status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(WriteFileAtomic(dir.Sub("big"), std::string(100, 'x')).ok());
  EXPECT_EQ(ReadFile(dir.Sub("big"), 99).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(ReadFile(dir.Sub("big"), 100).value_or("").size(), 100u);
}

TEST(FilesTest, MakeDirsIsIdempotent) {
  TempDir dir;
  ASSERT_TRUE(MakeDirs(dir.Sub("x/y/z")).ok());
  ASSERT_TRUE(MakeDirs(dir.Sub("x/y/z")).ok());
  EXPECT_TRUE(fs::is_directory(dir.Sub("x/y/z")));
}

}  // namespace
}  // namespace compress
