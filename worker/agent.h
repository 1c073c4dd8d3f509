// The worker agent: dials the server, takes one task at a time, runs the
// engine on its device, streams events and artifacts back.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "compress/v1/compress.grpc.pb.h"
#include "worker/worker_metrics.h"

namespace compress::worker {

struct WorkerConfig {
  std::string server = "127.0.0.1:50051";
  std::string device = "cpu";
  std::string worker_id;                 // empty: host-pid
  std::string work_dir = "./compress-work";
  std::string metrics_listen;            // empty: no HTTP endpoint
  int64_t memory_bytes = 0;              // 0: detect
  int poll_millis = 5000;                // long-poll wait for a task
  std::string token;                     // worker token, sent as a bearer token
};

class WorkerAgent {
 public:
  WorkerAgent(WorkerConfig config, std::unique_ptr<compress::v1::WorkerService::StubInterface> stub,
              WorkerMetrics* metrics);

  // Serves until *stop becomes true. Survives server restarts.
  void Run(const std::atomic<bool>* stop);

 private:
  absl::Status Register(const std::atomic<bool>* stop);
  void RunTask(const compress::v1::Task& task);
  absl::Status UploadArtifact(const compress::v1::Task& task, const std::string& path,
                              const compress::v1::Artifact& artifact);
  // Fetches the task's input checkpoints under `dir` (names kept), each
  // checked against its size and sha256.
  absl::Status FetchInputs(const compress::v1::Task& task, const std::string& dir);

  // Every call carries the worker token (when one is configured).
  void Prepare(grpc::ClientContext* context) const;

  WorkerConfig config_;
  std::unique_ptr<compress::v1::WorkerService::StubInterface> stub_;
  WorkerMetrics* metrics_;
  std::string worker_id_;
  int lease_seconds_ = 15;
};

// Total physical memory, from /proc/meminfo.
int64_t DetectMemoryBytes();

}  // namespace compress::worker
