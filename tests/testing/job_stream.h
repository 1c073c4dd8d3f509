// Reads a job's whole event stream (WatchJob until the server ends it).
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <vector>

#include "compress/v1/compress.grpc.pb.h"

namespace compress::testing {

inline std::vector<compress::v1::JobEvent> WatchToEnd(
    compress::v1::JobService::StubInterface* jobs, const std::string& job_id,
    int64_t from_sequence = 0, std::chrono::seconds timeout = std::chrono::seconds(120)) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  compress::v1::WatchJobRequest request;
  request.set_job_id(job_id);
  request.set_from_sequence(from_sequence);
  auto reader = jobs->WatchJob(&context, request);
  std::vector<compress::v1::JobEvent> events;
  compress::v1::JobEvent event;
  while (reader->Read(&event)) events.push_back(event);
  grpc::Status status = reader->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  return events;
}

// Sequences must run 1, 2, 3 ... from `first` with no gap.
inline void ExpectGapFree(const std::vector<compress::v1::JobEvent>& events, int64_t first = 1) {
  for (size_t i = 0; i < events.size(); ++i) {
    ASSERT_EQ(events[i].sequence(), first + static_cast<int64_t>(i)) << "event " << i;
  }
}

}  // namespace compress::testing
