// compress-server: the scheduler. See README.md for the flags.
#include <csignal>
#include <cstdio>
#include <thread>

#include "absl/time/time.h"
#include "common/flags.h"
#include "common/log.h"
#include "server/server.h"

namespace {
volatile std::sig_atomic_t g_stop = 0;
void OnSignal(int) { g_stop = 1; }
}  // namespace

int main(int argc, char** argv) {
  compress::SetLogComponent("server");
  // A file size limit makes writes fail (EFBIG, a clear error), not the process.
  std::signal(SIGXFSZ, SIG_IGN);
  compress::server::ServerConfig config;
  compress::FlagSet flags("compress-server");
  flags.Add("listen", &config.listen, "gRPC address host:port (port 0 picks one)");
  flags.Add("metrics-listen", &config.metrics_listen, "HTTP address for /metrics and /healthz ('' disables)");
  flags.Add("data-dir", &config.data_dir, "artifact folder, and the job store unless --store");
  flags.Add("store", &config.store,
            "job store: '' for SQLite in --data-dir, or postgresql://USER@HOST:PORT/DATABASE "
            "(password from PGPASSWORD or ~/.pgpass)");
  flags.Add("model-root", &config.model_roots, "folder models may be read from (repeatable)");
  flags.Add("lease-seconds", &config.lease_seconds, "a worker that does not renew for this long loses its task");
  flags.Add("max-attempts", &config.max_attempts, "dispatches of one task before its job fails");
  flags.Add("max-block-tasks", &config.max_block_tasks,
            "block ranges a parallel-calibration job is split into (one per worker at most)");
  flags.Add("max-task-memory-gib", &config.max_task_memory_gib,
            "the most device memory a worker may have: jobs estimated above it are refused");
  flags.Add("auth-tokens", &config.auth_tokens_file,
            "file of 'TOKEN TENANT [client|admin|worker]' lines ('' : no authentication)");
  flags.Add("tls-cert", &config.tls_cert_file, "PEM certificate chain for TLS on the gRPC port");
  flags.Add("tls-key", &config.tls_key_file, "PEM private key for --tls-cert");
  std::string retention = "0";
  flags.Add("retention", &retention,
            "delete ended jobs and their artifacts this long after they end, e.g. 720h "
            "(0: keep until compressctl delete)");
  std::string log_format = "auto";
  flags.Add("log-format", &log_format, "text, json (one object per line) or auto (text on a terminal)");
  absl::Status parsed = flags.Parse(argc, argv);
  if (!parsed.ok()) {
    std::fprintf(stderr, "%s\n", std::string(parsed.message()).c_str());
    return parsed.code() == absl::StatusCode::kFailedPrecondition ? 0 : 1;
  }
  absl::StatusOr<compress::LogFormat> format = compress::ParseLogFormat(log_format);
  if (!format.ok()) {
    std::fprintf(stderr, "compress-server: %s\n", std::string(format.status().message()).c_str());
    return 1;
  }
  compress::SetLogFormat(*format);
  if (!absl::ParseDuration(retention, &config.retention) || config.retention < absl::ZeroDuration()) {
    std::fprintf(stderr, "compress-server: --retention: '%s' is not a duration like 720h or 90m\n",
                 retention.c_str());
    return 1;
  }
  if (config.model_roots.empty()) {
    std::fprintf(stderr, "compress-server: at least one --model-root is required\n");
    return 1;
  }
  compress::server::CompressServer server(config);
  absl::Status started = server.Start();
  if (!started.ok()) {
    LOG_ERROR("cannot start", {{"error", started.ToString()}});
    return 1;
  }
  // Ports are printed on stdout so scripts and tests can read them.
  std::printf("grpc_port=%d metrics_port=%d\n", server.grpc_port(), server.metrics_port());
  std::fflush(stdout);
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  LOG_INFO("shutting down");
  server.Shutdown();
  return 0;
}
