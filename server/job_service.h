// compress.v1.JobService over the callback API: checks requests, calls the
// Scheduler, converts statuses code for code.
#pragma once

#include "compress/v1/compress.grpc.pb.h"
#include "server/scheduler.h"

namespace compress::server {

class JobServiceImpl final : public compress::v1::JobService::CallbackService {
 public:
  JobServiceImpl(Scheduler* scheduler, ServerMetrics* metrics)
      : scheduler_(scheduler), metrics_(metrics) {}

  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const compress::v1::SubmitJobRequest* request,
                                      compress::v1::SubmitJobResponse* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const compress::v1::GetJobRequest* request,
                                   compress::v1::Job* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const compress::v1::ListJobsRequest* request,
                                     compress::v1::ListJobsResponse* response) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const compress::v1::CancelJobRequest* request,
                                      compress::v1::Job* response) override;
  grpc::ServerWriteReactor<compress::v1::JobEvent>* WatchJob(
      grpc::CallbackServerContext* context, const compress::v1::WatchJobRequest* request) override;
  grpc::ServerWriteReactor<compress::v1::ArtifactChunk>* DownloadArtifact(
      grpc::CallbackServerContext* context,
      const compress::v1::DownloadArtifactRequest* request) override;

 private:
  Scheduler* scheduler_;
  ServerMetrics* metrics_;
};

// The tenant a call acts for. One tenant until tokens are configured.
std::string TenantOf(const grpc::CallbackServerContext* context);

}  // namespace compress::server
