// Every metric compress-server exports, declared in one place.
#pragma once

#include "common/metrics.h"

namespace compress::server {

struct ServerMetrics {
  explicit ServerMetrics(metrics::Registry& registry);

  metrics::Family<metrics::Counter>& jobs_submitted;     // {tenant}
  metrics::Family<metrics::Counter>& jobs_finished;      // {state}
  metrics::Family<metrics::Gauge>& jobs;                 // {state}
  metrics::Gauge& queue_depth;
  metrics::Gauge& workers_connected;
  metrics::Gauge& workers_busy;
  metrics::Histogram& dispatch_latency_seconds;
  metrics::Counter& lease_expirations;
  metrics::Counter& task_retries;
  metrics::Family<metrics::Counter>& rpcs;               // {method, code}
  metrics::Counter& artifact_bytes_written;
  metrics::Counter& artifact_bytes_served;
};

}  // namespace compress::server
