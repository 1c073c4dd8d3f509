#include "common/auth.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/files.h"
#include "common/sha256.h"

namespace compress {

absl::StatusOr<TokenAuthenticator> TokenAuthenticator::FromFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path, 16 << 20);
  if (!text.ok()) return text.status();
  return FromText(*text, path);
}

absl::StatusOr<TokenAuthenticator> TokenAuthenticator::FromText(absl::string_view text,
                                                                absl::string_view source) {
  TokenAuthenticator auth;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') continue;
    std::vector<absl::string_view> fields = absl::StrSplit(line, ' ', absl::SkipWhitespace());
    auto where = [&] { return absl::StrCat(source, ":", line_number, ": "); };
    if (fields.size() < 2 || fields.size() > 3) {
      return absl::InvalidArgumentError(absl::StrCat(where(), "expected 'TOKEN TENANT [ROLE]'"));
    }
    if (fields[0].size() < 16) {
      return absl::InvalidArgumentError(absl::StrCat(where(), "token shorter than 16 characters"));
    }
    Principal principal;
    principal.tenant = std::string(fields[1]);
    absl::string_view role = fields.size() == 3 ? fields[2] : "client";
    if (role == "client") {
      principal.role = Role::kClient;
    } else if (role == "admin") {
      principal.role = Role::kAdmin;
    } else if (role == "worker") {
      principal.role = Role::kWorker;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(where(), "role '", role, "' is not client, admin or worker"));
    }
    if (!auth.by_digest_.emplace(Sha256Hex(fields[0]), principal).second) {
      return absl::InvalidArgumentError(absl::StrCat(where(), "the same token appears twice"));
    }
  }
  return auth;
}

absl::StatusOr<Principal> TokenAuthenticator::Authenticate(absl::string_view authorization) const {
  if (!enabled()) return Principal{"default", Role::kClient};
  if (!absl::StartsWith(authorization, "Bearer ")) {
    return absl::UnauthenticatedError("missing 'authorization: Bearer <token>' metadata");
  }
  // Looking up a digest keeps the comparison independent of the token's bytes.
  auto it = by_digest_.find(Sha256Hex(authorization.substr(7)));
  if (it == by_digest_.end()) return absl::UnauthenticatedError("unknown token");
  return it->second;
}

}  // namespace compress
