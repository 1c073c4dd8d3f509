// The job store in PostgreSQL through libpq: the same two tables as the
// SQLite store (the serialized Job as BYTEA beside a few columns an operator
// can query; each event as BYTEA keyed by job and sequence), one
// transaction per Commit, the sequence checked inside it.
#include <libpq-fe.h>

#include <chrono>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "server/job_store.h"

namespace compress::server {
namespace {

using compress::v1::Job;
using compress::v1::JobEvent;

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS compress_jobs (
  id TEXT PRIMARY KEY,
  tenant TEXT NOT NULL,
  state INTEGER NOT NULL,
  create_micros BIGINT NOT NULL,
  job BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS compress_events (
  job_id TEXT NOT NULL,
  seq BIGINT NOT NULL,
  event BYTEA NOT NULL,
  PRIMARY KEY (job_id, seq)
);
)sql";

// First key of the advisory lock a server holds on its schema ('comp'); the
// second is a hash of the schema's name.
constexpr const char* kLockClass = "1668246896";

// Rows per INSERT of events (3 parameters each; PostgreSQL allows 65535).
constexpr size_t kEventsPerInsert = 1000;

struct ResultDeleter {
  void operator()(PGresult* result) const { PQclear(result); }
};
using Result = std::unique_ptr<PGresult, ResultDeleter>;

// A statement parameter: text, binary (BYTEA), or NULL.
struct Param {
  std::string value;
  bool binary = false;
  bool null = false;
};
Param Text(std::string value) { return {std::move(value), false, false}; }
Param Bytes(std::string value) { return {std::move(value), true, false}; }
Param Null() { return {"", false, true}; }

// libpq's message on one line.
std::string Trimmed(const char* message) {
  std::string line;
  for (char c : absl::StripAsciiWhitespace(message ? message : "")) {
    if (c == '\n') {
      line += line.empty() || line.back() == '.' || line.back() == ':' ? " " : "; ";
    } else if (c != '\t' || (!line.empty() && line.back() != ' ')) {
      line += c == '\t' ? ' ' : c;
    }
  }
  return line;
}

// Warnings from the server go to the log; its notices ("relation already
// exists, skipping") are dropped rather than printed on stderr by libpq.
void OnNotice(void* /*arg*/, const PGresult* result) {
  const char* severity = PQresultErrorField(result, PG_DIAG_SEVERITY_NONLOCALIZED);
  if (severity != nullptr && std::string(severity) == "WARNING") {
    LOG_WARN("job store: PostgreSQL warning", {{"message", Trimmed(PQresultErrorMessage(result))}});
  }
}

// What the caller should do about a failed statement, from its SQLSTATE.
absl::StatusCode CodeFor(const char* sqlstate, bool connection_lost) {
  if (connection_lost) return absl::StatusCode::kUnavailable;
  std::string state = sqlstate ? sqlstate : "";
  if (state.empty()) return absl::StatusCode::kUnavailable;  // no answer from the server
  if (absl::StartsWith(state, "08") || absl::StartsWith(state, "57P")) {
    return absl::StatusCode::kUnavailable;  // connection exception, server shutting down
  }
  if (state == "57014") return absl::StatusCode::kDeadlineExceeded;  // statement_timeout
  if (absl::StartsWith(state, "53")) return absl::StatusCode::kResourceExhausted;  // disk full, ...
  if (absl::StartsWith(state, "40") || state == "23505") {
    return absl::StatusCode::kAborted;  // serialization failure, deadlock, duplicate key
  }
  if (state == "42501" || absl::StartsWith(state, "28")) return absl::StatusCode::kPermissionDenied;
  if (state == "25006" || state == "3F000" || state == "3D000") {
    return absl::StatusCode::kFailedPrecondition;  // a read-only standby, no such schema/database
  }
  return absl::StatusCode::kInternal;
}

class PostgresJobStore : public JobStore {
 public:
  PostgresJobStore(std::vector<std::string> keys, std::vector<std::string> values,
                   std::string description)
      : keys_(std::move(keys)), values_(std::move(values)), description_(std::move(description)) {}

  ~PostgresJobStore() override {
    if (conn_ != nullptr) PQfinish(conn_);
  }

