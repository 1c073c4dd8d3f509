// The scheduler under load, with real processes on loopback: one
// compress-server (SQLite store and artifact folder under --dir), --workers
// compress-worker processes (LibTorch each) and a tiny random model. Jobs are
// the smallest the service accepts: one test-only sleep stage (--sleep-ms per
// tensor, default 0) on a one-block model.
//
//   1. burst      --clients threads submit --jobs jobs in all (a request_id
//                 each); submits/s. Meanwhile --watchers WatchJob streams, each
//                 opened on a job as soon as it is submitted, follow it live to
//                 its end and check every event arrives once, in sequence order.
//   2. dispatch   from every job's event log (server timestamps): QUEUED ->
//                 RUNNING. In a burst that is mostly queue wait (jobs / the
//                 workers' throughput), so two figures isolate the scheduler:
//                 a free worker's wait for its next job while jobs are queued,
//                 and QUEUED -> RUNNING of --paced-jobs jobs submitted slower
//                 than the workers finish them (idle workers waiting).
//   3. ListJobs   every page (--page-size) with all jobs stored, --list-walks times.
//   4. restart    SIGTERM with no client connected, SIGTERM with an idle
//                 client connection open, SIGKILL: time until a new server
//                 process answers GetJob and ListJobs exactly as before.
//   5. memory     the server's peak RSS (VmHWM); each worker's RSS and PSS.
// Baseline in the same run: GetJob by the same clients (calls/s, latency).
// Prints a table of the goals (dispatch p99 < 50 ms, restart < 2 s, server
// memory < 200 MB) with PASS/MISS.
//
//   load_bench [--jobs 10000] [--clients 50] [--workers 32] [--watchers 100]
//              [--sleep-ms 0] [--paced-jobs 300] [--paced-rate 0 (auto)]
//              [--page-size 100] [--list-walks 3] [--dir <build>/load-bench] [--keep]
//              [--server-bin PATH] [--worker-bin PATH]
// Quick: build/bench/load_bench --jobs 500 --workers 4
#include <google/protobuf/util/time_util.h>
#include <grpcpp/grpcpp.h>
#include <httplib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/flags.h"
#include "compress/v1/compress.grpc.pb.h"
#include "tests/testing/subprocess.h"

namespace {

namespace fs = std::filesystem;
namespace v1 = compress::v1;
using compress::testing::Subprocess;
using google::protobuf::util::TimeUtil;
using Clock = std::chrono::steady_clock;

constexpr double kDispatchGoalMs = 50;
constexpr double kRestartGoalSeconds = 2;
constexpr double kServerMemoryGoalMiB = 200;

struct Flags {
  int jobs = 10000;
  int clients = 50;
  int workers = 32;
  int watchers = 100;
  int sleep_ms = 0;
  int paced_jobs = 300;
  int paced_rate = 0;  // jobs/s; 0: a quarter of the burst's measured throughput
  int page_size = 100;
  int list_walks = 3;
  std::string dir;     // default: <build>/load-bench
  bool keep = false;   // keep the store and artifacts after the run
  std::string server_bin = COMPRESS_SERVER_BIN;
  std::string worker_bin = COMPRESS_WORKER_BIN;
};

// ------------------------------------------------------------------ helpers

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int64_t WallMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int64_t EventMicros(const v1::JobEvent& event) {
  return TimeUtil::TimestampToMicroseconds(event.time());
}

// A "Name:   123 kB" field of /proc/<pid>/<file>, in KiB (-1: absent).
int64_t ProcKb(pid_t pid, const std::string& file, const std::string& field) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/", file));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::atoll(line.c_str() + field.size() + 1);
  }
  return -1;
}

int64_t MemAvailableKb() {
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("MemAvailable:", 0) == 0) return std::atoll(line.c_str() + 13);
  }
  return -1;
}

// User + system CPU seconds of a process, from /proc/<pid>/stat.
double ProcCpuSeconds(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return 0;
  std::istringstream fields(stat.substr(paren + 2));
  std::string field;
  double ticks = 0;
  for (int i = 3; i <= 15 && fields >> field; ++i) {
    if (i == 14 || i == 15) ticks += std::atof(field.c_str());  // utime, stime
  }
  return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

std::string LoadAverage() {
  std::ifstream in("/proc/loadavg");
  std::string a, b, c;
  in >> a >> b >> c;
  return absl::StrCat(a, " ", b, " ", c);
}

double MiB(int64_t kb) { return static_cast<double>(kb) / 1024.0; }

struct Summary {
  size_t n = 0;
  double p50 = 0, p99 = 0, max = 0, mean = 0;
};

// Nearest-rank percentiles.
Summary Summarize(std::vector<double> values) {
  Summary s;
  s.n = values.size();
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  auto rank = [&](double p) {
    size_t i = static_cast<size_t>(std::ceil(p * static_cast<double>(values.size())));
    return values[std::min(values.size() - 1, i == 0 ? 0 : i - 1)];
  };
  s.p50 = rank(0.50);
  s.p99 = rank(0.99);
  s.max = values.back();
  double sum = 0;
  for (double v : values) sum += v;
  s.mean = sum / static_cast<double>(values.size());
  return s;
}

std::string FormatMs(const Summary& s) {
  return absl::StrFormat("p50 %.2f ms, p99 %.2f ms, max %.2f ms (n=%d)", s.p50, s.p99, s.max,
                         static_cast<int>(s.n));
}

// One connection per channel (no sharing between stubs of the same target),
// and quick reconnects so a restarted server is found at once.
std::shared_ptr<grpc::Channel> NewChannel(int port) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 10);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 1000);  // also the shortest connect timeout
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 100);
  args.SetMaxReceiveMessageSize(64 << 20);
  return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                   grpc::InsecureChannelCredentials(), args);
}

void SetDeadline(grpc::ClientContext* context, std::chrono::milliseconds timeout) {
  context->set_deadline(std::chrono::system_clock::now() + timeout);
}

// ------------------------------------------------------------------ records

// One job as the bench saw it; times are the server's (unix micros).
struct JobRecord {
  std::string id;
  double submit_ms = 0;        // SubmitJob round trip
  double submitted_at = 0;     // seconds since the burst started
  int64_t queued_us = 0;       // first QUEUED event
  int64_t running_us = 0;      // first RUNNING event
  int64_t end_us = 0;          // terminal event
  v1::JobState state = v1::JOB_STATE_UNSPECIFIED;
  std::string worker;
  int attempts = 0;
  int64_t events = 0;          // in the replayed log
  bool log_ok = false;         // replayed log: 1..last_sequence, no gap, ends terminal
  std::string error;
};

