// Path safety: the server reads models only under configured roots.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace compress {

// Resolves `path` (absolute, or relative to the first root) with every
// symlink followed, and returns it only if it lies inside one of `roots`
// (also resolved). Errors: INVALID_ARGUMENT for an empty path or one with a
// ".." component, NOT_FOUND when it does not exist, PERMISSION_DENIED when it
// resolves outside every root.
absl::StatusOr<std::string> ResolveUnderRoots(const std::string& path,
                                              const std::vector<std::string>& roots);

// True if `name` is a safe relative artifact name: non-empty, no leading '/',
// no "." or ".." components, no NUL, at most 255 bytes.
bool IsSafeRelativeName(const std::string& name);

}  // namespace compress
