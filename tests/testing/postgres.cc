#include "tests/testing/postgres.h"

#include <fcntl.h>
#include <grp.h>
#include <libpq-fe.h>
#include <pwd.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "tests/testing/subprocess.h"

namespace compress::testing {
namespace {

namespace fs = std::filesystem;

constexpr const char* kUrlEnv = "COMPRESS_TEST_POSTGRES_URL";

std::string EnvUrl() {
  const char* url = std::getenv(kUrlEnv);
  return url ? url : "";
}

// The newest /usr/lib/postgresql/VERSION/bin holding initdb ("" if none).
std::string FindBinDir() {
  std::string best;
  int best_version = -1;
  std::error_code ec;
  for (const fs::directory_entry& entry : fs::directory_iterator("/usr/lib/postgresql", ec)) {
    int version = 0;
    if (!absl::SimpleAtoi(entry.path().filename().string(), &version)) continue;
    if (version > best_version && fs::exists(entry.path() / "bin" / "initdb") &&
        fs::exists(entry.path() / "bin" / "postgres")) {
      best_version = version;
      best = (entry.path() / "bin").string();
    }
  }
  return best;
}

// The account the cluster runs as: PostgreSQL refuses to run as root.
struct Account {
  bool switch_user = false;
  uid_t uid = 0;
  gid_t gid = 0;
};

absl::StatusOr<Account> ClusterAccount() {
  Account account;
  if (geteuid() != 0) return account;
  struct passwd* pw = getpwnam("postgres");
  if (pw == nullptr) {
    return absl::FailedPreconditionError(
        "running as root, PostgreSQL needs another account and there is no 'postgres' user");
  }
  account.switch_user = true;
  account.uid = pw->pw_uid;
  account.gid = pw->pw_gid;
  return account;
}

// Whether every folder above `path` lets other users through (the
// cluster's account must reach its folder).
bool OthersCanReach(const fs::path& path) {
  for (fs::path p = path; !p.empty() && p != p.root_path(); p = p.parent_path()) {
    struct stat st;
    if (stat(p.c_str(), &st) != 0 || (st.st_mode & S_IXOTH) == 0) return false;
  }
  return true;
}

// Starts `argv` as `account` with output appended to `log`; the child gets
// `death_signal` if this thread ends first (a killed test leaves no server).
absl::StatusOr<pid_t> Spawn(std::vector<std::string> argv, const std::string& log,
                            const std::string& cwd, const Account& account, int death_signal) {
  std::vector<char*> args;
  for (std::string& a : argv) args.push_back(a.data());
  args.push_back(nullptr);
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", strerror(errno)));
  if (pid == 0) {
    // Only async-signal-safe calls from here on.
    if (account.switch_user) {
      if (setgroups(0, nullptr) != 0 || setgid(account.gid) != 0 || setuid(account.uid) != 0)
        _exit(126);
    }
    prctl(PR_SET_PDEATHSIG, death_signal);  // after setuid, which clears it
    if (getppid() != parent) _exit(125);
    int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    int null_fd = open("/dev/null", O_RDONLY);
    if (null_fd >= 0) dup2(null_fd, 0);
    if (chdir(cwd.c_str()) != 0) _exit(124);
    execv(args[0], args.data());
    _exit(127);
  }
  return pid;
}

// Waits up to `timeout` for `pid`; true when it exited (status in *status).
bool WaitFor(pid_t pid, std::chrono::milliseconds timeout, int* status) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    int raw = 0;
    pid_t r = waitpid(pid, &raw, WNOHANG);
    if (r == pid || r < 0) {
      *status = r < 0 ? -1 : WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
      return true;
    }
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

std::string ReadLog(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Removes the folders of clusters whose test process died without cleaning up.
void RemoveStaleClusters(const fs::path& parent) {
  std::error_code ec;
  for (const fs::directory_entry& entry : fs::directory_iterator(parent, ec)) {
    std::string name = entry.path().filename().string();
    if (!absl::StartsWith(name, "postgres-")) continue;
    int pid = 0;
    std::string pid_text = name.substr(9, name.find('-', 9) - 9);
    if (absl::SimpleAtoi(pid_text, &pid) && pid != getpid() && kill(pid, 0) != 0 &&
        errno == ESRCH) {
      fs::remove_all(entry.path(), ec);
    }
  }
}

// One statement on a short-lived connection.
absl::StatusOr<std::string> QueryOne(const std::string& url, const std::string& sql,
                                     const std::vector<std::string>& params = {}) {
  PGconn* conn = PQconnectdb(url.c_str());
  PQsetNoticeProcessor(
      conn, [](void*, const char*) {}, nullptr);  // "drop cascades to ..."
  if (PQstatus(conn) != CONNECTION_OK) {
    std::string error = PQerrorMessage(conn);
    PQfinish(conn);
    return absl::UnavailableError(absl::StrCat("connect to the test PostgreSQL: ", error));
  }
  std::vector<const char*> values;
  for (const std::string& p : params) values.push_back(p.c_str());
  PGresult* result = PQexecParams(conn, sql.c_str(), static_cast<int>(values.size()), nullptr,
                                  values.data(), nullptr, nullptr, 0);
  absl::StatusOr<std::string> value;
  ExecStatusType status = PQresultStatus(result);
  if (status == PGRES_TUPLES_OK) {
    value = PQntuples(result) > 0 ? PQgetvalue(result, 0, 0) : "";
  } else if (status == PGRES_COMMAND_OK) {
    value = "";
  } else {
    value = absl::InternalError(absl::StrCat(sql, ": ", PQresultErrorMessage(result)));
  }
  PQclear(result);
  PQfinish(conn);
  return value;
}

// `url` with libpq parameters added, as a URI query or as key=value pairs.
std::string WithParams(const std::string& url,
                       const std::vector<std::pair<std::string, std::string>>& params) {
  const bool uri = absl::StartsWith(url, "postgres://") || absl::StartsWith(url, "postgresql://");
  std::string out = url;
  for (const auto& [key, value] : params) {
    if (uri) {
      std::string escaped;
      for (char c : value) {
        if (isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.') {
          escaped += c;
        } else {
          escaped += absl::StrCat("%", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
        }
      }
      out += absl::StrCat(out.find('?') == std::string::npos ? "?" : "&", key, "=", escaped);
    } else {
      out += absl::StrCat(" ", key, "='", value, "'");
    }
  }
  return out;
}

// An initdb'd data folder that every cluster of this build folder copies:
// made once (under a file lock, renamed into place when complete) in
// `parent`/postgres-template-VERSION/data.
absl::StatusOr<std::string> InitdbOnce(const std::string& bin, const fs::path& parent,
                                       const Account& account, const std::string& log) {
  const fs::path dir =
      parent / ("postgres-template-" + fs::path(bin).parent_path().filename().string());
  const fs::path data = dir / "data";
  int lock = open((parent / "postgres-template.lock").c_str(), O_RDWR | O_CREAT, 0644);
  if (lock < 0)
    return absl::InternalError(absl::StrCat("open the template lock: ", strerror(errno)));
  flock(lock, LOCK_EX);
  std::error_code ec;
  absl::Status status;
  if (!fs::exists(data / "PG_VERSION", ec)) {
    const fs::path partial = parent / absl::StrCat("postgres-template-partial-", getpid());
    fs::remove_all(partial, ec);
    fs::create_directories(partial, ec);
    if (account.switch_user && chown(partial.c_str(), account.uid, account.gid) != 0) {
      status = absl::InternalError(absl::StrCat("chown ", partial.string(), ": ", strerror(errno)));
    }
    absl::StatusOr<pid_t> initdb =
        status.ok()
            ? Spawn({bin + "/initdb", "-D", (partial / "data").string(), "-A", "trust", "-U",
                     "postgres", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"},
                    log, partial.string(), account, SIGKILL)
            : absl::StatusOr<pid_t>(status);
    int exit_status = -1;
    if (!initdb.ok()) {
      status = initdb.status();
    } else if (!WaitFor(*initdb, std::chrono::seconds(120), &exit_status) || exit_status != 0) {
      kill(*initdb, SIGKILL);
      status =
          absl::InternalError(absl::StrCat("initdb failed (", exit_status, "):\n", ReadLog(log)));
    } else {
      fs::remove_all(dir, ec);
      fs::rename(partial, dir, ec);
      if (ec)
        status = absl::InternalError(absl::StrCat("rename ", partial.string(), ": ", ec.message()));
    }
    fs::remove_all(partial, ec);
  }
  flock(lock, LOCK_UN);
  close(lock);
  if (!status.ok()) return status;
  return data.string();
}

std::mutex g_mu;
std::unique_ptr<PostgresCluster>* g_cluster = nullptr;  // never freed before exit

}  // namespace

std::string PostgresSkipReason() {
  if (!EnvUrl().empty() || !FindBinDir().empty()) return "";
  return absl::StrCat(
      "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; "
      "bash scripts/setup.sh installs it) and ",
      kUrlEnv, " is not set");
}

absl::StatusOr<std::unique_ptr<PostgresCluster>> PostgresCluster::Start() {
  std::unique_ptr<PostgresCluster> cluster(new PostgresCluster());
  cluster->bin_ = FindBinDir();
  if (cluster->bin_.empty()) return absl::FailedPreconditionError(PostgresSkipReason());
  absl::StatusOr<Account> account = ClusterAccount();
  if (!account.ok()) return account.status();
  static std::atomic<int> counter{0};
  fs::path parent = fs::current_path() / "test-tmp";
  std::error_code ec;
  fs::create_directories(parent, ec);
  // The cluster's account must reach its folder: under the build folder if
  // it can, else under /tmp.
  if (account->switch_user && !OthersCanReach(parent)) parent = fs::temp_directory_path();
  RemoveStaleClusters(parent);
  fs::path base = parent / absl::StrCat("postgres-", getpid(), "-", counter++);
  fs::remove_all(base, ec);
  fs::create_directories(base);
  cluster->base_ = base.string();
  if (account->switch_user && chown(base.c_str(), account->uid, account->gid) != 0) {
    return absl::InternalError(absl::StrCat("chown ", base.string(), ": ", strerror(errno)));
  }
  const std::string log = (base / "postgres.log").string();
  absl::StatusOr<std::string> template_dir = InitdbOnce(cluster->bin_, parent, *account, log);
  if (!template_dir.ok()) return template_dir.status();
  // A copy of the build folder's one initdb (0.1 s against initdb's 1 s).
  absl::StatusOr<pid_t> copy = Spawn({"/bin/cp", "-a", *template_dir, (base / "data").string()},
                                     log, base.string(), *account, SIGKILL);
  if (!copy.ok()) return copy.status();
  int status = -1;
  if (!WaitFor(*copy, std::chrono::seconds(60), &status) || status != 0) {
    kill(*copy, SIGKILL);
    return absl::InternalError(
        absl::StrCat("copying ", *template_dir, " failed (", status, "):\n", ReadLog(log)));
  }
  // A port picked a moment ago may be taken by the time postgres binds it.
  absl::Status launched;
  for (int attempt = 0; attempt < 3; ++attempt) {
    cluster->port_ = PickFreePort();
    launched = cluster->Launch();
    if (launched.ok()) return cluster;
  }
  return launched;
}

absl::Status PostgresCluster::Launch() {
  absl::StatusOr<Account> account = ClusterAccount();
  if (!account.ok()) return account.status();
  const std::string log = base_ + "/postgres.log";
  absl::StatusOr<pid_t> pid =
      Spawn({bin_ + "/postgres", "-D", base_ + "/data", "-p", std::to_string(port_), "-c",
             "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c",
             "shared_buffers=16MB", "-c", "max_connections=50"},
            log, base_, *account, SIGQUIT);
  if (!pid.ok()) return pid.status();
  pid_ = *pid;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    if (PQping(url().c_str()) == PQPING_OK) {
      // The server answering must be this one, not another test's that took
      // the port first.
      absl::StatusOr<std::string> data = QueryOne(url(), "SHOW data_directory");
      if (data.ok() && fs::path(*data) == fs::path(base_) / "data") return absl::OkStatus();
      Stop().IgnoreError();
      return absl::UnavailableError(absl::StrCat("port ", port_, " is another server's"));
    }
    int status = 0;
    if (WaitFor(pid_, std::chrono::milliseconds(50), &status)) {
      pid_ = -1;
      return absl::UnavailableError(absl::StrCat("postgres exited (", status, "):\n", Log()));
    }
  }
  Stop().IgnoreError();
  return absl::DeadlineExceededError(absl::StrCat("postgres did not answer in 30 s:\n", Log()));
}

PostgresCluster::~PostgresCluster() {
  Stop().IgnoreError();
  std::error_code ec;
  if (!base_.empty()) fs::remove_all(base_, ec);
}

std::string PostgresCluster::url() const {
  return absl::StrCat("postgresql://postgres@127.0.0.1:", port_, "/postgres");
}

std::string PostgresCluster::Log() const { return ReadLog(base_ + "/postgres.log"); }

absl::Status PostgresCluster::Stop() {
  if (pid_ <= 0) return absl::OkStatus();
  kill(pid_, SIGINT);  // fast shutdown
  int status = 0;
  if (!WaitFor(pid_, std::chrono::seconds(20), &status)) {
    kill(pid_, SIGQUIT);  // immediate
    if (!WaitFor(pid_, std::chrono::seconds(10), &status)) {
      kill(pid_, SIGKILL);
      WaitFor(pid_, std::chrono::seconds(10), &status);
    }
  }
  pid_ = -1;
  return absl::OkStatus();
}

absl::Status PostgresCluster::Restart() {
  if (absl::Status stopped = Stop(); !stopped.ok()) return stopped;
  return Launch();
}

absl::StatusOr<std::string> TestPostgresUrl() {
  if (std::string url = EnvUrl(); !url.empty()) return url;
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_cluster == nullptr) {
    absl::StatusOr<std::unique_ptr<PostgresCluster>> cluster = PostgresCluster::Start();
    if (!cluster.ok()) return cluster.status();
    // Stopped by a static's destructor at exit (and by its death signal if
    // the test process is killed).
    static std::unique_ptr<PostgresCluster> shared;
    shared = std::move(*cluster);
    g_cluster = &shared;
  }
  return (*g_cluster)->url();
}

PostgresCluster* TestPostgresCluster() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_cluster == nullptr || !EnvUrl().empty() ? nullptr : g_cluster->get();
}

absl::StatusOr<std::unique_ptr<PostgresSchema>> PostgresSchema::Create() {
  absl::StatusOr<std::string> base = TestPostgresUrl();
  if (!base.ok()) return base.status();
  static std::atomic<int> counter{0};
  std::unique_ptr<PostgresSchema> schema(new PostgresSchema());
  schema->base_url_ = *base;
  schema->name_ = absl::StrCat("compress_test_", getpid(), "_", counter++);
  absl::StatusOr<std::string> created =
      QueryOne(*base, absl::StrCat("CREATE SCHEMA ", schema->name_));
  if (!created.ok()) return created.status();
  schema->url_ = WithParams(
      *base, {{"options", "-csearch_path=" + schema->name_}, {"application_name", schema->name_}});
  return schema;
}

PostgresSchema::~PostgresSchema() {
  if (!name_.empty())
    QueryOne(base_url_, absl::StrCat("DROP SCHEMA IF EXISTS ", name_, " CASCADE")).IgnoreError();
}

absl::Status PostgresSchema::TerminateSessions() {
  absl::StatusOr<std::string> ended = QueryOne(
      base_url_,
      "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
      {name_});
  if (!ended.ok()) return ended.status();
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    absl::StatusOr<std::string> left = QueryOne(
        base_url_, "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", {name_});
    if (!left.ok()) return left.status();
    if (*left == "0") return absl::OkStatus();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat("sessions of ", name_, " did not end"));
}

TestStore::TestStore() {
  const char* store = std::getenv("COMPRESS_TEST_STORE");
  std::string name = store ? store : "";
  if (name == "postgres" || name == "postgresql") {
    postgres_ = true;
  } else if (!name.empty() && name != "sqlite") {
    unknown_ = name;
  }
}

std::string TestStore::SkipReason() const { return postgres_ ? PostgresSkipReason() : ""; }

absl::Status TestStore::AddServerFlags(std::vector<std::string>* argv) {
  if (!unknown_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("COMPRESS_TEST_STORE=", unknown_,
                                                   ": expected sqlite (the default) or postgres"));
  }
  if (!postgres_) return absl::OkStatus();
  if (schema_ == nullptr) {
    absl::StatusOr<std::unique_ptr<PostgresSchema>> schema = PostgresSchema::Create();
    if (!schema.ok()) return schema.status();
    schema_ = std::move(*schema);
  }
  argv->push_back("--store");
  argv->push_back(schema_->url());
  return absl::OkStatus();
}

}  // namespace compress::testing
