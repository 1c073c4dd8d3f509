// JobService calls the end-to-end tests make against a real server.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include "absl/status/statusor.h"
#include "common/recipe.h"
#include "compress/v1/compress.grpc.pb.h"

namespace compress::testing {

// Submits `recipe` (the JobSpec as YAML or JSON); the new job's id, or ""
// with a test failure when the recipe or the server refuses it.
inline std::string SubmitRecipe(compress::v1::JobService::StubInterface* jobs,
                                const std::string& recipe, const std::string& request_id = "") {
  absl::StatusOr<compress::v1::JobSpec> spec = ParseRecipe(recipe);
  EXPECT_TRUE(spec.ok()) << spec.status();
  if (!spec.ok()) return "";
  compress::v1::SubmitJobRequest request;
  *request.mutable_spec() = *std::move(spec);
  request.set_request_id(request_id);
  compress::v1::SubmitJobResponse response;
  grpc::ClientContext context;
  grpc::Status status = jobs->SubmitJob(&context, request, &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return response.job().id();
}

// The job, or UNAVAILABLE with the server's message (within 5 s).
inline absl::StatusOr<compress::v1::Job> GetJob(compress::v1::JobService::StubInterface* jobs,
                                                const std::string& id) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  compress::v1::GetJobRequest request;
  request.set_job_id(id);
  compress::v1::Job job;
  grpc::Status status = jobs->GetJob(&context, request, &job);
  if (!status.ok()) return absl::UnavailableError(status.error_message());
  return job;
}

// An artifact's bytes, downloaded whole.
inline std::string DownloadArtifact(compress::v1::JobService::StubInterface* jobs,
                                    const std::string& id, const std::string& name) {
  grpc::ClientContext context;
  compress::v1::DownloadArtifactRequest request;
  request.set_job_id(id);
  request.set_name(name);
  auto reader = jobs->DownloadArtifact(&context, request);
  std::string data;
  compress::v1::ArtifactChunk chunk;
  while (reader->Read(&chunk)) data += chunk.data();
  EXPECT_TRUE(reader->Finish().ok());
  return data;
}

}  // namespace compress::testing
