#include "common/paths.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace compress {
namespace fs = std::filesystem;

namespace {

bool HasDotDot(const std::string& path) {
  for (absl::string_view part : absl::StrSplit(path, '/')) {
    if (part == "..") return true;
  }
  return false;
}

bool IsInside(const fs::path& child, const fs::path& root) {
  auto c = child.begin();
  for (auto r = root.begin(); r != root.end(); ++r, ++c) {
    if (r->empty()) continue;  // trailing slash
    if (c == child.end() || *c != *r) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<std::string> ResolveUnderRoots(const std::string& path,
                                              const std::vector<std::string>& roots) {
  if (path.empty()) return absl::InvalidArgumentError("model path is empty");
  if (path.find('\0') != std::string::npos) return absl::InvalidArgumentError("path contains NUL");
  if (HasDotDot(path)) {
    return absl::InvalidArgumentError(absl::StrCat("path ", path, " contains '..'"));
  }
  if (roots.empty()) {
    return absl::FailedPreconditionError("no model roots configured (--model-root)");
  }
  fs::path candidate(path);
  if (candidate.is_relative()) candidate = fs::path(roots.front()) / candidate;
  std::error_code ec;
  fs::path resolved = fs::canonical(candidate, ec);
  if (ec) return absl::NotFoundError(absl::StrCat("path ", path, " does not exist"));
  for (const std::string& root : roots) {
    fs::path root_resolved = fs::canonical(root, ec);
    if (ec) continue;
    if (IsInside(resolved, root_resolved)) return resolved.string();
  }
  return absl::PermissionDeniedError(
      absl::StrCat("path ", path, " is outside every configured model root"));
}

bool IsSafeRelativeName(const std::string& name) {
  if (name.empty() || name.size() > 255 || name.front() == '/') return false;
  if (name.find('\0') != std::string::npos) return false;
  for (absl::string_view part : absl::StrSplit(name, '/')) {
    if (part.empty() || part == "." || part == "..") return false;
  }
  return true;
}

}  // namespace compress
