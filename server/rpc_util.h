// Finishing RPCs at the edge: absl -> gRPC status, code for code, counted.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "common/grpc_status.h"
#include "server/server_metrics.h"

namespace compress::server {

inline void CountRpc(ServerMetrics* metrics, const char* method, const absl::Status& status) {
  metrics->rpcs.Add({{"method", method}, {"code", absl::StatusCodeToString(status.code())}})
      .Increment();
}

// Finishes a unary call with `status`.
inline grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                             ServerMetrics* metrics, const char* method,
                                             const absl::Status& status) {
  CountRpc(metrics, method, status);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace compress::server
