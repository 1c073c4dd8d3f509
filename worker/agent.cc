#include "worker/agent.h"

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/files.h"
#include "common/grpc_status.h"
#include "common/paths.h"
#include "common/process_stats.h"
#include "common/sha256.h"
#include "common/status_macros.h"
#include "worker/cuda_memory.h"
#include "common/log.h"
#include "worker/engine/recipe/runner.h"

namespace compress::worker {
namespace {

using compress::v1::JobEvent;
namespace fs = std::filesystem;

constexpr size_t kUploadChunkBytes = 1 << 20;
constexpr size_t kMaxBufferedEvents = 20000;
constexpr int kMaxEventsPerReport = 500;

using PrepareContext = std::function<void(grpc::ClientContext*)>;

// Retries a call while the server is unreachable (restarting, say), with
// backoff, for up to `budget`.
grpc::Status CallWithRetry(const PrepareContext& prepare,
                           const std::function<grpc::Status(grpc::ClientContext*)>& call,
                           absl::Duration budget = absl::Seconds(60),
                           absl::Duration per_call = absl::Seconds(30)) {
  absl::Time give_up = absl::Now() + budget;
  absl::Duration backoff = absl::Milliseconds(100);
  while (true) {
    grpc::ClientContext context;
    prepare(&context);
    context.set_deadline(absl::ToChronoTime(absl::Now() + per_call));
    grpc::Status status = call(&context);
    if (status.error_code() != grpc::StatusCode::UNAVAILABLE || absl::Now() + backoff > give_up) {
      return status;
    }
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(2));
  }
}

// Buffers engine events and sends them from a background thread; the same
// thread renews the lease when nothing else has been sent for a while. Any
// answer that says "cancelled" or "lease lost" sets the stop flag the engine
// polls between tensors.
class TaskSession {
 public:
  TaskSession(compress::v1::WorkerService::StubInterface* stub, PrepareContext prepare,
              std::string worker_id, std::string task_id, absl::Duration renew_every)
      : stub_(stub),
        prepare_(std::move(prepare)),
        worker_id_(std::move(worker_id)),
        task_id_(std::move(task_id)),
        renew_every_(renew_every),
        thread_([this] { Loop(); }) {}

  ~TaskSession() { Close(); }

  void Add(JobEvent event) {
    std::lock_guard<std::mutex> lock(mu_);
    if (pending_.size() >= kMaxBufferedEvents) pending_.pop_front();  // oldest progress is least useful
    pending_.push_back(std::move(event));
    wake_.notify_all();
  }

  // Sends what is buffered and stops the thread.
  void Close() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closing_) return;
      closing_ = true;
    }
    wake_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  bool cancelled() const { return cancelled_.load(); }
  bool lease_lost() const { return lease_lost_.load(); }
  bool should_stop() const { return cancelled() || lease_lost(); }

 private:
  void Loop() {
    absl::Time last_contact = absl::Now();
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      // Wakes at once for new events or the close, else every 250 ms to renew.
      wake_.wait_for(lock, std::chrono::milliseconds(250),
                     [this] { return closing_ || !pending_.empty(); });
      bool closing = closing_;
      std::vector<JobEvent> batch;
      while (!pending_.empty() && batch.size() < kMaxEventsPerReport) {
        batch.push_back(std::move(pending_.front()));
        pending_.pop_front();
      }
      lock.unlock();
      if (!batch.empty() && !should_stop()) {
        Report(batch);
        last_contact = absl::Now();
      } else if (absl::Now() - last_contact >= renew_every_ && !should_stop()) {
        Renew();
        last_contact = absl::Now();
      }
      lock.lock();
      if (closing && pending_.empty()) return;
      if (should_stop() && closing) return;
    }
  }

  void Report(const std::vector<JobEvent>& batch) {
    compress::v1::ReportEventsRequest request;
    request.set_worker_id(worker_id_);
    request.set_task_id(task_id_);
    for (const JobEvent& e : batch) *request.add_events() = e;
    compress::v1::ReportEventsResponse response;
    grpc::Status status = CallWithRetry(prepare_, [&](grpc::ClientContext* c) {
      return stub_->ReportEvents(c, request, &response);
    });
    Absorb(status, response.cancelled());
  }

  void Renew() {
    compress::v1::RenewLeaseRequest request;
    request.set_worker_id(worker_id_);
    request.set_task_id(task_id_);
    compress::v1::RenewLeaseResponse response;
    grpc::Status status = CallWithRetry(prepare_, [&](grpc::ClientContext* c) {
      return stub_->RenewLease(c, request, &response);
    });
    Absorb(status, response.cancelled());
  }

  void Absorb(const grpc::Status& status, bool cancelled) {
    if (status.ok()) {
      if (cancelled) cancelled_ = true;
      return;
    }
    if (status.error_code() == grpc::StatusCode::FAILED_PRECONDITION ||
        status.error_code() == grpc::StatusCode::NOT_FOUND) {
      LOG_WARN("lease lost; dropping task", {{"task", task_id_}, {"error", status.error_message()}});
      lease_lost_ = true;
    } else {
      LOG_WARN("report failed", {{"task", task_id_}, {"error", status.error_message()}});
    }
  }

  compress::v1::WorkerService::StubInterface* stub_;
  const PrepareContext prepare_;
  const std::string worker_id_;
  const std::string task_id_;
  const absl::Duration renew_every_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<JobEvent> pending_;
  bool closing_ = false;
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> lease_lost_{false};
  std::thread thread_;  // last: starts after every other member exists
};

