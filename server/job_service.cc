#include "server/job_service.h"

#include <fstream>
#include <memory>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "server/artifact_stream.h"
#include "server/rpc_util.h"

namespace compress::server {
namespace {

using compress::v1::ArtifactChunk;
using compress::v1::JobEvent;

constexpr int kEventBatch = 256;

// Streams a job's events from `from_sequence`, then follows new ones until
// the job ends. One write in flight at a time; new events wake it through
// the scheduler's listener. The shared Guard outlives the reactor so a late
// wake-up after OnDone finds no reactor instead of a dangling pointer.
class WatchReactor : public grpc::ServerWriteReactor<JobEvent> {
 public:
  struct Guard : EventListener {
    std::mutex mu;
    WatchReactor* reactor = nullptr;
    void OnNewEvents() override { WatchReactor::Pump(this); }
  };

  WatchReactor(Scheduler* scheduler, ServerMetrics* metrics, std::string tenant,
               std::string job_id, int64_t from_sequence)
      : scheduler_(scheduler),
        metrics_(metrics),
        tenant_(std::move(tenant)),
        job_id_(std::move(job_id)),
        next_sequence_(std::max<int64_t>(1, from_sequence)),
        guard_(std::make_shared<Guard>()) {
    guard_->reactor = this;
    absl::StatusOr<int64_t> subscription = scheduler_->Subscribe(tenant_, job_id_, guard_);
    if (!subscription.ok()) {
      finished_ = true;
      CountRpc(metrics_, "WatchJob", subscription.status());
      Finish(ToGrpcStatus(subscription.status()));
      return;
    }
    subscription_ = *subscription;
    Pump(guard_.get());
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(guard_->mu);
      writing_ = false;
      if (!ok) client_gone_ = true;
    }
    Pump(guard_.get());
  }

  void OnCancel() override {
    {
      std::lock_guard<std::mutex> lock(guard_->mu);
      client_gone_ = true;
    }
    Pump(guard_.get());
  }

  void OnDone() override {
    if (subscription_ != 0) scheduler_->Unsubscribe(job_id_, subscription_);
    {
      std::lock_guard<std::mutex> lock(guard_->mu);
      guard_->reactor = nullptr;
    }
    delete this;
  }

  // Decides the next step under the lock, then starts it with the lock
  // released (gRPC may run OnWriteDone inline). Nothing touches the reactor
  // after StartWrite/Finish: it may be gone by then.
  static void Pump(Guard* guard) {
    std::unique_lock<std::mutex> lock(guard->mu);
    WatchReactor* self = guard->reactor;
    if (self == nullptr || self->writing_ || self->finished_) return;
    if (self->client_gone_) {
      self->finished_ = true;
      lock.unlock();
      CountRpc(self->metrics_, "WatchJob", absl::CancelledError());
      self->Finish(grpc::Status::CANCELLED);
      return;
    }
    if (self->buffer_index_ >= self->buffer_.size()) {
      absl::StatusOr<EventBatch> batch =
          self->scheduler_->ReadEvents(self->tenant_, self->job_id_, self->next_sequence_, kEventBatch);
      if (!batch.ok()) {
        self->finished_ = true;
        lock.unlock();
        CountRpc(self->metrics_, "WatchJob", batch.status());
        self->Finish(ToGrpcStatus(batch.status()));
        return;
      }
      self->buffer_ = std::move(batch->events);
      self->buffer_index_ = 0;
      if (self->buffer_.empty()) {
        if (batch->job_ended && self->next_sequence_ > batch->last_sequence) {
          self->finished_ = true;
          lock.unlock();
          CountRpc(self->metrics_, "WatchJob", absl::OkStatus());
          self->Finish(grpc::Status::OK);
        }
        return;  // wait for the listener
      }
    }
    self->current_ = std::move(self->buffer_[self->buffer_index_++]);
    self->next_sequence_ = self->current_.sequence() + 1;
    self->writing_ = true;
    lock.unlock();
    self->StartWrite(&self->current_);
  }

 private:
  Scheduler* const scheduler_;
  ServerMetrics* const metrics_;
  const std::string tenant_;
  const std::string job_id_;
  int64_t next_sequence_;
  std::shared_ptr<Guard> guard_;
  int64_t subscription_ = 0;
  // Guarded by guard_->mu.
  std::vector<JobEvent> buffer_;
  size_t buffer_index_ = 0;
  JobEvent current_;
  bool writing_ = false;
  bool finished_ = false;
  bool client_gone_ = false;
};

}  // namespace

std::string AuthorizationOf(const grpc::CallbackServerContext* context) {
  const auto& metadata = context->client_metadata();
  auto it = metadata.find("authorization");
  return it == metadata.end() ? "" : std::string(it->second.data(), it->second.size());
}

absl::StatusOr<Principal> JobServiceImpl::Caller(const grpc::CallbackServerContext* context) const {
  absl::StatusOr<Principal> caller = auth_->Authenticate(AuthorizationOf(context));
  if (caller.ok() && caller->role == Role::kWorker) {
    return absl::PermissionDeniedError("a worker token cannot call JobService");
  }
  return caller;
}

