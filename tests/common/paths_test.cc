#include "common/paths.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "tests/testing/temp_dir.h"

namespace compress {
namespace {

namespace fs = std::filesystem;
using ::compress::testing::TempDir;

class ResolveUnderRootsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(root_ / "models/llama");
    fs::create_directories(other_root_);
    fs::create_directories(outside_);
    std::ofstream(root_ / "models/llama/config.json") << "{}";
    std::ofstream(outside_ / "secret.txt") << "no";
  }

  TempDir dir_;
  fs::path root_ = fs::path(dir_.path()) / "root";
  fs::path other_root_ = fs::path(dir_.path()) / "root2";  // shares a prefix with root_
  fs::path outside_ = fs::path(dir_.path()) / "outside";
};

TEST_F(ResolveUnderRootsTest, PathInsideARootResolves) {
  absl::StatusOr<std::string> resolved =
      ResolveUnderRoots((root_ / "models/llama").string(), {root_.string()});
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, (root_ / "models/llama").string());
}

TEST_F(ResolveUnderRootsTest, RelativePathResolvesUnderTheFirstRoot) {
  absl::StatusOr<std::string> resolved =
      ResolveUnderRoots("models/llama/config.json", {root_.string(), other_root_.string()});
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, (root_ / "models/llama/config.json").string());
}

TEST_F(ResolveUnderRootsTest, AnyRootWillDo) {
  std::ofstream(other_root_ / "m.safetensors") << "";
  EXPECT_TRUE(ResolveUnderRoots((other_root_ / "m.safetensors").string(),
                                {root_.string(), other_root_.string()})
                  .ok());
}

TEST_F(ResolveUnderRootsTest, DotDotIsRejected) {
  EXPECT_EQ(ResolveUnderRoots("models/../../outside/secret.txt", {root_.string()}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ResolveUnderRoots((root_ / "models/..").string(), {root_.string()}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ResolveUnderRootsTest, SymlinkEscapingTheRootIsDenied) {
  fs::create_symlink(outside_, root_ / "escape");
  EXPECT_EQ(ResolveUnderRoots("escape/secret.txt", {root_.string()}).status().code(),
            absl::StatusCode::kPermissionDenied);
  // A link that stays inside is fine.
  fs::create_directory_symlink(root_ / "models/llama", root_ / "current");
  EXPECT_TRUE(ResolveUnderRoots("current/config.json", {root_.string()}).ok());
}

TEST_F(ResolveUnderRootsTest, SiblingWithTheRootAsPrefixIsDenied) {
  std::ofstream(other_root_ / "m.safetensors") << "";
  EXPECT_EQ(
      ResolveUnderRoots((other_root_ / "m.safetensors").string(), {root_.string()}).status().code(),
      absl::StatusCode::kPermissionDenied);
}

TEST_F(ResolveUnderRootsTest, MissingIsNotFound) {
  EXPECT_EQ(ResolveUnderRoots("models/nope", {root_.string()}).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(ResolveUnderRootsTest, EmptyPathAndNoRoots) {
  EXPECT_EQ(ResolveUnderRoots("", {root_.string()}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ResolveUnderRoots("models", {}).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(IsSafeRelativeNameTest, AcceptsPlainRelativeNames) {
  EXPECT_TRUE(IsSafeRelativeName("model.safetensors"));
  EXPECT_TRUE(IsSafeRelativeName("dequantized/model-00001-of-00002.safetensors"));
  EXPECT_TRUE(IsSafeRelativeName("..hidden"));
  EXPECT_TRUE(IsSafeRelativeName(std::string(255, 'a')));
}

TEST(IsSafeRelativeNameTest, RejectsEscapesAndOddNames) {
  EXPECT_FALSE(IsSafeRelativeName(""));
  EXPECT_FALSE(IsSafeRelativeName("/etc/passwd"));
  EXPECT_FALSE(IsSafeRelativeName(".."));
  EXPECT_FALSE(IsSafeRelativeName("../x"));
  EXPECT_FALSE(IsSafeRelativeName("a/../../x"));
  EXPECT_FALSE(IsSafeRelativeName("./x"));
  EXPECT_FALSE(IsSafeRelativeName("a//b"));
  EXPECT_FALSE(IsSafeRelativeName("a/"));
  EXPECT_FALSE(IsSafeRelativeName(std::string("a\0b", 3)));
  EXPECT_FALSE(IsSafeRelativeName(std::string(256, 'a')));
}

}  // namespace
}  // namespace compress
