// compress.v1.WorkerService: the RPCs workers dial. Thin, like JobServiceImpl.
#pragma once

#include "common/auth.h"
#include "compress/v1/compress.grpc.pb.h"
#include "server/scheduler.h"

namespace compress::server {

class WorkerServiceImpl final : public compress::v1::WorkerService::CallbackService {
 public:
  WorkerServiceImpl(Scheduler* scheduler, ServerMetrics* metrics, const TokenAuthenticator* auth)
      : scheduler_(scheduler), metrics_(metrics), auth_(auth) {}

  grpc::ServerUnaryReactor* RegisterWorker(grpc::CallbackServerContext* context,
                                           const compress::v1::RegisterWorkerRequest* request,
                                           compress::v1::RegisterWorkerResponse* response) override;
  grpc::ServerUnaryReactor* AcquireTask(grpc::CallbackServerContext* context,
                                        const compress::v1::AcquireTaskRequest* request,
                                        compress::v1::AcquireTaskResponse* response) override;
  grpc::ServerUnaryReactor* RenewLease(grpc::CallbackServerContext* context,
                                       const compress::v1::RenewLeaseRequest* request,
                                       compress::v1::RenewLeaseResponse* response) override;
  grpc::ServerUnaryReactor* ReportEvents(grpc::CallbackServerContext* context,
                                         const compress::v1::ReportEventsRequest* request,
                                         compress::v1::ReportEventsResponse* response) override;
  grpc::ServerReadReactor<compress::v1::UploadArtifactRequest>* UploadArtifact(
      grpc::CallbackServerContext* context,
      compress::v1::UploadArtifactResponse* response) override;
  grpc::ServerUnaryReactor* CompleteTask(grpc::CallbackServerContext* context,
                                         const compress::v1::CompleteTaskRequest* request,
                                         compress::v1::CompleteTaskResponse* response) override;
  grpc::ServerWriteReactor<compress::v1::ArtifactChunk>* FetchCheckpoint(
      grpc::CallbackServerContext* context,
      const compress::v1::FetchCheckpointRequest* request) override;

 private:
  // OK for a worker token, or for anyone when no tokens are configured.
  absl::Status CheckWorker(const grpc::CallbackServerContext* context) const;

  Scheduler* scheduler_;
  ServerMetrics* metrics_;
  const TokenAuthenticator* auth_;
};

}  // namespace compress::server