std::string DefaultWorkerId() {
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  return absl::StrCat(host, "-", getpid());
}

}  // namespace

int64_t DetectMemoryBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit) {
    if (key == "MemTotal:") return kb * 1024;
  }
  return 0;
}


WorkerAgent::WorkerAgent(WorkerConfig config,
                         std::unique_ptr<compress::v1::WorkerService::StubInterface> stub,
                         WorkerMetrics* metrics)
    : config_(std::move(config)), stub_(std::move(stub)), metrics_(metrics) {
  worker_id_ = config_.worker_id.empty() ? DefaultWorkerId() : config_.worker_id;
  SetLogProcessField("worker", worker_id_);
  const std::optional<int> gpu = CudaDeviceIndex(config_.device);
  const std::optional<CudaMemory> gpu_memory = gpu ? QueryCudaMemory(*gpu) : std::nullopt;
  if (config_.memory_bytes == 0) {
    // A GPU worker offers its device's memory; a CPU worker its machine's.
    config_.memory_bytes = gpu_memory ? gpu_memory->total_bytes : DetectMemoryBytes();
  }
  metrics_->device_memory_bytes.Set(static_cast<double>(config_.memory_bytes));
  if (!gpu) {
    metrics_->SetDeviceMemoryProbe(ResidentMemoryBytes);
  } else if (gpu_memory) {
    // In use on the whole device, as nvidia-smi shows it.
    metrics_->SetDeviceMemoryProbe([index = *gpu]() -> int64_t {
      std::optional<CudaMemory> now = QueryCudaMemory(index);
      return now ? now->total_bytes - now->free_bytes : 0;
    });
  } else {
    // No NVIDIA driver to ask: unknown rather than wrong.
    metrics_->device_memory_used_bytes.Set(std::numeric_limits<double>::quiet_NaN());
  }
}

void WorkerAgent::Prepare(grpc::ClientContext* context) const {
  if (!config_.token.empty()) context->AddMetadata("authorization", "Bearer " + config_.token);
}

absl::Status WorkerAgent::Register(const std::atomic<bool>* stop) {
  compress::v1::RegisterWorkerRequest request;
  request.set_worker_id(worker_id_);
  request.set_device(config_.device);
  request.set_memory_bytes(config_.memory_bytes);
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  request.set_hostname(host);
  absl::Duration backoff = absl::Milliseconds(200);
  while (!stop->load()) {
    compress::v1::RegisterWorkerResponse response;
    grpc::ClientContext context;
    Prepare(&context);
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    grpc::Status status = stub_->RegisterWorker(&context, request, &response);
    if (status.ok()) {
      if (response.worker_id() != worker_id_) {
        metrics_->info.Add({{"worker_id", worker_id_}, {"device", config_.device}}).Set(0);
      }
      worker_id_ = response.worker_id();
      SetLogProcessField("worker", worker_id_);
      metrics_->info.Add({{"worker_id", worker_id_}, {"device", config_.device}}).Set(1);
      lease_seconds_ = std::max(1, response.lease_seconds());
      LOG_INFO("registered", {{"worker", worker_id_}, {"server", config_.server},
                              {"device", config_.device}});
      return absl::OkStatus();
    }
    if (status.error_code() != grpc::StatusCode::UNAVAILABLE &&
        status.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
      return FromGrpcStatus(status);
    }
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(2));
  }
  return absl::CancelledError("stopping");
}

