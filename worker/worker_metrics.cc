#include "worker/worker_metrics.h"

namespace compress::worker {

WorkerMetrics::WorkerMetrics(metrics::Registry& registry)
    : tasks(metrics::BuildCounter()
                .Name("compress_worker_tasks_total")
                .Help("Tasks this worker finished, by result (succeeded, failed, cancelled, lost).")
                .Register(registry)),
      busy(metrics::BuildGauge()
               .Name("compress_worker_busy")
               .Help("1 while the worker runs a task.")
               .Register(registry)
               .Add({})),
      weight_bytes_processed(metrics::BuildCounter()
                                 .Name("compress_worker_weight_processed_bytes_total")
                                 .Help("Bytes of weights read by compression stages.")
                                 .Register(registry)
                                 .Add({})),
      stage_seconds(metrics::BuildHistogram()
                        .Name("compress_worker_stage_seconds")
                        .Help("Duration of each compression stage, by method.")
                        .Register(registry)),
      resident_memory_bytes(metrics::BuildGauge()
                                .Name("compress_worker_resident_memory_bytes")
                                .Help("Resident memory of the worker process.")
                                .Register(registry)
                                .Add({})),
      device_memory_bytes(metrics::BuildGauge()
                              .Name("compress_worker_device_memory_bytes")
                              .Help("Memory of the worker's device that tasks may use.")
                              .Register(registry)
                              .Add({})) {}

}  // namespace compress::worker
