// Durable state of the scheduler: jobs (with their lease) and each job's
// append-only event log. SQLite is the embedded default; the interface lets
// another database slot in.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
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
  // durable or neither is. Events must continue the job's sequence.
  virtual absl::Status Commit(const StoredJob& job,
                              const std::vector<compress::v1::JobEvent>& events) = 0;
  // Events with sequence >= from_sequence, in order, at most `limit`.
  virtual absl::StatusOr<std::vector<compress::v1::JobEvent>> ReadEvents(
      const std::string& job_id, int64_t from_sequence, int limit) = 0;
};

// Opens (creating if needed) a SQLite database in WAL mode.
absl::StatusOr<std::unique_ptr<JobStore>> OpenSqliteJobStore(const std::string& path);

}  // namespace compress::server