void WorkerAgent::Run(const std::atomic<bool>* stop) {
  bool registered = false;
  absl::Duration backoff = absl::Milliseconds(100);
  while (!stop->load()) {
    if (!registered) {
      absl::Status status = Register(stop);
      if (!status.ok()) {
        if (!stop->load()) LOG_ERROR("register failed", {{"error", status.ToString()}});
        absl::SleepFor(absl::Seconds(1));
        continue;
      }
      registered = true;
    }
    compress::v1::AcquireTaskRequest request;
    request.set_worker_id(worker_id_);
    request.set_wait_millis(config_.poll_millis);
    compress::v1::AcquireTaskResponse response;
    grpc::ClientContext context;
    Prepare(&context);
    context.set_deadline(
        absl::ToChronoTime(absl::Now() + absl::Milliseconds(config_.poll_millis) + absl::Seconds(10)));
    grpc::Status status = stub_->AcquireTask(&context, request, &response);
    if (status.ok()) {
      backoff = absl::Milliseconds(100);
      if (response.has_task()) RunTask(response.task());
      continue;
    }
    if (status.error_code() == grpc::StatusCode::NOT_FOUND) {
      registered = false;  // the server restarted and forgot us
      continue;
    }
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(2));
  }
}

void WorkerAgent::RunTask(const compress::v1::Task& task) {
  LOG_INFO("task started", {{"job", task.job_id()}, {"task", task.task_id()},
                            {"attempt", std::to_string(task.attempt())}});
  metrics_->busy.Set(1);
  std::string output_dir = (fs::path(config_.work_dir) / task.task_id()).string();
  const std::string input_dir = output_dir + "-inputs";
  std::error_code ec;
  fs::remove_all(output_dir, ec);
  fs::remove_all(input_dir, ec);

  PrepareContext prepare = [this](grpc::ClientContext* c) { Prepare(c); };
  TaskSession session(stub_.get(), prepare, worker_id_, task.task_id(),
                      absl::Seconds(lease_seconds_) / 3);
  const metrics::Labels task_labels = {{"job_id", task.job_id()}, {"task_id", task.task_id()}};
  metrics::Gauge& progress = metrics_->task_progress.Add(task_labels);
  progress.Set(0);
  BlockTimer block_timer(&metrics_->block_seconds, absl::Now());
  engine::RunCallbacks callbacks;
  callbacks.on_progress = [&](double fraction, const std::string& stage, const std::string& message) {
    progress.Set(fraction);
    block_timer.OnProgress(message, absl::Now());
    JobEvent event;
    event.mutable_progress()->set_fraction(fraction);
    event.mutable_progress()->set_stage(stage);
    event.mutable_progress()->set_message(message);
    session.Add(std::move(event));
  };
  callbacks.on_metric = [&](const std::string& stage, const std::string& name, double value,
                            const std::string& unit) {
    JobEvent event;
    event.mutable_metric()->set_stage(stage);
    event.mutable_metric()->set_name(name);
    event.mutable_metric()->set_value(value);
    event.mutable_metric()->set_unit(unit);
    session.Add(std::move(event));
    if (name == engine::kMetricStageBytesIn) metrics_->weight_bytes_processed.Increment(value);
    if (name == engine::kMetricCalibrationTokensPerSecond) {
      metrics_->calibration_tokens_per_second.Set(value);
    }
    if (name == engine::kMetricStageSeconds) {
      metrics::Labels labels = task_labels;
      labels["stage"] = stage;
      metrics_->task_stage_seconds.Add(labels).Set(value);
    }
  };
  callbacks.on_log = [&](const std::string& level, const std::string& text) {
    JobEvent event;
    event.mutable_log()->set_level(level);
    event.mutable_log()->set_text(text);
    session.Add(std::move(event));
  };
  callbacks.is_cancelled = [&] { return session.should_stop(); };
  // A block task's checkpoints go to the server as each block finishes, so
  // a retry anywhere resumes after them.
  callbacks.on_checkpoint = [&](const engine::ProducedArtifact& produced) -> absl::Status {
    compress::v1::Artifact artifact;
    artifact.set_name(produced.name);
    artifact.set_size_bytes(produced.size_bytes);
    artifact.set_sha256(produced.sha256);
    return UploadArtifact(task, (fs::path(output_dir) / produced.name).string(), artifact);
  };

  engine::RunOptions options;
  options.model_path = task.model_path();
  options.calibration_path = task.calibration_path();
  options.evaluation_path = task.evaluation_path();
  options.output_dir = output_dir;
  options.device = config_.device;
  switch (task.kind()) {
    case compress::v1::TASK_BLOCKS: options.part = engine::RunOptions::Part::kBlocks; break;
    case compress::v1::TASK_ASSEMBLE: options.part = engine::RunOptions::Part::kAssemble; break;
    default: options.part = engine::RunOptions::Part::kWhole; break;
  }
  options.first_layer = task.first_layer();
  options.end_layer = task.end_layer();
  options.finished_layers.insert(task.finished_layers().begin(), task.finished_layers().end());
  options.checkpoint_dir = input_dir;
  const absl::Status fetched = FetchInputs(task, input_dir);
  absl::StatusOr<engine::RunResult> result =
      fetched.ok() ? engine::RunJob(task.spec(), options, callbacks)
                   : absl::StatusOr<engine::RunResult>(fetched);
  block_timer.Finish();

  if (result.ok()) {
    for (const compress::v1::StageReport& stage : result->report.stages()) {
      metrics_->stage_seconds
          .Add({{"stage", stage.kind()}, {"method", stage.method()}},
               metrics::LongDurationBuckets())
          .Observe(stage.seconds());
    }
  }
  session.Close();  // flush progress before artifacts and the final state

  compress::v1::CompleteTaskRequest complete;
  complete.set_worker_id(worker_id_);
  complete.set_task_id(task.task_id());
  std::string outcome;
  if (session.lease_lost()) {
    outcome = "lost";
  } else if (session.cancelled()) {
    outcome = "cancelled";
  } else if (!result.ok()) {
    outcome = "failed";
    complete.set_success(false);
    complete.set_error(std::string(result.status().message()));
    complete.set_error_code(static_cast<int>(result.status().code()));
  } else {
    absl::Status uploaded = absl::OkStatus();
    // A block task's artifacts are its checkpoints, uploaded as they came.
    const bool already_uploaded = task.kind() == compress::v1::TASK_BLOCKS;
    for (const engine::ProducedArtifact& produced : result->artifacts) {
      if (already_uploaded) break;
      compress::v1::Artifact artifact;
      artifact.set_name(produced.name);
      artifact.set_format(produced.format);
      artifact.set_size_bytes(produced.size_bytes);
      artifact.set_sha256(produced.sha256);
      uploaded = UploadArtifact(task, (fs::path(output_dir) / produced.name).string(), artifact);
      if (!uploaded.ok()) break;
    }
    if (uploaded.ok()) {
      outcome = "succeeded";
      complete.set_success(true);
      *complete.mutable_report() = result->report;
    } else if (uploaded.code() == absl::StatusCode::kFailedPrecondition ||
               uploaded.code() == absl::StatusCode::kCancelled) {
      outcome = "lost";
    } else {
      outcome = "failed";
      complete.set_success(false);
      complete.set_error(absl::StrCat("upload: ", uploaded.message()));
      complete.set_error_code(static_cast<int>(uploaded.code()));
    }
  }
  if (outcome == "succeeded" || outcome == "failed") {
    compress::v1::CompleteTaskResponse response;
    grpc::Status status = CallWithRetry(prepare, [&](grpc::ClientContext* c) {
      return stub_->CompleteTask(c, complete, &response);
    });
    if (!status.ok()) {
      LOG_WARN("complete failed", {{"task", task.task_id()}, {"error", status.error_message()}});
    }
  }
  fs::remove_all(output_dir, ec);
  fs::remove_all(input_dir, ec);
  metrics_->tasks.Add({{"result", outcome}}).Increment();
  metrics_->busy.Set(0);
  LOG_INFO("task ended", {{"job", task.job_id()}, {"task", task.task_id()}, {"result", outcome},
                          {"error", result.ok() ? "" : result.status().ToString()}});
}

