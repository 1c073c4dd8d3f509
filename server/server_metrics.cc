#include "server/server_metrics.h"

namespace compress::server {

ServerMetrics::ServerMetrics(metrics::Registry& registry)
    : jobs_submitted(metrics::BuildCounter()
                         .Name("compress_jobs_submitted_total")
                         .Help("Jobs accepted by SubmitJob, by tenant.")
                         .Register(registry)),
      jobs_finished(metrics::BuildCounter()
                        .Name("compress_jobs_finished_total")
                        .Help("Jobs that reached a final state, by state.")
                        .Register(registry)),
      jobs(metrics::BuildGauge()
               .Name("compress_jobs")
               .Help("Jobs currently in each state.")
               .Register(registry)),
      queue_depth(metrics::BuildGauge()
                      .Name("compress_queue_depth")
                      .Help("Jobs waiting for a worker.")
                      .Register(registry)
                      .Add({})),
      workers_connected(metrics::BuildGauge()
                            .Name("compress_workers_connected")
                            .Help("Workers seen within the lease timeout.")
                            .Register(registry)
                            .Add({})),
      workers_busy(metrics::BuildGauge()
                       .Name("compress_workers_busy")
                       .Help("Connected workers holding a task lease.")
                       .Register(registry)
                       .Add({})),
      dispatch_latency_seconds(metrics::BuildHistogram()
                                   .Name("compress_dispatch_latency_seconds")
                                   .Help("Time from a job becoming queued to a worker taking it.")
                                   .Register(registry)
                                   .Add({}, metrics::DefaultLatencyBuckets())),
      lease_expirations(metrics::BuildCounter()
                            .Name("compress_lease_expirations_total")
                            .Help("Task leases that lapsed because a worker stopped renewing.")
                            .Register(registry)
                            .Add({})),
      task_retries(metrics::BuildCounter()
                       .Name("compress_task_retries_total")
                       .Help("Tasks put back in the queue after a failed attempt.")
                       .Register(registry)
                       .Add({})),
      rpcs(metrics::BuildCounter()
               .Name("compress_rpcs_total")
               .Help("RPCs handled, by method and gRPC status code.")
               .Register(registry)),
      artifact_bytes_written(metrics::BuildCounter()
                                 .Name("compress_artifact_written_bytes_total")
                                 .Help("Artifact bytes received from workers and stored.")
                                 .Register(registry)
                                 .Add({})),
      artifact_bytes_served(metrics::BuildCounter()
                                .Name("compress_artifact_served_bytes_total")
                                .Help("Artifact bytes sent to clients by DownloadArtifact.")
                                .Register(registry)
                                .Add({})) {}

}  // namespace compress::server