  absl::Status Open(absl::Duration lock_wait) {
    std::lock_guard<std::mutex> lock(mu_);
    RETURN_IF_ERROR(Connect(lock_wait));
    LOG_INFO("job store: PostgreSQL", {{"database", description_}, {"schema", schema_}});
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<StoredJob>> LoadJobs() override {
    std::lock_guard<std::mutex> lock(mu_);
    return WithReconnect<std::vector<StoredJob>>([&]() -> absl::StatusOr<std::vector<StoredJob>> {
      ASSIGN_OR_RETURN(
          Result rows,
          Run("load jobs", "SELECT id, job FROM compress_jobs ORDER BY create_micros, id", {},
              /*binary_result=*/true));
      std::vector<StoredJob> jobs;
      jobs.reserve(PQntuples(rows.get()));
      for (int row = 0; row < PQntuples(rows.get()); ++row) {
        StoredJob stored;
        if (!stored.job.ParseFromArray(PQgetvalue(rows.get(), row, 1),
                                       PQgetlength(rows.get(), row, 1))) {
          return absl::DataLossError(absl::StrCat(
              "job store (", description_, "): the row of job ",
              std::string(PQgetvalue(rows.get(), row, 0), PQgetlength(rows.get(), row, 0)),
              " does not parse"));
        }
        jobs.push_back(std::move(stored));
      }
      return jobs;
    });
  }

  absl::Status Commit(const StoredJob& stored, const std::vector<JobEvent>& events) override {
    std::lock_guard<std::mutex> lock(mu_);
    const std::string blob = stored.job.SerializeAsString();
    for (int attempt = 0;; ++attempt) {
      RETURN_IF_ERROR(EnsureConnected());
      bool commit_sent = false;
      absl::Status status = CommitOnce(stored.job, blob, events, &commit_sent);
      if (status.ok() || !ConnectionLost() || attempt > 0) return status;
      // The connection dropped. The database rolled the transaction back,
      // unless it went after COMMIT was sent: then look whether it landed.
      LOG_WARN(
          "job store: connection lost in a commit, reconnecting",
          {{"database", description_}, {"job", stored.job.id()}, {"error", status.ToString()}});
      if (commit_sent) {
        RETURN_IF_ERROR(EnsureConnected());
        ASSIGN_OR_RETURN(bool landed, Landed(stored.job, blob, events));
        if (landed) return absl::OkStatus();
      }
    }
  }

  absl::StatusOr<std::vector<JobEvent>> ReadEvents(const std::string& job_id, int64_t from_sequence,
                                                   int limit) override {
    std::lock_guard<std::mutex> lock(mu_);
    return WithReconnect<std::vector<JobEvent>>([&]() -> absl::StatusOr<std::vector<JobEvent>> {
      // LIMIT NULL is no limit (as SQLite's negative one).
      ASSIGN_OR_RETURN(Result rows, Run(absl::StrCat("read events of ", job_id),
                                        "SELECT event FROM compress_events WHERE job_id = $1 AND "
                                        "seq >= $2 ORDER BY seq LIMIT $3",
                                        {Text(job_id), Text(absl::StrCat(from_sequence)),
                                         limit < 0 ? Null() : Text(absl::StrCat(limit))},
                                        /*binary_result=*/true));
      std::vector<JobEvent> events;
      events.reserve(PQntuples(rows.get()));
      for (int row = 0; row < PQntuples(rows.get()); ++row) {
        JobEvent event;
        if (!event.ParseFromArray(PQgetvalue(rows.get(), row, 0),
                                  PQgetlength(rows.get(), row, 0))) {
          return absl::DataLossError(absl::StrCat("job store (", description_, "): an event of ",
                                                  job_id, " does not parse"));
        }
        events.push_back(std::move(event));
      }
      return events;
    });
  }

  absl::Status DeleteJob(const std::string& job_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    // One statement, so one transaction; deleting again deletes nothing.
    return WithReconnect<bool>([&]() -> absl::StatusOr<bool> {
             RETURN_IF_ERROR(Run(absl::StrCat("delete job ", job_id),
                                 "WITH events AS (DELETE FROM compress_events WHERE job_id = $1) "
                                 "DELETE FROM compress_jobs WHERE id = $1",
                                 {Text(job_id)}, false)
                                 .status());
             return true;
           })
        .status();
  }

 private:
  // Connects, takes the schema's lock and creates the tables. On failure
  // there is no connection.
  absl::Status Connect(absl::Duration lock_wait) {
    std::vector<const char*> keys, values;
    for (size_t i = 0; i < keys_.size(); ++i) {
      keys.push_back(keys_[i].c_str());
      values.push_back(values_[i].c_str());
    }
    keys.push_back(nullptr);
    values.push_back(nullptr);
    conn_ = PQconnectdbParams(keys.data(), values.data(), /*expand_dbname=*/0);
    if (conn_ == nullptr) return absl::ResourceExhaustedError("job store: libpq: out of memory");
    PQsetNoticeReceiver(conn_, OnNotice, nullptr);
    absl::Status status = PQstatus(conn_) == CONNECTION_OK
                              ? Prepare(lock_wait)
                              : absl::UnavailableError(absl::StrCat(
                                    "job store: cannot connect to PostgreSQL at ", description_,
                                    ": ", Trimmed(PQerrorMessage(conn_))));
    if (!status.ok()) {
      PQfinish(conn_);
      conn_ = nullptr;
    }
    return status;
  }

  absl::Status Prepare(absl::Duration lock_wait) {
    ASSIGN_OR_RETURN(
        Result schema,
        Run("find the schema", "SELECT current_schema(), hashtext(current_schema()) & 2147483647",
            {}, /*binary_result=*/false));
    if (PQgetisnull(schema.get(), 0, 0)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job store (", description_,
          "): no schema to create the tables in: the search_path names no schema that exists"));
    }
    schema_ = PQgetvalue(schema.get(), 0, 0);
    lock_key_ = PQgetvalue(schema.get(), 0, 1);
    RETURN_IF_ERROR(TakeLock(lock_wait));
    Result created(PQexec(conn_, kSchema));
    if (created == nullptr || PQresultStatus(created.get()) != PGRES_COMMAND_OK) {
      return Error(absl::StrCat("create the tables in schema ", schema_), created.get());
    }
    return absl::OkStatus();
  }