absl::Status WorkerAgent::FetchInputs(const compress::v1::Task& task, const std::string& dir) {
  for (const compress::v1::Artifact& input : task.inputs()) {
    if (!IsSafeRelativeName(input.name())) {
      return absl::InvalidArgumentError(absl::StrCat("input '", input.name(), "' is not a safe relative path"));
    }
    const std::string path = (fs::path(dir) / input.name()).string();
    RETURN_IF_ERROR(MakeDirs(fs::path(path).parent_path().string()));
    absl::Status fetched = FromGrpcStatus(CallWithRetry(
        [this](grpc::ClientContext* c) { Prepare(c); },
        [&](grpc::ClientContext* context) {
          absl::StatusOr<AtomicFileWriter> file = AtomicFileWriter::Open(path);
          if (!file.ok()) return ToGrpcStatus(file.status());
          compress::v1::FetchCheckpointRequest request;
          request.set_worker_id(worker_id_);
          request.set_task_id(task.task_id());
          request.set_name(input.name());
          std::unique_ptr<grpc::ClientReaderInterface<compress::v1::ArtifactChunk>> reader =
              stub_->FetchCheckpoint(context, request);
          compress::v1::ArtifactChunk chunk;
          Sha256 hash;
          while (reader->Read(&chunk)) {
            hash.Update(chunk.data());
            if (absl::Status written = file->Write(chunk.data()); !written.ok()) {
              return ToGrpcStatus(written);
            }
          }
          grpc::Status status = reader->Finish();
          if (!status.ok()) return status;
          if (file->bytes_written() != input.size_bytes() || hash.Hex() != input.sha256()) {
            return grpc::Status(grpc::StatusCode::DATA_LOSS,
                                absl::StrCat("checkpoint ", input.name(), " arrived damaged"));
          }
          return ToGrpcStatus(file->Commit());
        },
        absl::Seconds(60), absl::Hours(1)));
    if (!fetched.ok()) {
      return absl::Status(fetched.code(), absl::StrCat("fetch ", input.name(), ": ", fetched.message()));
    }
  }
  return absl::OkStatus();
}

