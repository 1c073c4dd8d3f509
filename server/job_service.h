// compress.v1.JobService over the callback API: checks requests, calls the
// Scheduler, converts statuses code for code.
#pragma once

#include "common/auth.h"
#include "compress/v1/compress.grpc.pb.h"
#include "server/scheduler.h"

namespace compress::server {

class JobServiceImpl final : public compress::v1::JobService::CallbackService {
 public:
  JobServiceImpl(Scheduler* scheduler, ServerMetrics* metrics, const TokenAuthenticator* auth)
      : scheduler_(scheduler), metrics_(metrics), auth_(auth) {}

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
  grpc::ServerUnaryReactor* PauseJob(grpc::CallbackServerContext* context,
                                     const compress::v1::PauseJobRequest* request,
                                     compress::v1::Job* response) override;
  grpc::ServerUnaryReactor* ResumeJob(grpc::CallbackServerContext* context,
                                      const compress::v1::ResumeJobRequest* request,
                                      compress::v1::Job* response) override;
  grpc::ServerUnaryReactor* DeleteJob(grpc::CallbackServerContext* context,
                                      const compress::v1::DeleteJobRequest* request,
                                      compress::v1::DeleteJobResponse* response) override;
  grpc::ServerWriteReactor<compress::v1::JobEvent>* WatchJob(
      grpc::CallbackServerContext* context, const compress::v1::WatchJobRequest* request) override;
  grpc::ServerWriteReactor<compress::v1::ArtifactChunk>* DownloadArtifact(
      grpc::CallbackServerContext* context,
      const compress::v1::DownloadArtifactRequest* request) override;

 private:
  // Who is calling: a client or admin token (a worker token is refused).
  absl::StatusOr<Principal> Caller(const grpc::CallbackServerContext* context) const;
  // A unary RPC: authenticates the caller, runs `call(caller)`, moves its
  // result into `response` and finishes (counted under `method`).
  template <typename Response, typename Call>
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* context, const char* method,
                                  Response* response, Call call);

  Scheduler* scheduler_;
  ServerMetrics* metrics_;
  const TokenAuthenticator* auth_;
};

// The `authorization` metadata of a call, or "".
std::string AuthorizationOf(const grpc::CallbackServerContext* context);

// The tenant whose jobs a caller may see: its own, or every tenant ("") for
// an admin.
inline std::string ReadScope(const Principal& caller) {
  return caller.role == Role::kAdmin ? "" : caller.tenant;
}

}  // namespace compress::server