  // One server per schema: its scheduler keeps state in memory, so a second
  // one writing the same tables would undo the first's work.
  absl::Status TakeLock(absl::Duration wait) {
    const absl::Time deadline = absl::Now() + wait;
    bool logged = false;
    while (true) {
      ASSIGN_OR_RETURN(Result taken, Run("take the store's lock",
                                         "SELECT pg_try_advisory_lock($1::int4, $2::int4)",
                                         {Text(kLockClass), Text(lock_key_)}, false));
      if (std::string(PQgetvalue(taken.get(), 0, 0)) == "t") return absl::OkStatus();
      if (absl::Now() >= deadline) {
        return absl::FailedPreconditionError(absl::StrCat(
            "job store: another compress-server uses schema ", schema_, " of ", description_,
            LockHolder(), "; one server per schema: stop it, or give this one another schema"));
      }
      if (!logged) {
        LOG_WARN("job store: waiting for another server to release the store",
                 {{"database", description_}, {"schema", schema_}});
        logged = true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }

  // " (pid P, application A, from H since T)" when the database says.
  std::string LockHolder() {
    absl::StatusOr<Result> holder = Run(
        "find the lock's holder",
        "SELECT a.pid, coalesce(a.application_name, ''), coalesce(host(a.client_addr), 'local'), "
        "coalesce(a.backend_start::text, '') FROM pg_locks l JOIN pg_stat_activity a ON a.pid = "
        "l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::oid AND l.objid = $2::oid "
        "AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database WHERE datname = "
        "current_database())",
        {Text(kLockClass), Text(lock_key_)}, false);
    if (!holder.ok() || PQntuples(holder->get()) == 0) return "";
    PGresult* r = holder->get();
    return absl::StrCat(" (backend pid ", PQgetvalue(r, 0, 0), ", application '",
                        PQgetvalue(r, 0, 1), "', from ", PQgetvalue(r, 0, 2), " since ",
                        PQgetvalue(r, 0, 3), ")");
  }

  bool ConnectionLost() const { return conn_ == nullptr || PQstatus(conn_) == CONNECTION_BAD; }

  absl::Status EnsureConnected() {
    if (!ConnectionLost()) return absl::OkStatus();
    if (conn_ != nullptr) {
      PQfinish(conn_);
      conn_ = nullptr;
    }
    // The old session's lock goes with it: a moment is enough.
    absl::Status status = Connect(absl::Seconds(2));
    if (status.ok()) LOG_INFO("job store: reconnected", {{"database", description_}});
    return status;
  }

  // Runs a read; once more on a new connection if the old one dropped.
  template <typename T>
  absl::StatusOr<T> WithReconnect(const std::function<absl::StatusOr<T>()>& op) {
    for (int attempt = 0;; ++attempt) {
      RETURN_IF_ERROR(EnsureConnected());
      absl::StatusOr<T> result = op();
      if (result.ok() || attempt > 0 || !ConnectionLost()) return result;
      LOG_WARN("job store: connection lost, reconnecting",
               {{"database", description_}, {"error", result.status().ToString()}});
    }
  }

  absl::Status CommitOnce(const Job& job, const std::string& blob,
                          const std::vector<JobEvent>& events, bool* commit_sent) {
    RETURN_IF_ERROR(Command("begin a transaction", "BEGIN"));
    absl::Status status = WriteJobAndEvents(job, blob, events);
    if (!status.ok()) {
      if (!ConnectionLost()) Command("roll back", "ROLLBACK").IgnoreError();
      return status;
    }
    *commit_sent = true;
    return Command(absl::StrCat("commit job ", job.id()), "COMMIT");
  }

  absl::Status WriteJobAndEvents(const Job& job, const std::string& blob,
                                 const std::vector<JobEvent>& events) {
    const int64_t create_micros =
        job.create_time().seconds() * 1000000 + job.create_time().nanos() / 1000;
    // The upsert locks the job's row first, so a concurrent writer of the
    // same job waits here and then sees this one's events.
    RETURN_IF_ERROR(Run(absl::StrCat("write job ", job.id()),
                        "INSERT INTO compress_jobs (id, tenant, state, create_micros, job) "
                        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET "
                        "state = EXCLUDED.state, job = EXCLUDED.job",
                        {Text(job.id()), Text(job.tenant()), Text(absl::StrCat(job.state())),
                         Text(absl::StrCat(create_micros)), Bytes(blob)},
                        false)
                        .status());
    if (events.empty()) return absl::OkStatus();
    ASSIGN_OR_RETURN(Result last,
                     Run(absl::StrCat("read the last event of ", job.id()),
                         "SELECT COALESCE(MAX(seq), 0) FROM compress_events WHERE job_id = $1",
                         {Text(job.id())}, false));
    RETURN_IF_ERROR(CheckEventsContinue(
        job.id(), std::strtoll(PQgetvalue(last.get(), 0, 0), nullptr, 10), events));
    for (size_t begin = 0; begin < events.size(); begin += kEventsPerInsert) {
      const size_t end = std::min(events.size(), begin + kEventsPerInsert);
      std::vector<std::string> rows;
      std::vector<Param> params;
      for (size_t i = begin; i < end; ++i) {
        const size_t n = params.size();
        rows.push_back(absl::StrCat("($", n + 1, ", $", n + 2, ", $", n + 3, ")"));
        params.push_back(Text(events[i].job_id()));
        params.push_back(Text(absl::StrCat(events[i].sequence())));
        params.push_back(Bytes(events[i].SerializeAsString()));
      }
      RETURN_IF_ERROR(Run(absl::StrCat("append events ", events[begin].sequence(), "-",
                                       events[end - 1].sequence(), " of ", job.id()),
                          absl::StrCat("INSERT INTO compress_events (job_id, seq, event) VALUES ",
                                       absl::StrJoin(rows, ", ")),
                          params, false)
                          .status());
    }
    return absl::OkStatus();
  }

  // After a connection lost with COMMIT in flight: did the commit land? It
  // did if the row holds this job and the log ends at its last event.
  absl::StatusOr<bool> Landed(const Job& job, const std::string& blob,
                              const std::vector<JobEvent>& events) {
    ASSIGN_OR_RETURN(Result row, Run(absl::StrCat("check the commit of job ", job.id()),
                                     "SELECT job, (SELECT COALESCE(MAX(seq), 0) FROM "
                                     "compress_events WHERE job_id = $1)::text "
                                     "FROM compress_jobs WHERE id = $1",
                                     {Text(job.id())}, /*binary_result=*/true));
    if (PQntuples(row.get()) == 0) return false;
    std::string stored(PQgetvalue(row.get(), 0, 0), PQgetlength(row.get(), 0, 0));
    std::string last(PQgetvalue(row.get(), 0, 1), PQgetlength(row.get(), 0, 1));
    return stored == blob && (events.empty() || last == absl::StrCat(events.back().sequence()));
  }

  absl::Status Command(const std::string& what, const char* sql) {
    return Run(what, sql, {}, false).status();
  }

  absl::StatusOr<Result> Run(const std::string& what, const std::string& sql,
                             const std::vector<Param>& params, bool binary_result) {
    std::vector<const char*> values;
    std::vector<int> lengths, formats;
    for (const Param& p : params) {
      values.push_back(p.null ? nullptr : p.value.data());
      lengths.push_back(static_cast<int>(p.value.size()));
      formats.push_back(p.binary ? 1 : 0);
    }
    Result result(PQexecParams(conn_, sql.c_str(), static_cast<int>(params.size()), nullptr,
                               values.data(), lengths.data(), formats.data(),
                               binary_result ? 1 : 0));
    if (result == nullptr) return Error(what, nullptr);
    ExecStatusType status = PQresultStatus(result.get());
    if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) return Error(what, result.get());
    return result;
  }

  absl::Status Error(const std::string& what, const PGresult* result) const {
    std::string message = Trimmed(result ? PQresultErrorMessage(result) : nullptr);
    if (message.empty()) message = Trimmed(PQerrorMessage(conn_));
    const char* sqlstate = result ? PQresultErrorField(result, PG_DIAG_SQLSTATE) : nullptr;
    return absl::Status(CodeFor(sqlstate, ConnectionLost()),
                        absl::StrCat("job store (", description_, "): ", what, ": ", message));
  }

  const std::vector<std::string> keys_, values_;  // libpq connection options
  const std::string description_;                 // user@host:port/database, no password
  std::mutex mu_;
  PGconn* conn_ = nullptr;
  std::string schema_;
  std::string lock_key_;
};

// Defaults for options the URL leaves out: a name the database's views show,
// a bounded connect, and keepalives so a dead peer is noticed in about a
// minute rather than the kernel's two hours.
const std::vector<std::pair<const char*, const char*>> kDefaultOptions = {
    {"fallback_application_name", "compress-server"},
    {"connect_timeout", "10"},
    {"keepalives_idle", "30"},
    {"keepalives_interval", "10"},
    {"keepalives_count", "3"},
};

}  // namespace

absl::StatusOr<std::unique_ptr<JobStore>> OpenPostgresJobStore(const std::string& url,
                                                               absl::Duration lock_wait) {
  char* parse_error = nullptr;
  PQconninfoOption* options = PQconninfoParse(url.c_str(), &parse_error);
  if (options == nullptr) {
    std::string reason = parse_error ? Trimmed(parse_error) : "out of memory";
    PQfreemem(parse_error);
    return absl::InvalidArgumentError(
        absl::StrCat("job store: not a PostgreSQL URL libpq can read (", reason,
                     "); expected postgresql://USER@HOST:PORT/DATABASE[?PARAMS]"));
  }
  std::vector<std::string> keys, values;
  std::string user, host, port, dbname;
  for (PQconninfoOption* o = options; o->keyword != nullptr; ++o) {
    if (o->val == nullptr) continue;
    keys.push_back(o->keyword);
    values.push_back(o->val);
    std::string key = o->keyword;
    if (key == "user") user = o->val;
    if (key == "host" || (key == "hostaddr" && host.empty())) host = o->val;
    if (key == "port") port = o->val;
    if (key == "dbname") dbname = o->val;
  }
  PQconninfoFree(options);
  for (const auto& [key, value] : kDefaultOptions) {
    bool given = false;
    for (const std::string& k : keys) given = given || k == key;
    if (std::string(key) == "connect_timeout" && std::getenv("PGCONNECT_TIMEOUT") != nullptr)
      given = true;
    if (!given) {
      keys.push_back(key);
      values.push_back(value);
    }
  }
  // Named as libpq fills the gaps (environment, then its defaults), and
  // never with the password.
  auto or_env = [](const std::string& value, const char* env, const std::string& fallback) {
    const char* from_env = std::getenv(env);
    return !value.empty() ? value : from_env != nullptr ? std::string(from_env) : fallback;
  };
  user = or_env(user, "PGUSER", "");
  std::string description = absl::StrCat(
      "postgresql://", user, user.empty() ? "" : "@", or_env(host, "PGHOST", "localhost"), ":",
      or_env(port, "PGPORT", "5432"), "/", or_env(dbname, "PGDATABASE", user));
  auto store = std::make_unique<PostgresJobStore>(std::move(keys), std::move(values), description);
  RETURN_IF_ERROR(store->Open(lock_wait));
  return std::unique_ptr<JobStore>(std::move(store));
}

}  // namespace compress::server
