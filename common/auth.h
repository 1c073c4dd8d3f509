// Bearer tokens from a file, mapped to who is calling. One line per token:
//
//   # token                 tenant     role (client | admin | worker)
//   3f9c...e1               team-nlp   client
//   77aa...09               ops        admin
//   c0de...42               -          worker
//
// Clients act for their tenant; admins see every tenant's jobs; worker
// tokens open only the WorkerService, so a client cannot pose as a worker and
// receive models.
#pragma once

#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace compress {

enum class Role { kClient, kAdmin, kWorker };

struct Principal {
  std::string tenant;
  Role role = Role::kClient;
};

class TokenAuthenticator {
 public:
  // No tokens: every call is the tenant "default" with the client role, and
  // workers need no token.
  TokenAuthenticator() = default;
  static absl::StatusOr<TokenAuthenticator> FromFile(const std::string& path);
  static absl::StatusOr<TokenAuthenticator> FromText(absl::string_view text,
                                                     absl::string_view source);

  bool enabled() const { return !by_digest_.empty(); }
  // `authorization` is the metadata value, "Bearer <token>". UNAUTHENTICATED
  // when tokens are configured and it is missing or unknown.
  absl::StatusOr<Principal> Authenticate(absl::string_view authorization) const;

 private:
  std::map<std::string, Principal> by_digest_;  // sha256(token) -> who
};

}  // namespace compress
