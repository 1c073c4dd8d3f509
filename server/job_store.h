// Durable state of the scheduler: jobs (with their lease) and each job's
// append-only event log. SQLite is the embedded default; PostgreSQL is the
// alternative for a managed database (`compress-server --store postgres://...`).
// Both pass the same suite, tests/server/job_store_test.cc.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "compress/v1/compress.pb.h"

namespace compress::server {

// A job as stored: the public Job message, its tasks and their leases
// included. Lease expiry times are the scheduler's, kept in memory: a
// restarted server extends every lease anyway.
struct StoredJob {
  compress::v1::Job job;
};

class JobStore {
 public:
  virtual ~JobStore() = default;
  virtual absl::StatusOr<std::vector<StoredJob>> LoadJobs() = 0;
  // Writes the job and appends `events` in one transaction: either both are
  // durable or neither is. Events must continue the job's sequence: the
  // first is the stored log's last + 1 (1 for a new job), each the one
  // before + 1; a gap or a duplicate is ABORTED and writes nothing.
  virtual absl::Status Commit(const StoredJob& job,
                              const std::vector<compress::v1::JobEvent>& events) = 0;
  // Events with sequence >= from_sequence, in order, at most `limit`.
  virtual absl::StatusOr<std::vector<compress::v1::JobEvent>> ReadEvents(
      const std::string& job_id, int64_t from_sequence, int limit) = 0;
  // Removes the job and its events in one transaction. OK when there is no
  // such job (so a retried delete is harmless).
  virtual absl::Status DeleteJob(const std::string& job_id) = 0;
};

// Opens (creating if needed) a SQLite database in WAL mode.
absl::StatusOr<std::unique_ptr<JobStore>> OpenSqliteJobStore(const std::string& path);

// Connects to PostgreSQL through libpq: `url` is a postgres:// or
// postgresql:// URL (or a libpq "key=value" string); the password may come
// from PGPASSWORD or ~/.pgpass instead. Creates the tables compress_jobs and
// compress_events in the connection's current schema (set one with
// `?options=-csearch_path%3Dname`). One server per schema: the store holds
// an advisory lock on it, waiting up to `lock_wait` for another holder
// (FAILED_PRECONDITION naming it after that). A dropped connection (a
// restarted database) is reopened by the next call. INVALID_ARGUMENT for a
// URL libpq cannot parse, UNAVAILABLE for a database it cannot reach.
absl::StatusOr<std::unique_ptr<JobStore>> OpenPostgresJobStore(
    const std::string& url, absl::Duration lock_wait = absl::Seconds(15));

// The check both stores make inside their transaction: `events` belong to
// `job_id` (else INVALID_ARGUMENT) and continue its log after
// `last_stored_sequence` (0: no events yet) without a gap or a duplicate
// (else ABORTED: a bug, or another writer on the same store).
absl::Status CheckEventsContinue(const std::string& job_id, int64_t last_stored_sequence,
                                 const std::vector<compress::v1::JobEvent>& events);

}  // namespace compress::server
