#include "server/server_metrics.h"

namespace compress::server {

ServerMetrics::ServerMetrics(metrics::Registry& registry)
    : jobs_submitted(metrics::BuildCounter()
                         .Name("compress_jobs_submitted_total")
                         .Help("Jobs accepted by SubmitJob, by tenant.")
                         .Register(registry)),
      jobs_finished(metrics::BuildCounter()
                        .Name("compress_jobs_finished_total")
                        .Help("Jobs that reached a final state, by state and tenant.")
                        .Register(registry)),
      jobs_deleted(metrics::BuildCounter()
                       .Name("compress_jobs_deleted_total")
                       .Help("Ended jobs removed with their artifacts, by reason (request, retention).")
                       .Register(registry)),
      jobs(metrics::BuildGauge()
               .Name("compress_jobs")
               .Help("Jobs currently in each state.")
               .Register(registry)),
      queue_depth(metrics::BuildGauge()
                      .Name("compress_queue_depth")
                      .Help("Tasks ready to run and waiting for a worker.")
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
      workers_idle(metrics::BuildGauge()
                       .Name("compress_workers_idle")
                       .Help("Connected workers holding no task lease.")
                       .Register(registry)
                       .Add({})),
      task_duration_seconds(metrics::BuildHistogram()
                                .Name("compress_task_duration_seconds")
                                .Help("Time from dispatch to completion of a task attempt, by task "
                                      "kind (TASK_WHOLE, TASK_BLOCKS, TASK_ASSEMBLE) and result.")
                                .Register(registry)),
      rpc_latency_seconds(metrics::BuildHistogram()
                              .Name("compress_rpc_latency_seconds")
                              .Help("Time to handle a unary RPC, by method.")
                              .Register(registry)),
      job_state(metrics::BuildGauge()
                    .Name("compress_job_state")
                    .Help("1 for the state of each job that has not ended.")
                    .Register(registry)),
      job_progress(metrics::BuildGauge()
                       .Name("compress_job_progress_ratio")
                       .Help("Progress of each job that has not ended, 0..1, over all its tasks.")
                       .Register(registry)),
      process_cpu_seconds(metrics::BuildCounter()
                              .Name("compress_server_cpu_seconds_total")
                              .Help("CPU time used by the server process (user + system).")
                              .Register(registry)
                              .Add({})),
      process_resident_memory_bytes(metrics::BuildGauge()
                                        .Name("compress_server_resident_memory_bytes")
                                        .Help("Resident memory of the server process.")
                                        .Register(registry)
                                        .Add({})),
      dispatch_latency_seconds(metrics::BuildHistogram()
                                   .Name("compress_dispatch_latency_seconds")
                                   .Help("Time from a task becoming ready to run to a worker taking it.")
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
                                .Add({})),
      artifact_bytes_stored(metrics::BuildGauge()
                                .Name("compress_artifact_stored_bytes")
                                .Help("Bytes of the artifacts the server keeps for its jobs "
                                      "(until DeleteJob or --retention removes them).")
                                .Register(registry)
                                .Add({})) {}

}  // namespace compress::server
