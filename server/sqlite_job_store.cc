#include <sqlite3.h>

#include <mutex>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/job_store.h"

namespace compress::server {
namespace {

using compress::v1::JobEvent;

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  tenant TEXT NOT NULL,
  state INTEGER NOT NULL,
  create_micros INTEGER NOT NULL,
  task_id TEXT NOT NULL,
  lease_expiry_micros INTEGER NOT NULL,
  job BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
  job_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  event BLOB NOT NULL,
  PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
)sql";

// A prepared statement that resets itself when it goes out of scope.
class Statement {
 public:
  Statement(sqlite3_stmt* stmt) : stmt_(stmt) {}
  ~Statement() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }
  sqlite3_stmt* get() const { return stmt_; }

 private:
  sqlite3_stmt* stmt_;
};

class SqliteJobStore : public JobStore {
 public:
  ~SqliteJobStore() override {
    for (sqlite3_stmt* s : {upsert_job_, insert_event_, read_events_, load_jobs_, last_event_,
                            delete_events_, delete_job_}) {
      sqlite3_finalize(s);
    }
    sqlite3_close(db_);
  }

  absl::Status Open(const std::string& path) {
    if (sqlite3_open_v2(path.c_str(), &db_,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                        nullptr) != SQLITE_OK) {
      return absl::UnavailableError(absl::StrCat("open job store ", path, ": ", Error()));
    }
    sqlite3_busy_timeout(db_, 5000);
    RETURN_IF_ERROR(Exec("PRAGMA journal_mode=WAL;"));
    // NORMAL in WAL mode survives a process crash; only power loss may drop
    // the newest transactions.
    RETURN_IF_ERROR(Exec("PRAGMA synchronous=NORMAL;"));
    RETURN_IF_ERROR(Exec(kSchema));
    RETURN_IF_ERROR(Prepare(
        "INSERT INTO jobs (id, tenant, state, create_micros, task_id, lease_expiry_micros, job) "
        "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(id) DO UPDATE SET "
        "state=excluded.state, task_id=excluded.task_id, "
        "lease_expiry_micros=excluded.lease_expiry_micros, job=excluded.job",
        &upsert_job_));
    RETURN_IF_ERROR(Prepare("INSERT INTO events (job_id, seq, event) VALUES (?1, ?2, ?3)",
                            &insert_event_));
    RETURN_IF_ERROR(Prepare(
        "SELECT event FROM events WHERE job_id = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3",
        &read_events_));
    RETURN_IF_ERROR(Prepare("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?1",
                            &last_event_));
    RETURN_IF_ERROR(Prepare("SELECT job FROM jobs "
                            "ORDER BY create_micros, id",
                            &load_jobs_));
    RETURN_IF_ERROR(Prepare("DELETE FROM events WHERE job_id = ?1", &delete_events_));
    RETURN_IF_ERROR(Prepare("DELETE FROM jobs WHERE id = ?1", &delete_job_));
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<StoredJob>> LoadJobs() override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement stmt(load_jobs_);
    std::vector<StoredJob> jobs;
    int rc;
    while ((rc = sqlite3_step(stmt.get())) == SQLITE_ROW) {
      StoredJob stored;
      const void* blob = sqlite3_column_blob(stmt.get(), 0);
      int size = sqlite3_column_bytes(stmt.get(), 0);
      if (!stored.job.ParseFromArray(blob, size)) {
        return absl::DataLossError("job store: a job row does not parse");
      }
      jobs.push_back(std::move(stored));
    }
    if (rc != SQLITE_DONE) return absl::InternalError(absl::StrCat("load jobs: ", Error()));
    return jobs;
  }

  absl::Status Commit(const StoredJob& stored, const std::vector<JobEvent>& events) override {
    std::lock_guard<std::mutex> lock(mu_);
    RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE;"));
    absl::Status status = WriteJobAndEvents(stored, events);
    if (!status.ok()) {
      Exec("ROLLBACK;").IgnoreError();
      return status;
    }
    return Exec("COMMIT;");
  }

