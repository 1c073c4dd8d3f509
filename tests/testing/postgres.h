// PostgreSQL for tests. The server is $COMPRESS_TEST_POSTGRES_URL when that
// is set; otherwise a throwaway cluster that this process starts on first
// use (Debian's initdb and postgres from /usr/lib/postgresql/*/bin, run as
// the `postgres` user when the tests run as root, in a folder under
// test-tmp/ of the working directory, on a free loopback port, trust
// authentication, fsync off) and stops at exit. Each test takes a fresh
// schema in it, so tests never see each other's tables.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace compress::testing {

// Empty when PostgreSQL tests can run here; else why not, for GTEST_SKIP:
// no URL is given and PostgreSQL is not installed.
std::string PostgresSkipReason();

// A throwaway PostgreSQL cluster.
class PostgresCluster {
 public:
  // initdb into a new folder and start the server; the folder goes when the
  // cluster does.
  static absl::StatusOr<std::unique_ptr<PostgresCluster>> Start();
  ~PostgresCluster();
  PostgresCluster(const PostgresCluster&) = delete;
  PostgresCluster& operator=(const PostgresCluster&) = delete;

  // postgresql://postgres@127.0.0.1:PORT/postgres
  std::string url() const;
  // A fast shutdown (every session ends), then, for Restart, a start on
  // the same port: what a database restart looks like to its clients.
  absl::Status Stop();
  absl::Status Restart();
  std::string Log() const;

 private:
  PostgresCluster() = default;
  absl::Status Launch();

  std::string base_;  // the folder: data/ and postgres.log
  std::string bin_;   // initdb, postgres
  int port_ = 0;
  pid_t pid_ = -1;  // the postmaster
};

// This process's test server: the URL from the environment, or the shared
// throwaway cluster (started on first use).
absl::StatusOr<std::string> TestPostgresUrl();
// The shared cluster when this process started one; null with a URL from
// the environment (tests that restart the database skip then).
PostgresCluster* TestPostgresCluster();

// A fresh schema in the test server, dropped (with its tables) at scope end.
class PostgresSchema {
 public:
  static absl::StatusOr<std::unique_ptr<PostgresSchema>> Create();
  ~PostgresSchema();
  PostgresSchema(const PostgresSchema&) = delete;
  PostgresSchema& operator=(const PostgresSchema&) = delete;

  // The server's URL with search_path set to this schema and an
  // application_name of the schema's name, so its sessions can be found.
  const std::string& url() const { return url_; }
  const std::string& name() const { return name_; }
  // Ends every session connected through url(), as a database restart or a
  // dropped network would, and waits until they are gone.
  absl::Status TerminateSessions();

 private:
  PostgresSchema() = default;
  std::string base_url_;
  std::string url_;
  std::string name_;
};

// The job store a compress-server under test uses: SQLite in its
// --data-dir unless COMPRESS_TEST_STORE=postgres, then a schema of the test
// PostgreSQL server (the same one across the server's restarts in a test).
class TestStore {
 public:
  TestStore();
  bool postgres() const { return postgres_; }
  // Empty unless PostgreSQL is wanted and cannot run here.
  std::string SkipReason() const;
  // Appends the server's store flags to `argv` (none for SQLite).
  absl::Status AddServerFlags(std::vector<std::string>* argv);

 private:
  bool postgres_ = false;
  std::string unknown_;  // a COMPRESS_TEST_STORE that names no store
  std::unique_ptr<PostgresSchema> schema_;
};

}  // namespace compress::testing
