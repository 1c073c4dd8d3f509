// Every metric compress-worker exports, declared in one place.
#pragma once

#include "common/metrics.h"

namespace compress::worker {

struct WorkerMetrics {
  explicit WorkerMetrics(metrics::Registry& registry);

  metrics::Family<metrics::Counter>& tasks;            // {result}
  metrics::Gauge& busy;
  metrics::Counter& weight_bytes_processed;
  metrics::Family<metrics::Histogram>& stage_seconds;  // {method}
  metrics::Gauge& resident_memory_bytes;
  metrics::Gauge& device_memory_bytes;
};

}  // namespace compress::worker
