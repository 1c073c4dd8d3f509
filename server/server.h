// compress-server assembled: job store, scheduler, both gRPC services, the
// health and reflection services, and the /metrics + /healthz HTTP endpoint.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "common/auth.h"
#include "common/http_server.h"
#include "common/metrics.h"
#include "server/job_service.h"
#include "server/scheduler.h"
#include "server/worker_service.h"

namespace grpc {
class Server;
class ServerCredentials;
}

namespace compress::server {

struct ServerConfig {
  std::string listen = "127.0.0.1:50051";
  std::string metrics_listen = "127.0.0.1:9464";  // empty: no HTTP endpoint
  std::string data_dir = "./compress-data";  // the artifacts, and the SQLite store by default
  // The job store: empty for SQLite (jobs.db in data_dir), or a
  // postgres:// / postgresql:// URL for PostgreSQL.
  std::string store;
  std::vector<std::string> model_roots;
  int lease_seconds = 15;
  int max_attempts = 5;
  int max_block_tasks = 8;          // block ranges a parallel-calibration job is split into
  int max_task_memory_gib = 256;    // jobs with a task estimated above this are refused
  int max_message_bytes = 8 << 20;
  std::string auth_tokens_file;   // empty: no authentication (one tenant)
  std::string tls_cert_file;      // PEM; with tls_key_file: TLS on the gRPC port
  std::string tls_key_file;
  // Ended jobs (record, events, artifacts) are deleted this long after they
  // end; zero keeps them until DeleteJob.
  absl::Duration retention = absl::ZeroDuration();
};

class CompressServer {
 public:
  explicit CompressServer(ServerConfig config);
  ~CompressServer();

  // Opens the store, recovers state and starts serving. Ports of 0 pick a
  // free port; the bound ones are reported below.
  absl::Status Start();
  void Shutdown();
  void Wait();

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }
  Scheduler* scheduler() { return scheduler_.get(); }

 private:
  absl::StatusOr<std::unique_ptr<JobStore>> OpenStore() const;
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials() const;

  ServerConfig config_;
  metrics::Registry registry_;
  ServerMetrics metrics_;
  TokenAuthenticator auth_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<JobServiceImpl> job_service_;
  std::unique_ptr<WorkerServiceImpl> worker_service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  HttpServer http_;
  int grpc_port_ = 0;
  int metrics_port_ = 0;
};

}  // namespace compress::server