struct WatchResult {
  std::string job_id;
  bool passed = false;
  int events = 0;
  int live_events = 0;         // events that happened after the stream opened
  bool saw_running_live = false;
  std::vector<double> lag_ms;  // receive time - event time, live events
  std::string error;
};

bool IsTerminal(v1::JobState state) {
  return state == v1::SUCCEEDED || state == v1::FAILED || state == v1::CANCELLED;
}

// Checks a job's stream: sequences 1, 2, 3 ... with no gap, ending in a
// terminal state change. Fills the record's event times.
std::string CheckEventLog(const std::vector<v1::JobEvent>& events, JobRecord* record) {
  for (size_t i = 0; i < events.size(); ++i) {
    const v1::JobEvent& e = events[i];
    if (e.sequence() != static_cast<int64_t>(i) + 1) {
      return absl::StrCat("event ", i, " has sequence ", e.sequence());
    }
    if (!e.has_state()) continue;
    if (e.state().state() == v1::QUEUED && record->queued_us == 0) record->queued_us = EventMicros(e);
    if (e.state().state() == v1::RUNNING && record->running_us == 0) record->running_us = EventMicros(e);
    if (IsTerminal(e.state().state())) record->end_us = EventMicros(e);
  }
  if (events.empty() || !events.back().has_state() || !IsTerminal(events.back().state().state())) {
    return "the stream does not end with a terminal state";
  }
  return "";
}

// ------------------------------------------------------------------ the bench

class LoadBench {
 public:
  explicit LoadBench(Flags flags) : flags_(std::move(flags)) {}

  int Run() {
    if (!Setup()) return 1;
    Burst();
    if (!Drain(submitted_ + 1, "burst")) return 1;
    const double burst_seconds = SecondsSince(burst_start_);
    const double server_cpu = ProcCpuSeconds(server_->pid()) - server_cpu_before_;
    JoinWatchers();
    CollectLogs(&records_);
    ReportBurst(burst_seconds, server_cpu);
    GetJobBaseline();
    Paced(throughput_);
    ListJobsWalk();
    server_peak_kb_ = std::max(server_peak_kb_, ProcKb(server_->pid(), "status", "VmHWM"));
    Restart(SIGTERM, /*idle_client=*/false, &restart_term_);
    Restart(SIGTERM, /*idle_client=*/true, &restart_term_idle_);
    Restart(SIGKILL, /*idle_client=*/true, &restart_kill_);
    server_peak_kb_ = std::max(server_peak_kb_, ProcKb(server_->pid(), "status", "VmHWM"));
    WorkerMemoryAtEnd();
    PrintGoals();
    Teardown();
    return 0;
  }

 private:
  // ---------------------------------------------------------------- setup

