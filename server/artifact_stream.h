// Server-side streams shared by both services: a file sent in chunks
// (DownloadArtifact for clients, FetchCheckpoint for workers), and a stream
// that fails before it starts.
#pragma once

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "compress/v1/compress.pb.h"
#include "server/rpc_util.h"
#include "server/scheduler.h"
#include "server/server_metrics.h"

namespace compress::server {

// Sends one artifact in 1 MiB chunks from the requested offset.
class ArtifactStreamReactor : public grpc::ServerWriteReactor<compress::v1::ArtifactChunk> {
 public:
  ArtifactStreamReactor(ServerMetrics* metrics, std::string rpc, ArtifactLocation location,
                        int64_t offset)
      : metrics_(metrics), rpc_(std::move(rpc)), location_(std::move(location)), offset_(offset) {
    in_.open(location_.path, std::ios::binary);
    if (!in_) {
      FinishWith(absl::DataLossError(absl::StrCat("artifact ", location_.artifact.name(),
                                                  " is recorded but its file is missing")));
      return;
    }
    in_.seekg(offset_);
    NextChunk();
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      FinishWith(absl::CancelledError("client went away"));
      return;
    }
    metrics_->artifact_bytes_served.Increment(static_cast<double>(chunk_.data().size()));
    NextChunk();
  }

  void OnDone() override { delete this; }

 private:
  static constexpr int64_t kChunkBytes = 1 << 20;

  void NextChunk() {
    const int64_t total = location_.artifact.size_bytes();
    if (offset_ >= total) {
      FinishWith(absl::OkStatus());
      return;
    }
    const size_t want = static_cast<size_t>(std::min<int64_t>(kChunkBytes, total - offset_));
    std::string data(want, '\0');
    in_.read(data.data(), static_cast<std::streamsize>(want));
    if (static_cast<size_t>(in_.gcount()) != want) {
      FinishWith(absl::DataLossError(absl::StrCat("artifact ", location_.artifact.name(),
                                                  " is shorter than recorded")));
      return;
    }
    chunk_.Clear();
    chunk_.set_offset(offset_);
    chunk_.set_total_size(total);
    chunk_.set_sha256(location_.artifact.sha256());
    *chunk_.mutable_data() = std::move(data);
    offset_ += static_cast<int64_t>(want);
    StartWrite(&chunk_);
  }

  void FinishWith(const absl::Status& status) {
    CountRpc(metrics_, rpc_.c_str(), status);
    Finish(ToGrpcStatus(status));
  }

  ServerMetrics* const metrics_;
  const std::string rpc_;
  const ArtifactLocation location_;
  int64_t offset_;
  std::ifstream in_;
  compress::v1::ArtifactChunk chunk_;
};

// A stream that fails before it starts.
template <typename T>
class FailedStream : public grpc::ServerWriteReactor<T> {
 public:
  explicit FailedStream(const grpc::Status& status) { this->Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace compress::server