absl::Status WorkerAgent::UploadArtifact(const compress::v1::Task& task, const std::string& path,
                                         const compress::v1::Artifact& artifact) {
  grpc::Status status = CallWithRetry(
      [this](grpc::ClientContext* c) { Prepare(c); },
      [&](grpc::ClientContext* context) {
        std::ifstream in(path, std::ios::binary);
        if (!in) return grpc::Status(grpc::StatusCode::NOT_FOUND, "cannot open " + path);
        compress::v1::UploadArtifactResponse response;
        std::unique_ptr<grpc::ClientWriterInterface<compress::v1::UploadArtifactRequest>> writer =
            stub_->UploadArtifact(context, &response);
        compress::v1::UploadArtifactRequest request;
        request.set_worker_id(worker_id_);
        request.set_task_id(task.task_id());
        *request.mutable_artifact() = artifact;
        std::string buffer(kUploadChunkBytes, '\0');
        bool first = true;
        while (true) {
          in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
          std::streamsize n = in.gcount();
          if (n <= 0 && !first) break;
          request.set_data(buffer.data(), static_cast<size_t>(n));
          if (!writer->Write(request)) break;  // the server ended the call; Finish says why
          first = false;
          request.clear_artifact();
          if (n < static_cast<std::streamsize>(buffer.size())) break;
        }
        writer->WritesDone();
        return writer->Finish();
      },
      absl::Seconds(60), absl::Hours(1));
  return FromGrpcStatus(status);
}

}  // namespace compress::worker