  bool Setup() {
    std::printf("load_bench: %d jobs, %d clients, %d workers, %d watchers, sleep %d ms per tensor\n",
                flags_.jobs, flags_.clients, flags_.workers, flags_.watchers, flags_.sleep_ms);
    std::printf("machine: %u cores, MemAvailable %.0f MiB, load average %s\n",
                std::thread::hardware_concurrency(), MiB(MemAvailableKb()), LoadAverage().c_str());
    dir_ = flags_.dir;
    std::error_code ec;
    fs::remove_all(dir_, ec);
    fs::create_directories(dir_ + "/models");
    std::string output;
    int rc = compress::testing::RunCommand(
        {flags_.worker_bin, "make-random-model", "--out", dir_ + "/models/tiny", "--layers", "1",
         "--hidden", "64", "--intermediate", "128", "--heads", "2", "--kv-heads", "1", "--vocab",
         "128", "--dtype", "bf16"},
        &output);
    if (rc != 0) {
      std::fprintf(stderr, "make-random-model failed:\n%s\n", output.c_str());
      return false;
    }
    int64_t model_bytes = 0;
    for (const auto& entry : fs::recursive_directory_iterator(dir_ + "/models/tiny")) {
      if (entry.is_regular_file()) model_bytes += static_cast<int64_t>(entry.file_size());
    }
    std::printf("model: %s/models/tiny (1 block, hidden 64, %lld bytes)\n", dir_.c_str(),
                static_cast<long long>(model_bytes));

    port_ = compress::testing::PickFreePort();
    if (!StartServer()) return false;
    server_cpu_before_ = ProcCpuSeconds(server_->pid());
    std::printf("server: pid %d, 127.0.0.1:%d, store %s/data\n", static_cast<int>(server_->pid()),
                port_, dir_.c_str());

    // Workers: each a real process that loads LibTorch.
    const int64_t available_before = MemAvailableKb();
    const Clock::time_point start = Clock::now();
    for (int i = 0; i < flags_.workers; ++i) {
      std::string id = absl::StrFormat("load-%02d", i);
      workers_.push_back(std::make_unique<Subprocess>(
          std::vector<std::string>{flags_.worker_bin, "--server", Address(), "--worker-id", id,
                                   "--work-dir", absl::StrCat(dir_, "/work/", id), "--threads", "1"},
          absl::StrCat(dir_, "/", id, ".log")));
    }
    std::vector<bool> registered(workers_.size(), false);
    int ready = 0;
    const Clock::time_point deadline = Clock::now() + std::chrono::seconds(300);
    while (ready < static_cast<int>(workers_.size()) && Clock::now() < deadline) {
      for (size_t i = 0; i < workers_.size(); ++i) {
        if (registered[i] || !workers_[i]->Running()) continue;
        // The log is text or JSON lines (--log-format auto).
        const std::string log = workers_[i]->Log();
        if (log.find("msg=registered") != std::string::npos ||
            log.find("\"msg\":\"registered\"") != std::string::npos) {
          registered[i] = true;
          ++ready;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    const double startup = SecondsSince(start);
    int dead = 0;
    for (size_t i = 0; i < workers_.size(); ++i) {
      if (!workers_[i]->Running()) {
        ++dead;
        std::fprintf(stderr, "worker %zu exited:\n%s\n", i, workers_[i]->Log().c_str());
      }
    }
    std::printf("workers: %d of %d registered in %.1f s (%d exited)\n", ready, flags_.workers,
                startup, dead);
    if (ready == 0) return false;
    std::this_thread::sleep_for(std::chrono::seconds(1));  // let start-up settle before measuring
    std::vector<double> rss, pss;
    for (auto& w : workers_) {
      if (!w->Running()) continue;
      rss.push_back(MiB(ProcKb(w->pid(), "status", "VmRSS")));
      pss.push_back(MiB(ProcKb(w->pid(), "smaps_rollup", "Pss")));
    }
    double rss_sum = 0, pss_sum = 0;
    for (double v : rss) rss_sum += v;
    for (double v : pss) pss_sum += v;
    Summary r = Summarize(rss), p = Summarize(pss);
    std::printf(
        "worker memory, idle: RSS %.1f MiB each (max %.1f), PSS %.1f MiB each (max %.1f); "
        "%d workers: RSS sum %.0f MiB, PSS sum %.0f MiB; MemAvailable fell by %.0f MiB\n",
        r.mean, r.max, p.mean, p.max, static_cast<int>(rss.size()), rss_sum, pss_sum,
        MiB(available_before - MemAvailableKb()));
    workers_ready_ = ready;

    // One job first: the pipeline works end to end before anything is timed.
    auto stub = v1::JobService::NewStub(NewChannel(port_));
    v1::SubmitJobResponse submitted;
    grpc::ClientContext context;
    SetDeadline(&context, std::chrono::seconds(30));
    v1::SubmitJobRequest request = NewRequest("smoke");
    grpc::Status status = stub->SubmitJob(&context, request, &submitted);
    if (!status.ok()) {
      std::fprintf(stderr, "smoke submit failed: %s\n", status.error_message().c_str());
      return false;
    }
    const Clock::time_point smoke_start = Clock::now();
    while (SecondsSince(smoke_start) < 120) {
      grpc::ClientContext get_context;
      SetDeadline(&get_context, std::chrono::seconds(5));
      v1::GetJobRequest get;
      get.set_job_id(submitted.job().id());
      v1::Job job;
      if (stub->GetJob(&get_context, get, &job).ok() && IsTerminal(job.state())) {
        if (job.state() != v1::SUCCEEDED) {
          std::fprintf(stderr, "smoke job ended %s: %s\n", v1::JobState_Name(job.state()).c_str(),
                       job.message().c_str());
          return false;
        }
        std::printf("smoke job: %s in %.2f s, %lld events, %d artifacts\n",
                    v1::JobState_Name(job.state()).c_str(), SecondsSince(smoke_start),
                    static_cast<long long>(job.last_sequence()), job.artifacts_size());
        return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    std::fprintf(stderr, "smoke job did not end in 120 s\n");
    return false;
  }

  std::string Address() const { return absl::StrCat("127.0.0.1:", port_); }

  bool StartServer() {
    ++server_starts_;
    server_ = std::make_unique<Subprocess>(
        std::vector<std::string>{flags_.server_bin, "--listen", Address(), "--metrics-listen",
                                 "127.0.0.1:0", "--data-dir", dir_ + "/data", "--model-root",
                                 dir_ + "/models"},
        absl::StrCat(dir_, "/server-", server_starts_, ".log"));
    metrics_port_ = server_->WaitForNumber("metrics_port", 30000);
    if (metrics_port_ <= 0) {
      std::fprintf(stderr, "server did not start:\n%s\n", server_->Log().c_str());
      return false;
    }
    return true;
  }

  v1::SubmitJobRequest NewRequest(const std::string& request_id) const {
    v1::SubmitJobRequest request;
    request.set_request_id(request_id);
    v1::JobSpec& spec = *request.mutable_spec();
    spec.set_name("load");
    spec.mutable_model()->set_path("tiny");
    spec.add_stages()->mutable_sleep()->set_millis_per_tensor(flags_.sleep_ms);
    return request;
  }

  // ---------------------------------------------------------------- burst

  void Burst() {
    const int n = flags_.jobs;
    records_.assign(n, JobRecord());
    // Watch targets: spread over the submission order.
    const int watchers = std::min(flags_.watchers, n);
    std::unordered_map<int, int> watch_of;  // job index -> watcher
    std::vector<std::promise<std::string>> ids(watchers);
    watch_results_.assign(watchers, WatchResult());
    for (int w = 0; w < watchers; ++w) {
      int index = static_cast<int>((static_cast<int64_t>(w) * n) / watchers + n / watchers / 2);
      watch_of[std::min(index, n - 1)] = w;
    }
    for (int w = 0; w < watchers; ++w) {
      watcher_threads_.emplace_back(
          [this, w, id = ids[w].get_future().share()] { Watch(id.get(), &watch_results_[w]); });
    }

    std::vector<double> client_rates(flags_.clients, 0);
    std::atomic<int> failures{0};
    std::string first_error;
    std::mutex error_mu;
    std::vector<std::thread> clients;
    burst_start_ = Clock::now() + std::chrono::milliseconds(200);  // all clients connected by then
    for (int c = 0; c < flags_.clients; ++c) {
      clients.emplace_back([&, c] {
        auto stub = v1::JobService::NewStub(NewChannel(port_));
        std::this_thread::sleep_until(burst_start_);
        const Clock::time_point start = Clock::now();
        int submitted = 0;
        for (int g = c; g < n; g += flags_.clients) {
          JobRecord& record = records_[g];
          v1::SubmitJobRequest request = NewRequest(absl::StrCat("load-", c, "-", g));
          v1::SubmitJobResponse response;
          grpc::Status status;
          const Clock::time_point t0 = Clock::now();
          for (int attempt = 0; attempt < 3; ++attempt) {
            grpc::ClientContext context;
            SetDeadline(&context, std::chrono::seconds(60));
            status = stub->SubmitJob(&context, request, &response);
            if (status.error_code() != grpc::StatusCode::UNAVAILABLE) break;
          }
          record.submit_ms = SecondsSince(t0) * 1000;
          record.submitted_at = SecondsSince(burst_start_);
          if (!status.ok()) {
            ++failures;
            std::lock_guard<std::mutex> lock(error_mu);
            if (first_error.empty()) first_error = status.error_message();
            record.error = status.error_message();
            continue;
          }
          record.id = response.job().id();
          ++submitted;
          auto watch = watch_of.find(g);
          if (watch != watch_of.end()) ids[watch->second].set_value(record.id);
        }
        client_rates[c] = submitted / SecondsSince(start);
      });
    }
    for (std::thread& t : clients) t.join();
    // Watchers whose job failed to submit get an empty id and report it.
    for (auto& [index, w] : watch_of) {
      if (records_[index].id.empty()) ids[w].set_value("");
    }
    const double seconds = SecondsSince(burst_start_);
    std::vector<double> latencies, times;
    for (const JobRecord& r : records_) {
      if (r.id.empty()) continue;
      latencies.push_back(r.submit_ms);
      times.push_back(r.submitted_at);
    }
    std::sort(times.begin(), times.end());
    Summary rate = Summarize(client_rates);
    submitted_ = static_cast<int64_t>(times.size());
    submit_rate_ = static_cast<double>(times.size()) / seconds;
    std::printf("\n[burst] %d submits by %d clients in %.2f s: %.0f submits/s aggregate, "
                "%.1f/s per client (median; min %.1f, max %.1f); %d failed%s%s\n",
                static_cast<int>(times.size()), flags_.clients, seconds, submit_rate_, rate.p50,
                *std::min_element(client_rates.begin(), client_rates.end()), rate.max,
                failures.load(), first_error.empty() ? "" : ": ", first_error.c_str());
    std::printf("[burst] SubmitJob latency: %s\n", FormatMs(Summarize(latencies)).c_str());
    // Rate by tenth of the burst: does it fall as the store grows?
    if (times.size() >= 20) {
      std::string tenths;
      for (int k = 0; k < 10; ++k) {
        size_t a = times.size() * k / 10, b = times.size() * (k + 1) / 10 - 1;
        double span = times[b] - (a == 0 ? 0.0 : times[a - 1]);
        absl::StrAppend(&tenths, k ? " " : "", absl::StrFormat("%.0f", (b - a + 1) / span));
      }
      std::printf("[burst] submits/s by tenth of the burst: %s\n", tenths.c_str());
    }
  }

  // Follows one job's stream from its start to its end.
  void Watch(const std::string& job_id, WatchResult* result) {
    result->job_id = job_id;
    if (job_id.empty()) {
      result->error = "its job was not submitted";
      return;
    }
    auto stub = v1::JobService::NewStub(NewChannel(port_));
    grpc::ClientContext context;
    SetDeadline(&context, std::chrono::minutes(60));
    v1::WatchJobRequest request;
    request.set_job_id(job_id);
    const int64_t opened_us = WallMicros();
    auto reader = stub->WatchJob(&context, request);
    v1::JobEvent event;
    int64_t expected = 1;
    bool terminal = false;
    while (reader->Read(&event)) {
      const int64_t received_us = WallMicros();
      ++result->events;
      if (event.sequence() != expected && result->error.empty()) {
        result->error = absl::StrCat("expected sequence ", expected, ", got ", event.sequence());
      }
      expected = event.sequence() + 1;
      if (terminal && result->error.empty()) result->error = "an event after the terminal state";
      if (event.has_state() && IsTerminal(event.state().state())) terminal = true;
      if (EventMicros(event) >= opened_us) {
        ++result->live_events;
        result->lag_ms.push_back(static_cast<double>(received_us - EventMicros(event)) / 1000.0);
        if (event.has_state() && event.state().state() == v1::RUNNING) result->saw_running_live = true;
      }
    }
    grpc::Status status = reader->Finish();
    if (!status.ok() && result->error.empty()) {
      result->error = absl::StrCat("stream ended ", status.error_code(), ": ", status.error_message());
    }
    if (!terminal && result->error.empty()) result->error = "no terminal state";
    result->passed = result->error.empty();
  }

  void JoinWatchers() {
    for (std::thread& t : watcher_threads_) t.join();
    watcher_threads_.clear();
  }

  // Waits until every job is terminal (the server's own gauges, /metrics).
  bool Drain(int64_t total, const char* phase) {
    const Clock::time_point start = Clock::now();
    Clock::time_point last_print = start;
    while (SecondsSince(start) < 3600) {
      std::map<std::string, double> jobs = ScrapeJobGauges();
      const double ended = jobs["SUCCEEDED"] + jobs["FAILED"] + jobs["CANCELLED"];
      // The store also holds the jobs of earlier phases.
      if (jobs["QUEUED"] == 0 && jobs["RUNNING"] == 0 && ended >= static_cast<double>(total)) {
        return true;
      }
      if (std::chrono::duration<double>(Clock::now() - last_print).count() >= 10) {
        last_print = Clock::now();
        server_peak_kb_ = std::max(server_peak_kb_, ProcKb(server_->pid(), "status", "VmHWM"));
        std::printf("  [%s] +%.0f s: queued %.0f, running %.0f, ended %.0f; server RSS %.0f MiB\n",
                    phase, SecondsSince(start), jobs["QUEUED"], jobs["RUNNING"], ended,
                    MiB(ProcKb(server_->pid(), "status", "VmRSS")));
        std::fflush(stdout);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    std::fprintf(stderr, "[%s] jobs did not drain in an hour\n", phase);
    return false;
  }

  std::map<std::string, double> ScrapeJobGauges() {
    std::map<std::string, double> jobs;
    httplib::Client client("127.0.0.1", metrics_port_);
    client.set_read_timeout(5, 0);
    auto response = client.Get("/metrics");
    if (!response || response->status != 200) return jobs;
    std::istringstream lines(response->body);
    std::string line;
    const std::string prefix = "compress_jobs{state=\"";
    while (std::getline(lines, line)) {
      if (line.rfind(prefix, 0) != 0) continue;
      size_t quote = line.find('"', prefix.size());
      size_t space = line.rfind(' ');
      if (quote == std::string::npos || space == std::string::npos) continue;
      jobs[line.substr(prefix.size(), quote - prefix.size())] = std::atof(line.c_str() + space + 1);
    }
    return jobs;
  }

  // Replays every job's event log (checks it) and reads the job.
  void CollectLogs(std::vector<JobRecord>* records) {
    std::atomic<size_t> next{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
      threads.emplace_back([&] {
        auto stub = v1::JobService::NewStub(NewChannel(port_));
        for (size_t i = next++; i < records->size(); i = next++) {
          JobRecord& record = (*records)[i];
          if (record.id.empty()) continue;
          grpc::ClientContext context;
          SetDeadline(&context, std::chrono::seconds(60));
          v1::WatchJobRequest request;
          request.set_job_id(record.id);
          auto reader = stub->WatchJob(&context, request);
          std::vector<v1::JobEvent> events;
          v1::JobEvent event;
          while (reader->Read(&event)) events.push_back(event);
          grpc::Status status = reader->Finish();
          record.error = status.ok() ? CheckEventLog(events, &record) : status.error_message();
          record.events = static_cast<int64_t>(events.size());
          grpc::ClientContext get_context;
          SetDeadline(&get_context, std::chrono::seconds(30));
          v1::GetJobRequest get;
          get.set_job_id(record.id);
          v1::Job job;
          if (stub->GetJob(&get_context, get, &job).ok()) {
            record.state = job.state();
            record.worker = job.worker_id();
            record.attempts = job.attempts();
            if (record.error.empty() && job.last_sequence() != static_cast<int64_t>(events.size())) {
              record.error = absl::StrCat("log has ", events.size(), " events, job says ",
                                          job.last_sequence());
            }
          }
          record.log_ok = record.error.empty();
        }
      });
    }
    for (std::thread& t : threads) t.join();
  }

  void ReportBurst(double seconds, double server_cpu) {
    int succeeded = 0, logs_ok = 0, retried = 0;
    std::string first_error;
    std::vector<double> queue_wait, service;
    std::map<std::string, std::vector<const JobRecord*>> by_worker;
    for (const JobRecord& r : records_) {
      if (r.id.empty()) continue;
      succeeded += r.state == v1::SUCCEEDED;
      logs_ok += r.log_ok;
      retried += r.attempts > 1;
      if (!r.log_ok && first_error.empty()) first_error = absl::StrCat(r.id, ": ", r.error);
      if (r.running_us > 0) queue_wait.push_back((r.running_us - r.queued_us) / 1000.0);
      if (r.end_us > 0 && r.running_us > 0) service.push_back((r.end_us - r.running_us) / 1000.0);
      by_worker[r.worker].push_back(&r);
    }
    // A free worker's wait for its next job while jobs were queued: from the
    // end of its job to the start of its next, when that next job was
    // already queued. This is the scheduler's dispatch under backlog.
    // Also by the queue's length at that moment (jobs queued and not yet
    // running): a dispatch that costs more the longer the queue shows here.
    std::vector<int64_t> queued_at, running_at;
    for (const JobRecord& r : records_) {
      if (r.running_us == 0) continue;
      queued_at.push_back(r.queued_us);
      running_at.push_back(r.running_us);
    }
    std::sort(queued_at.begin(), queued_at.end());
    std::sort(running_at.begin(), running_at.end());
    auto queue_length = [&](int64_t t) {
      return (std::upper_bound(queued_at.begin(), queued_at.end(), t) - queued_at.begin()) -
             (std::upper_bound(running_at.begin(), running_at.end(), t) - running_at.begin());
    };
    const int64_t bands[] = {0, 100, 1000, 3000, 6000, INT64_MAX};
    std::vector<std::vector<double>> gaps_by_band(std::size(bands) - 1);
    std::vector<double> gaps;
    for (auto& [worker, jobs] : by_worker) {
      std::sort(jobs.begin(), jobs.end(),
                [](const JobRecord* a, const JobRecord* b) { return a->running_us < b->running_us; });
      for (size_t i = 1; i < jobs.size(); ++i) {
        if (jobs[i]->queued_us < jobs[i - 1]->end_us && jobs[i]->running_us >= jobs[i - 1]->end_us) {
          const double gap = (jobs[i]->running_us - jobs[i - 1]->end_us) / 1000.0;
          gaps.push_back(gap);
          const int64_t length = queue_length(jobs[i - 1]->end_us);
          for (size_t b = 0; b + 1 < std::size(bands); ++b) {
            if (length >= bands[b] && length < bands[b + 1]) gaps_by_band[b].push_back(gap);
          }
        }
      }
    }
    const int total = static_cast<int>(queue_wait.size());
    throughput_ = total / seconds;
    std::printf("[burst] all %d jobs ended %.1f s after the first submit: %.1f jobs/s on %d workers; "
                "%d SUCCEEDED, %d retried; %d of %d event logs complete and in order%s%s\n",
                total, seconds, throughput_, workers_ready_, succeeded, retried, logs_ok, total,
                first_error.empty() ? "" : "; first bad: ", first_error.c_str());
    std::printf("[burst] server CPU %.1f s for the burst (%.2f ms per job)\n", server_cpu,
                server_cpu * 1000 / std::max(total, 1));
    burst_queue_wait_ = Summarize(queue_wait);
    backlog_dispatch_ = Summarize(gaps);
    std::printf("[dispatch] QUEUED -> RUNNING, whole burst (queue wait): %s\n",
                FormatMs(burst_queue_wait_).c_str());
    std::printf("[dispatch] free worker -> its next job RUNNING, jobs queued: %s\n",
                FormatMs(backlog_dispatch_).c_str());
    for (size_t b = 0; b + 1 < std::size(bands); ++b) {
      if (gaps_by_band[b].empty()) continue;
      std::printf("[dispatch]   with %s queued: %s\n",
                  bands[b + 1] == INT64_MAX
                      ? absl::StrCat(bands[b], "+").c_str()
                      : absl::StrCat(bands[b], "-", bands[b + 1] - 1).c_str(),
                  FormatMs(Summarize(gaps_by_band[b])).c_str());
    }
    std::printf("[dispatch] RUNNING -> SUCCEEDED (a job's time on a worker): %s\n",
                FormatMs(Summarize(service)).c_str());

    // A stream passes when it was complete and in order and held as many
    // events as the job's log replayed after the end.
    std::unordered_map<std::string, const JobRecord*> by_id;
    for (const JobRecord& r : records_) by_id[r.id] = &r;
    int passed = 0, live_running = 0, events = 0;
    std::vector<double> lags;
    std::string watch_error;
    for (WatchResult& w : watch_results_) {
      auto it = by_id.find(w.job_id);
      if (w.passed && (it == by_id.end() || it->second->events != w.events)) {
        w.passed = false;
        w.error = absl::StrCat("received ", w.events, " events, the log holds ",
                               it == by_id.end() ? 0 : it->second->events);
      }
      passed += w.passed;
      live_running += w.saw_running_live;
      events += w.events;
      lags.insert(lags.end(), w.lag_ms.begin(), w.lag_ms.end());
      if (!w.passed && watch_error.empty()) watch_error = absl::StrCat(w.job_id, ": ", w.error);
    }
    watch_passed_ = passed;
    std::printf("[watch] %d of %d concurrent WatchJob streams received every event in sequence "
                "order, no gaps, through the terminal state (%d events; %d followed their job live "
                "from QUEUED through RUNNING)%s%s\n",
                passed, static_cast<int>(watch_results_.size()), events, live_running,
                watch_error.empty() ? "" : "; first failure: ", watch_error.c_str());
    std::printf("[watch] delivery lag, event time -> received: %s\n",
                FormatMs(Summarize(lags)).c_str());
  }

  // ---------------------------------------------------------------- baseline

  // GetJob by the same number of clients: the cost of one small RPC here.
  void GetJobBaseline() {
    const int per_client = 100;
    std::vector<std::vector<double>> latencies(flags_.clients);
    std::vector<std::thread> clients;
    const Clock::time_point start = Clock::now();
    for (int c = 0; c < flags_.clients; ++c) {
      clients.emplace_back([&, c] {
        auto stub = v1::JobService::NewStub(NewChannel(port_));
        std::mt19937 rng(c);
        for (int i = 0; i < per_client; ++i) {
          const JobRecord& r = records_[rng() % records_.size()];
          grpc::ClientContext context;
          SetDeadline(&context, std::chrono::seconds(30));
          v1::GetJobRequest request;
          request.set_job_id(r.id);
          v1::Job job;
          const Clock::time_point t0 = Clock::now();
          stub->GetJob(&context, request, &job);
          latencies[c].push_back(SecondsSince(t0) * 1000);
        }
      });
    }
    for (std::thread& t : clients) t.join();
    const double seconds = SecondsSince(start);
    std::vector<double> all;
    for (auto& l : latencies) all.insert(all.end(), l.begin(), l.end());
    get_rate_ = static_cast<double>(all.size()) / seconds;
    get_latency_ = Summarize(all);
    std::printf("\n[baseline] GetJob by %d clients: %.0f calls/s, %s\n", flags_.clients, get_rate_,
                FormatMs(get_latency_).c_str());
    std::printf("[baseline] submits/s : GetJob calls/s = %.2f\n", submit_rate_ / get_rate_);
  }

  // ---------------------------------------------------------------- paced

  // Jobs arriving slower than the workers finish them: each should find an
  // idle worker waiting, so QUEUED -> RUNNING is the scheduler's own latency.
  void Paced(double throughput) {
    if (flags_.paced_jobs <= 0) return;
    // A quarter of the burst's throughput keeps most workers idle; at most
    // about 15 s of it unless --paced-rate is given.
    const double rate = flags_.paced_rate > 0 ? flags_.paced_rate : std::max(1.0, throughput / 4);
    const int count = flags_.paced_rate > 0
                          ? flags_.paced_jobs
                          : std::min(flags_.paced_jobs, std::max(50, static_cast<int>(rate * 15)));
    std::vector<JobRecord> paced(count);
    int accepted = 0;
    auto stub = v1::JobService::NewStub(NewChannel(port_));
    const Clock::time_point start = Clock::now();
    for (int i = 0; i < count; ++i) {
      std::this_thread::sleep_until(start + std::chrono::microseconds(static_cast<int64_t>(i * 1e6 / rate)));
      grpc::ClientContext context;
      SetDeadline(&context, std::chrono::seconds(30));
      v1::SubmitJobResponse response;
      if (stub->SubmitJob(&context, NewRequest(absl::StrCat("paced-", i)), &response).ok()) {
        paced[i].id = response.job().id();
        ++accepted;
      }
    }
    stored_ = static_cast<int>(submitted_) + 1 + accepted;
    Drain(stored_, "paced");
    CollectLogs(&paced);
    std::vector<double> wait;
    int bad = 0;
    for (const JobRecord& r : paced) {
      if (r.running_us > 0) wait.push_back((r.running_us - r.queued_us) / 1000.0);
      bad += !r.log_ok;
    }
    paced_dispatch_ = Summarize(wait);
    std::printf("\n[paced] %d jobs at %.1f/s (the burst ran %.1f jobs/s: idle workers wait); "
                "%d bad logs\n",
                count, rate, throughput, bad);
    std::printf("[paced] QUEUED -> RUNNING (dispatch to an idle worker): %s; ratio p50 to GetJob "
                "p50 %.1f\n",
                FormatMs(paced_dispatch_).c_str(), paced_dispatch_.p50 / get_latency_.p50);
  }

  // ---------------------------------------------------------------- ListJobs

  void ListJobsWalk() {
    auto stub = v1::JobService::NewStub(NewChannel(port_));
    std::vector<double> pages;
    if (stored_ == 0) stored_ = static_cast<int>(submitted_) + 1;
    const int expected = stored_;
    std::string problem;
    for (int walk = 0; walk < flags_.list_walks; ++walk) {
      std::set<std::string> seen;
      std::string token;
      int64_t last_micros = INT64_MAX;
      do {
        grpc::ClientContext context;
        SetDeadline(&context, std::chrono::seconds(30));
        v1::ListJobsRequest request;
        request.set_page_size(flags_.page_size);
        request.set_page_token(token);
        v1::ListJobsResponse response;
        const Clock::time_point t0 = Clock::now();
        grpc::Status status = stub->ListJobs(&context, request, &response);
        pages.push_back(SecondsSince(t0) * 1000);
        if (!status.ok()) {
          problem = status.error_message();
          break;
        }
        for (const v1::Job& job : response.jobs()) {
          if (!seen.insert(job.id()).second && problem.empty()) problem = "a job listed twice";
          int64_t micros = TimeUtil::TimestampToMicroseconds(job.create_time());
          if (micros > last_micros && problem.empty()) problem = "not newest first";
          last_micros = micros;
        }
        token = response.next_page_token();
      } while (!token.empty());
      if (static_cast<int>(seen.size()) != expected && problem.empty()) {
        problem = absl::StrCat("walk listed ", seen.size(), " jobs, ", expected, " stored");
      }
    }
    list_pages_ = Summarize(pages);
    std::printf("\n[ListJobs] %d jobs stored, page size %d, %d walks: %s per page; %s\n", expected,
                flags_.page_size, flags_.list_walks, FormatMs(list_pages_).c_str(),
                problem.empty() ? "every job once, newest first" : problem.c_str());
    std::printf("[ListJobs] ratio page p50 to GetJob p50: %.1f\n", list_pages_.p50 / get_latency_.p50);
  }

  // ---------------------------------------------------------------- restart

  struct RestartResult {
    double shutdown_s = -1;  // signal -> process gone
    double startup_s = -1;   // new process started -> answers correctly
    double total_s = -1;     // signal -> answers correctly
    std::string problem;
  };

  // With `idle_client`, the connection that read the sample stays open,
  // idle, through the restart, as a dashboard's or a pipeline's would.
  void Restart(int signal, bool idle_client, RestartResult* result) {
    // What the server must answer afterwards: a sample of jobs and page one.
    std::shared_ptr<grpc::Channel> channel = NewChannel(port_);
    auto stub = v1::JobService::NewStub(channel);
    std::vector<v1::Job> sample;
    std::mt19937 rng(signal);
    for (int i = 0; i < 50; ++i) {
      grpc::ClientContext context;
      SetDeadline(&context, std::chrono::seconds(10));
      v1::GetJobRequest request;
      request.set_job_id(records_[rng() % records_.size()].id);
      v1::Job job;
      if (stub->GetJob(&context, request, &job).ok()) sample.push_back(job);
    }
    v1::ListJobsResponse first_page;
    {
      grpc::ClientContext context;
      SetDeadline(&context, std::chrono::seconds(10));
      v1::ListJobsRequest request;
      request.set_page_size(flags_.page_size);
      stub->ListJobs(&context, request, &first_page);
    }
    server_peak_kb_ = std::max(server_peak_kb_, ProcKb(server_->pid(), "status", "VmHWM"));
    if (!idle_client) {
      stub.reset();
      channel.reset();
      std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the connection closes
    }

    const Clock::time_point signalled = Clock::now();
    server_->Signal(signal);
    server_->Wait();
    result->shutdown_s = SecondsSince(signalled);
    ++server_starts_;
    const Clock::time_point started = Clock::now();
    server_ = std::make_unique<Subprocess>(
        std::vector<std::string>{flags_.server_bin, "--listen", Address(), "--metrics-listen",
                                 "127.0.0.1:0", "--data-dir", dir_ + "/data", "--model-root",
                                 dir_ + "/models"},
        absl::StrCat(dir_, "/server-", server_starts_, ".log"));
    // A new channel per try: what a client connecting now sees, without
    // gRPC's reconnect backoff from the tries before.
    std::string problem = "no answer in 60 s";
    while (SecondsSince(started) < 60) {
      auto fresh = v1::JobService::NewStub(NewChannel(port_));
      problem = Verify(fresh.get(), sample, first_page);
      if (problem.empty()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    result->startup_s = SecondsSince(started);
    result->total_s = SecondsSince(signalled);
    result->problem = problem;
    metrics_port_ = server_->WaitForNumber("metrics_port", 30000);
    std::printf("\n[restart] %s, %s: shutdown %.3f s; new process answers GetJob (%d jobs) and "
                "ListJobs page 1 exactly as before %.3f s after it started; signal -> serving %.3f s%s%s\n",
                signal == SIGTERM ? "SIGTERM" : "SIGKILL",
                idle_client ? "an idle client connected" : "no client connected", result->shutdown_s,
                static_cast<int>(sample.size()),
                result->startup_s, result->total_s, problem.empty() ? "" : "; FAILED: ",
                problem.c_str());
    std::printf("[restart] restarted server: RSS %.1f MiB after loading %d jobs\n",
                MiB(ProcKb(server_->pid(), "status", "VmRSS")), stored_);
  }

  // "" when the server answers every sampled job and the first page as before.
  std::string Verify(v1::JobService::Stub* stub, const std::vector<v1::Job>& sample,
                     const v1::ListJobsResponse& first_page) {
    for (const v1::Job& expected : sample) {
      grpc::ClientContext context;
      SetDeadline(&context, std::chrono::milliseconds(500));
      v1::GetJobRequest request;
      request.set_job_id(expected.id());
      v1::Job job;
      grpc::Status status = stub->GetJob(&context, request, &job);
      if (!status.ok()) return absl::StrCat("GetJob: ", status.error_message());
      if (job.state() != expected.state() || job.last_sequence() != expected.last_sequence() ||
          job.artifacts_size() != expected.artifacts_size()) {
        return absl::StrCat("job ", job.id(), " differs after the restart");
      }
    }
    grpc::ClientContext context;
    SetDeadline(&context, std::chrono::milliseconds(2000));
    v1::ListJobsRequest request;
    request.set_page_size(flags_.page_size);
    v1::ListJobsResponse page;
    grpc::Status status = stub->ListJobs(&context, request, &page);
    if (!status.ok()) return absl::StrCat("ListJobs: ", status.error_message());
    if (page.jobs_size() != first_page.jobs_size() ||
        page.next_page_token() != first_page.next_page_token()) {
      return "ListJobs page 1 differs after the restart";
    }
    for (int i = 0; i < page.jobs_size(); ++i) {
      if (page.jobs(i).id() != first_page.jobs(i).id() ||
          page.jobs(i).state() != first_page.jobs(i).state()) {
        return "ListJobs page 1 differs after the restart";
      }
    }
    return "";
  }

  // ---------------------------------------------------------------- end

  void WorkerMemoryAtEnd() {
    std::vector<double> hwm;
    for (auto& w : workers_) {
      if (w->Running()) hwm.push_back(MiB(ProcKb(w->pid(), "status", "VmHWM")));
    }
    Summary s = Summarize(hwm);
    std::printf("\n[memory] server peak RSS (VmHWM, largest of its processes): %.1f MiB\n",
                MiB(server_peak_kb_));
    std::printf("[memory] worker peak RSS (VmHWM): %.1f MiB each (max %.1f), %d workers alive\n",
                s.mean, s.max, static_cast<int>(hwm.size()));
  }

  void PrintGoals() {
    auto row = [](const std::string& what, const std::string& figure, const std::string& goal,
                  bool pass) {
      std::printf("| %-52s | %-14s | %-9s | %-4s |\n", what.c_str(), figure.c_str(), goal.c_str(),
                  pass ? "PASS" : "MISS");
    };
    auto info = [](const std::string& what, const std::string& figure) {
      std::printf("| %-52s | %-14s | %-9s | %-4s |\n", what.c_str(), figure.c_str(), "-", "");
    };
    std::printf("\nload_bench summary: %d jobs, %d clients, %d workers, %d watchers "
                "(load average now %s)\n",
                flags_.jobs, flags_.clients, workers_ready_, flags_.watchers, LoadAverage().c_str());
    std::printf("| %-52s | %-14s | %-9s | %-4s |\n", "figure", "value", "goal", "");
    std::printf("|%s|%s|%s|%s|\n", std::string(54, '-').c_str(), std::string(16, '-').c_str(),
                std::string(11, '-').c_str(), std::string(6, '-').c_str());
    info("submits/s, aggregate", absl::StrFormat("%.0f", submit_rate_));
    info("jobs/s run to the end (burst)", absl::StrFormat("%.1f", throughput_));
    if (paced_dispatch_.n > 0) {
      row("dispatch p99, QUEUED->RUNNING, idle workers (paced)",
          absl::StrFormat("%.1f ms", paced_dispatch_.p99), "< 50 ms",
          paced_dispatch_.p99 < kDispatchGoalMs);
    }
    row("dispatch p99, free worker->next job, jobs queued",
        absl::StrFormat("%.1f ms", backlog_dispatch_.p99), "< 50 ms",
        backlog_dispatch_.n > 0 && backlog_dispatch_.p99 < kDispatchGoalMs);
    row("QUEUED->RUNNING p99, whole burst (queue wait)",
        absl::StrFormat("%.0f ms", burst_queue_wait_.p99), "< 50 ms",
        burst_queue_wait_.p99 < kDispatchGoalMs);
    row("WatchJob streams complete, in order, no gaps",
        absl::StrFormat("%d/%d", watch_passed_, static_cast<int>(watch_results_.size())), "all",
        watch_passed_ == static_cast<int>(watch_results_.size()));
    info(absl::StrFormat("ListJobs page p99 (%d per page, %d stored)", flags_.page_size, stored_),
         absl::StrFormat("%.1f ms", list_pages_.p99));
    const bool restarts_ok = restart_term_.problem.empty() && restart_term_idle_.problem.empty() &&
                             restart_kill_.problem.empty();
    const double recovery = std::max(
        {restart_term_.startup_s, restart_term_idle_.startup_s, restart_kill_.startup_s});
    row("restart: new process -> serving its state (worst)", absl::StrFormat("%.3f s", recovery),
        "< 2 s", restarts_ok && recovery < kRestartGoalSeconds);
    row("restart, SIGTERM: signal -> serving again", absl::StrFormat("%.3f s", restart_term_.total_s),
        "< 2 s", restarts_ok && restart_term_.total_s < kRestartGoalSeconds);
    row("restart, SIGTERM, an idle client connected", absl::StrFormat("%.3f s", restart_term_idle_.total_s),
        "< 2 s", restarts_ok && restart_term_idle_.total_s < kRestartGoalSeconds);
    row("restart, SIGKILL: signal -> serving again", absl::StrFormat("%.3f s", restart_kill_.total_s),
        "< 2 s", restarts_ok && restart_kill_.total_s < kRestartGoalSeconds);
    row("server peak RSS (VmHWM)", absl::StrFormat("%.1f MiB", MiB(server_peak_kb_)), "< 200 MB",
        MiB(server_peak_kb_) * 1.048576 < kServerMemoryGoalMiB);
  }

  void Teardown() {
    for (auto& w : workers_) w->Signal(SIGTERM);
    for (auto& w : workers_) w->Wait();
    server_->Signal(SIGTERM);
    server_->Wait();
    if (!flags_.keep) {
      std::error_code ec;
      fs::remove_all(dir_ + "/data", ec);
      fs::remove_all(dir_ + "/work", ec);
      std::printf("\nremoved the store and artifacts (--keep keeps them); logs are in %s\n",
                  dir_.c_str());
    }
  }

  const Flags flags_;
  std::string dir_;
  int port_ = 0;
  int metrics_port_ = 0;
  int server_starts_ = 0;
  std::unique_ptr<Subprocess> server_;
  double server_cpu_before_ = 0;
  int64_t server_peak_kb_ = 0;
  std::vector<std::unique_ptr<Subprocess>> workers_;
  int workers_ready_ = 0;

  Clock::time_point burst_start_;
  std::vector<JobRecord> records_;
  std::vector<std::thread> watcher_threads_;
  std::vector<WatchResult> watch_results_;
  int64_t submitted_ = 0;  // burst jobs accepted
  int stored_ = 0;

  double submit_rate_ = 0, throughput_ = 0, get_rate_ = 0;
  Summary get_latency_, burst_queue_wait_, backlog_dispatch_, paced_dispatch_, list_pages_;
  int watch_passed_ = 0;
  RestartResult restart_term_, restart_term_idle_, restart_kill_;
};

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  compress::FlagSet set("load_bench");
  set.Add("jobs", &flags.jobs, "jobs submitted in the burst");
  set.Add("clients", &flags.clients, "client threads submitting at once (a channel each)");
  set.Add("workers", &flags.workers, "compress-worker processes");
  set.Add("watchers", &flags.watchers, "concurrent WatchJob streams, one per job");
  set.Add("sleep-ms", &flags.sleep_ms, "each job's sleep per tensor (7 tensors)");
  set.Add("paced-jobs", &flags.paced_jobs, "jobs submitted slower than the workers finish them");
  set.Add("paced-rate", &flags.paced_rate,
          "their rate per second (0: a quarter of the burst's throughput, for at most ~15 s)");
  set.Add("page-size", &flags.page_size, "ListJobs page size");
  set.Add("list-walks", &flags.list_walks, "times every ListJobs page is read");
  set.Add("dir", &flags.dir, "scratch folder: store, artifacts, model, logs (default <build>/load-bench)");
  set.Add("keep", &flags.keep, "keep the store and artifacts after the run");
  set.Add("server-bin", &flags.server_bin, "compress-server binary (default: this build's)");
  set.Add("worker-bin", &flags.worker_bin, "compress-worker binary (default: this build's)");
  absl::Status parsed = set.Parse(argc, argv);
  if (!parsed.ok()) {
    std::fprintf(stderr, "%s\n", std::string(parsed.message()).c_str());
    return parsed.code() == absl::StatusCode::kFailedPrecondition ? 0 : 1;
  }
  if (flags.jobs < 1 || flags.clients < 1 || flags.workers < 1 || flags.watchers < 0 ||
      flags.page_size < 1) {
    std::fprintf(stderr, "load_bench: --jobs, --clients, --workers, --page-size must be positive\n");
    return 1;
  }
  if (flags.dir.empty()) {
    // <build>/bench/load_bench -> <build>/load-bench
    flags.dir = (fs::read_symlink("/proc/self/exe").parent_path().parent_path() / "load-bench").string();
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::signal(SIGPIPE, SIG_IGN);  // `| head` must not leave the children running
  return LoadBench(std::move(flags)).Run();
}