template <typename Response, typename Call>
grpc::ServerUnaryReactor* JobServiceImpl::Unary(grpc::CallbackServerContext* context,
                                                const char* method, Response* response, Call call) {
  absl::StatusOr<Principal> caller = Caller(context);
  if (!caller.ok()) return FinishUnary(context, metrics_, method, caller.status());
  absl::StatusOr<Response> result = call(*caller);
  if (result.ok()) *response = std::move(*result);
  return FinishUnary(context, metrics_, method, result.status());
}

grpc::ServerUnaryReactor* JobServiceImpl::SubmitJob(grpc::CallbackServerContext* context,
                                                    const compress::v1::SubmitJobRequest* request,
                                                    compress::v1::SubmitJobResponse* response) {
  return Unary(context, "SubmitJob", response, [&](const Principal& caller) {
    return scheduler_->SubmitJob(caller.tenant, *request);
  });
}

grpc::ServerUnaryReactor* JobServiceImpl::GetJob(grpc::CallbackServerContext* context,
                                                 const compress::v1::GetJobRequest* request,
                                                 compress::v1::Job* response) {
  return Unary(context, "GetJob", response, [&](const Principal& caller) {
    return scheduler_->GetJob(ReadScope(caller), request->job_id());
  });
}

grpc::ServerUnaryReactor* JobServiceImpl::ListJobs(grpc::CallbackServerContext* context,
                                                   const compress::v1::ListJobsRequest* request,
                                                   compress::v1::ListJobsResponse* response) {
  return Unary(context, "ListJobs", response, [&](const Principal& caller) {
    return scheduler_->ListJobs(ReadScope(caller), *request);
  });
}

grpc::ServerUnaryReactor* JobServiceImpl::CancelJob(grpc::CallbackServerContext* context,
                                                    const compress::v1::CancelJobRequest* request,
                                                    compress::v1::Job* response) {
  return Unary(context, "CancelJob", response, [&](const Principal& caller) {
    return scheduler_->CancelJob(ReadScope(caller), request->job_id());
  });
}

grpc::ServerUnaryReactor* JobServiceImpl::PauseJob(grpc::CallbackServerContext* context,
                                                   const compress::v1::PauseJobRequest* request,
                                                   compress::v1::Job* response) {
  return Unary(context, "PauseJob", response, [&](const Principal& caller) {
    return scheduler_->PauseJob(ReadScope(caller), request->job_id());
  });
}

grpc::ServerUnaryReactor* JobServiceImpl::ResumeJob(grpc::CallbackServerContext* context,
                                                    const compress::v1::ResumeJobRequest* request,
                                                    compress::v1::Job* response) {
  return Unary(context, "ResumeJob", response, [&](const Principal& caller) {
    return scheduler_->ResumeJob(ReadScope(caller), request->job_id());
  });
}

grpc::ServerUnaryReactor* JobServiceImpl::DeleteJob(grpc::CallbackServerContext* context,
                                                    const compress::v1::DeleteJobRequest* request,
                                                    compress::v1::DeleteJobResponse* response) {
  return Unary(context, "DeleteJob", response, [&](const Principal& caller) {
    return scheduler_->DeleteJob(ReadScope(caller), request->job_id());
  });
}

grpc::ServerWriteReactor<JobEvent>* JobServiceImpl::WatchJob(
    grpc::CallbackServerContext* context, const compress::v1::WatchJobRequest* request) {
  absl::StatusOr<Principal> caller = Caller(context);
  absl::Status status = caller.status();
  if (status.ok() && request->from_sequence() < 0) {
    status = absl::InvalidArgumentError("from_sequence: must not be negative");
  }
  if (!status.ok()) {
    CountRpc(metrics_, "WatchJob", status);
    return new FailedStream<JobEvent>(ToGrpcStatus(status));
  }
  return new WatchReactor(scheduler_, metrics_, ReadScope(*caller), request->job_id(),
                          request->from_sequence());
}

grpc::ServerWriteReactor<ArtifactChunk>* JobServiceImpl::DownloadArtifact(
    grpc::CallbackServerContext* context, const compress::v1::DownloadArtifactRequest* request) {
  absl::StatusOr<Principal> caller = Caller(context);
  if (!caller.ok()) {
    CountRpc(metrics_, "DownloadArtifact", caller.status());
    return new FailedStream<ArtifactChunk>(ToGrpcStatus(caller.status()));
  }
  absl::StatusOr<ArtifactLocation> location =
      scheduler_->FindArtifact(ReadScope(*caller), request->job_id(), request->name());
  absl::Status status = location.status();
  if (status.ok() && (request->offset() < 0 || request->offset() > location->artifact.size_bytes())) {
    status = absl::OutOfRangeError(absl::StrCat("offset ", request->offset(), " is outside 0..",
                                                location->artifact.size_bytes()));
  }
  if (!status.ok()) {
    CountRpc(metrics_, "DownloadArtifact", status);
    return new FailedStream<ArtifactChunk>(ToGrpcStatus(status));
  }
  return new ArtifactStreamReactor(metrics_, "DownloadArtifact", std::move(*location),
                                  request->offset());
}

}  // namespace compress::server
