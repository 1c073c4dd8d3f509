// Every metric compress-server exports, declared in one place.
#pragma once

#include "common/metrics.h"

namespace compress::server {

struct ServerMetrics {
  explicit ServerMetrics(metrics::Registry& registry);

  metrics::Family<metrics::Counter>& jobs_submitted;     // {tenant}
  metrics::Family<metrics::Counter>& jobs_finished;      // {state, tenant}
  metrics::Family<metrics::Counter>& jobs_deleted;       // {reason}: request, retention
  metrics::Family<metrics::Gauge>& jobs;                 // {state}
  metrics::Gauge& queue_depth;
  metrics::Gauge& workers_connected;
  metrics::Gauge& workers_busy;
  metrics::Gauge& workers_idle;
  metrics::Family<metrics::Histogram>& task_duration_seconds;  // {kind, result}
  metrics::Family<metrics::Histogram>& rpc_latency_seconds;    // {method}, unary RPCs
  // Jobs not yet ended: 1 for the job's state; its progress. Series of a
  // job are removed when it ends, so the page stays bounded.
  metrics::Family<metrics::Gauge>& job_state;     // {job_id, state}
  metrics::Family<metrics::Gauge>& job_progress;  // {job_id}
  metrics::Counter& process_cpu_seconds;
  metrics::Gauge& process_resident_memory_bytes;
  metrics::Histogram& dispatch_latency_seconds;
  metrics::Counter& lease_expirations;
  metrics::Counter& task_retries;
  metrics::Family<metrics::Counter>& rpcs;               // {method, code}
  metrics::Counter& artifact_bytes_written;
  metrics::Counter& artifact_bytes_served;
  metrics::Gauge& artifact_bytes_stored;
};

}  // namespace compress::server