  absl::StatusOr<std::vector<JobEvent>> ReadEvents(const std::string& job_id,
                                                   int64_t from_sequence, int limit) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement stmt(read_events_);
    sqlite3_bind_text(stmt.get(), 1, job_id.data(), static_cast<int>(job_id.size()),
                      SQLITE_TRANSIENT);
    sqlite3_bind_int64(stmt.get(), 2, from_sequence);
    sqlite3_bind_int(stmt.get(), 3, limit);
    std::vector<JobEvent> events;
    int rc;
    while ((rc = sqlite3_step(stmt.get())) == SQLITE_ROW) {
      JobEvent event;
      if (!event.ParseFromArray(sqlite3_column_blob(stmt.get(), 0),
                                sqlite3_column_bytes(stmt.get(), 0))) {
        return absl::DataLossError(absl::StrCat("job store: an event of ", job_id, " does not parse"));
      }
      events.push_back(std::move(event));
    }
    if (rc != SQLITE_DONE) return absl::InternalError(absl::StrCat("read events: ", Error()));
    return events;
  }

  absl::Status DeleteJob(const std::string& job_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE;"));
    for (sqlite3_stmt* statement : {delete_events_, delete_job_}) {
      Statement stmt(statement);
      sqlite3_bind_text(stmt.get(), 1, job_id.data(), static_cast<int>(job_id.size()),
                        SQLITE_TRANSIENT);
      if (sqlite3_step(stmt.get()) != SQLITE_DONE) {
        absl::Status failed =
            absl::InternalError(absl::StrCat("delete job ", job_id, ": ", Error()));
        Exec("ROLLBACK;").IgnoreError();
        return failed;
      }
    }
    return Exec("COMMIT;");
  }

 private:
  absl::Status WriteJobAndEvents(const StoredJob& stored, const std::vector<JobEvent>& events) {
    const compress::v1::Job& job = stored.job;
    std::string blob = job.SerializeAsString();
    {
      Statement stmt(upsert_job_);
      sqlite3_bind_text(stmt.get(), 1, job.id().data(), static_cast<int>(job.id().size()),
                        SQLITE_TRANSIENT);
      sqlite3_bind_text(stmt.get(), 2, job.tenant().data(), static_cast<int>(job.tenant().size()),
                        SQLITE_TRANSIENT);
      sqlite3_bind_int(stmt.get(), 3, job.state());
      sqlite3_bind_int64(stmt.get(), 4,
                         job.create_time().seconds() * 1000000 + job.create_time().nanos() / 1000);
      // Leases live in the job's tasks; the columns stay for older databases.
      sqlite3_bind_text(stmt.get(), 5, "", 0, SQLITE_STATIC);
      sqlite3_bind_int64(stmt.get(), 6, 0);
      sqlite3_bind_blob(stmt.get(), 7, blob.data(), static_cast<int>(blob.size()),
                        SQLITE_TRANSIENT);
      if (sqlite3_step(stmt.get()) != SQLITE_DONE) {
        return absl::InternalError(absl::StrCat("write job ", job.id(), ": ", Error()));
      }
    }
    if (!events.empty()) {
      Statement stmt(last_event_);
      sqlite3_bind_text(stmt.get(), 1, job.id().data(), static_cast<int>(job.id().size()),
                        SQLITE_TRANSIENT);
      if (sqlite3_step(stmt.get()) != SQLITE_ROW) {
        return absl::InternalError(absl::StrCat("read the last event of ", job.id(), ": ", Error()));
      }
      RETURN_IF_ERROR(CheckEventsContinue(job.id(), sqlite3_column_int64(stmt.get(), 0), events));
    }
    for (const JobEvent& event : events) {
      std::string event_blob = event.SerializeAsString();
      Statement stmt(insert_event_);
      sqlite3_bind_text(stmt.get(), 1, event.job_id().data(),
                        static_cast<int>(event.job_id().size()), SQLITE_TRANSIENT);
      sqlite3_bind_int64(stmt.get(), 2, event.sequence());
      sqlite3_bind_blob(stmt.get(), 3, event_blob.data(), static_cast<int>(event_blob.size()),
                        SQLITE_TRANSIENT);
      if (sqlite3_step(stmt.get()) != SQLITE_DONE) {
        return absl::InternalError(absl::StrCat("append event ", event.sequence(), " of ",
                                                event.job_id(), ": ", Error()));
      }
    }
    return absl::OkStatus();
  }

  absl::Status Exec(const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
      std::string msg = err ? err : "unknown error";
      sqlite3_free(err);
      return absl::InternalError(absl::StrCat("job store: ", msg));
    }
    return absl::OkStatus();
  }

  absl::Status Prepare(const char* sql, sqlite3_stmt** stmt) {
    if (sqlite3_prepare_v2(db_, sql, -1, stmt, nullptr) != SQLITE_OK) {
      return absl::InternalError(absl::StrCat("job store: prepare: ", Error()));
    }
    return absl::OkStatus();
  }

  std::string Error() const { return db_ ? sqlite3_errmsg(db_) : "no database"; }

  std::mutex mu_;
  sqlite3* db_ = nullptr;
  sqlite3_stmt* upsert_job_ = nullptr;
  sqlite3_stmt* insert_event_ = nullptr;
  sqlite3_stmt* read_events_ = nullptr;
  sqlite3_stmt* load_jobs_ = nullptr;
  sqlite3_stmt* last_event_ = nullptr;
  sqlite3_stmt* delete_events_ = nullptr;
  sqlite3_stmt* delete_job_ = nullptr;
};

}  // namespace

absl::StatusOr<std::unique_ptr<JobStore>> OpenSqliteJobStore(const std::string& path) {
  auto store = std::make_unique<SqliteJobStore>();
  RETURN_IF_ERROR(store->Open(path));
  return std::unique_ptr<JobStore>(std::move(store));
}

}  // namespace compress::server
