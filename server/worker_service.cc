#include "server/worker_service.h"

#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/sha256.h"
#include "server/job_service.h"
#include "server/artifact_stream.h"
#include "server/rpc_util.h"

namespace compress::server {
namespace {

using compress::v1::UploadArtifactRequest;

// Receives one artifact: the first message names it, every message may carry
// data. Bytes go to a temp file that becomes the artifact only when the size
// and sha256 match what the worker declared.
class UploadReactor : public grpc::ServerReadReactor<UploadArtifactRequest> {
 public:
  UploadReactor(Scheduler* scheduler, ServerMetrics* metrics,
                compress::v1::UploadArtifactResponse* response, const absl::Status& allowed)
      : scheduler_(scheduler), metrics_(metrics), response_(response) {
    if (!allowed.ok()) {
      FinishWith(allowed);
      return;
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // client finished sending
      // fsync of a large artifact takes seconds: not on gRPC's callback
      // threads, which serve every other RPC. No reaction runs until Finish.
      std::thread([this] { FinishWith(Complete()); }).detach();
      return;
    }
    absl::Status status = Consume();
    if (!status.ok()) {
      FinishWith(status);
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  absl::Status Consume() {
    if (!writer_.has_value()) {
      worker_id_ = request_.worker_id();
      task_id_ = request_.task_id();
      artifact_ = request_.artifact();
      absl::StatusOr<std::string> path =
          scheduler_->BeginArtifactUpload(worker_id_, task_id_, artifact_);
      if (!path.ok()) return path.status();
      absl::StatusOr<AtomicFileWriter> writer = AtomicFileWriter::Open(*path);
      if (!writer.ok()) return writer.status();
      writer_.emplace(std::move(*writer));
    }
    const std::string& data = request_.data();
    if (writer_->bytes_written() + static_cast<int64_t>(data.size()) > artifact_.size_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat("artifact ", artifact_.name(),
                                                     ": more bytes than the declared ",
                                                     artifact_.size_bytes()));
    }
    hash_.Update(data);
    return writer_->Write(data);
  }

  absl::Status Complete() {
    if (!writer_.has_value()) return absl::InvalidArgumentError("upload carried no header");
    if (writer_->bytes_written() != artifact_.size_bytes()) {
      return absl::DataLossError(absl::StrCat("artifact ", artifact_.name(), ": received ",
                                              writer_->bytes_written(), " of ",
                                              artifact_.size_bytes(), " bytes"));
    }
    std::string sha = hash_.Hex();
    if (sha != artifact_.sha256()) {
      return absl::DataLossError(absl::StrCat("artifact ", artifact_.name(), ": sha256 ", sha,
                                              " does not match the declared ", artifact_.sha256()));
    }
    absl::Status committed = writer_->Commit();
    if (!committed.ok()) return committed;
    absl::Status recorded = scheduler_->RecordArtifact(worker_id_, task_id_, artifact_);
    if (recorded.ok()) *response_->mutable_artifact() = artifact_;
    return recorded;
  }

  void FinishWith(const absl::Status& status) {
    writer_.reset();  // an unfinished upload leaves no file behind
    CountRpc(metrics_, "UploadArtifact", status);
    Finish(ToGrpcStatus(status));
  }

  Scheduler* const scheduler_;
  ServerMetrics* const metrics_;
  compress::v1::UploadArtifactResponse* const response_;
  UploadArtifactRequest request_;
  std::string worker_id_;
  std::string task_id_;
  compress::v1::Artifact artifact_;
  std::optional<AtomicFileWriter> writer_;
  Sha256 hash_;
};

}  // namespace

absl::Status WorkerServiceImpl::CheckWorker(const grpc::CallbackServerContext* context) const {
  if (!auth_->enabled()) return absl::OkStatus();
  absl::StatusOr<Principal> caller = auth_->Authenticate(AuthorizationOf(context));
  if (!caller.ok()) return caller.status();
  if (caller->role != Role::kWorker) {
    return absl::PermissionDeniedError("only worker tokens may call WorkerService");
  }
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* WorkerServiceImpl::RegisterWorker(
    grpc::CallbackServerContext* context, const compress::v1::RegisterWorkerRequest* request,
    compress::v1::RegisterWorkerResponse* response) {
  if (absl::Status allowed = CheckWorker(context); !allowed.ok()) {
    return FinishUnary(context, metrics_, "RegisterWorker", allowed);
  }
  absl::StatusOr<compress::v1::RegisterWorkerResponse> result = scheduler_->RegisterWorker(*request);
  if (result.ok()) *response = std::move(*result);
  return FinishUnary(context, metrics_, "RegisterWorker", result.status());
}

grpc::ServerUnaryReactor* WorkerServiceImpl::AcquireTask(
    grpc::CallbackServerContext* context, const compress::v1::AcquireTaskRequest* request,
    compress::v1::AcquireTaskResponse* response) {
  if (absl::Status allowed = CheckWorker(context); !allowed.ok()) {
    return FinishUnary(context, metrics_, "AcquireTask", allowed);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  ServerMetrics* metrics = metrics_;
  scheduler_->AcquireTask(
      *request, [reactor, response, metrics](absl::StatusOr<compress::v1::AcquireTaskResponse> r) {
        if (r.ok()) *response = std::move(*r);
        CountRpc(metrics, "AcquireTask", r.status());
        reactor->Finish(ToGrpcStatus(r.status()));
      });
  return reactor;
}

grpc::ServerUnaryReactor* WorkerServiceImpl::RenewLease(grpc::CallbackServerContext* context,
                                                        const compress::v1::RenewLeaseRequest* request,
                                                        compress::v1::RenewLeaseResponse* response) {
  if (absl::Status allowed = CheckWorker(context); !allowed.ok()) {
    return FinishUnary(context, metrics_, "RenewLease", allowed);
  }
  absl::StatusOr<bool> cancelled = scheduler_->RenewLease(request->worker_id(), request->task_id());
  if (cancelled.ok()) response->set_cancelled(*cancelled);
  return FinishUnary(context, metrics_, "RenewLease", cancelled.status());
}

grpc::ServerUnaryReactor* WorkerServiceImpl::ReportEvents(
    grpc::CallbackServerContext* context, const compress::v1::ReportEventsRequest* request,
    compress::v1::ReportEventsResponse* response) {
  if (absl::Status allowed = CheckWorker(context); !allowed.ok()) {
    return FinishUnary(context, metrics_, "ReportEvents", allowed);
  }
  absl::StatusOr<bool> cancelled = scheduler_->ReportEvents(*request);
  if (cancelled.ok()) response->set_cancelled(*cancelled);
  return FinishUnary(context, metrics_, "ReportEvents", cancelled.status());
}

grpc::ServerReadReactor<UploadArtifactRequest>* WorkerServiceImpl::UploadArtifact(
    grpc::CallbackServerContext* context, compress::v1::UploadArtifactResponse* response) {
  return new UploadReactor(scheduler_, metrics_, response, CheckWorker(context));
}

grpc::ServerUnaryReactor* WorkerServiceImpl::CompleteTask(
    grpc::CallbackServerContext* context, const compress::v1::CompleteTaskRequest* request,
    compress::v1::CompleteTaskResponse* /*response*/) {
  if (absl::Status allowed = CheckWorker(context); !allowed.ok()) {
    return FinishUnary(context, metrics_, "CompleteTask", allowed);
  }
  return FinishUnary(context, metrics_, "CompleteTask", scheduler_->CompleteTask(*request));
}

grpc::ServerWriteReactor<compress::v1::ArtifactChunk>* WorkerServiceImpl::FetchCheckpoint(
    grpc::CallbackServerContext* context, const compress::v1::FetchCheckpointRequest* request) {
  absl::Status status = CheckWorker(context);
  absl::StatusOr<ArtifactLocation> location = absl::InternalError("unset");
  if (status.ok()) {
    location = scheduler_->FindCheckpoint(request->worker_id(), request->task_id(), request->name());
    status = location.status();
  }
  if (status.ok() && (request->offset() < 0 || request->offset() > location->artifact.size_bytes())) {
    status = absl::OutOfRangeError(absl::StrCat("offset ", request->offset(), " is outside 0..",
                                                location->artifact.size_bytes()));
  }
  if (!status.ok()) {
    CountRpc(metrics_, "FetchCheckpoint", status);
    return new FailedStream<compress::v1::ArtifactChunk>(ToGrpcStatus(status));
  }
  return new ArtifactStreamReactor(metrics_, "FetchCheckpoint", std::move(*location),
                                   request->offset());
}

}  // namespace compress::server
