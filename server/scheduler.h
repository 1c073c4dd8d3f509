// The scheduler: the job lifecycle behind both gRPC services. Holds every job
// in memory, writes each change through to the JobStore before it becomes
// visible, hands queued jobs to waiting workers, and expires leases.
// The gRPC classes stay thin: they check requests and call this.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "compress/v1/compress.pb.h"
#include "server/job_store.h"
#include "server/planner.h"
#include "server/server_metrics.h"

namespace compress::server {

struct SchedulerConfig {
  std::vector<std::string> model_roots;
  std::string artifact_dir;
  absl::Duration lease_timeout = absl::Seconds(15);
  int max_attempts = 5;                        // dispatches before a job fails
  int max_failed_attempts = 3;                 // retryable failures before a job fails
  int64_t max_artifact_bytes = int64_t{1} << 40;
  int64_t max_spec_bytes = 1 << 20;
  PlannerConfig planner;
  // The most memory a worker may offer: a task estimated above it could
  // never run, and its job is refused at submit.
  int64_t max_task_memory_bytes = int64_t{256} << 30;
  // Ended jobs are deleted (record, events, artifacts) this long after they
  // end; zero keeps them until DeleteJob.
  absl::Duration retention = absl::ZeroDuration();
};

// Told when a job gets new events. Called with no scheduler lock held.
class EventListener {
 public:
  virtual ~EventListener() = default;
  virtual void OnNewEvents() = 0;
};

struct EventBatch {
  std::vector<compress::v1::JobEvent> events;
  bool job_ended = false;
  int64_t last_sequence = 0;
};

struct ArtifactLocation {
  std::string path;
  compress::v1::Artifact artifact;
};

using AcquireCallback = std::function<void(absl::StatusOr<compress::v1::AcquireTaskResponse>)>;

class Scheduler {
 public:
  // Loads every job from the store. Jobs that were RUNNING keep their lease,
  // extended by one lease timeout so their worker can reconnect.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(SchedulerConfig config,
                                                           std::unique_ptr<JobStore> store,
                                                           ServerMetrics* metrics);
  ~Scheduler();

  // Starts the thread that dispatches and expires leases.
  void Start();
  void Stop();

  // ---- JobService. `tenant` scopes every read: "" (an admin) sees all.
  absl::StatusOr<compress::v1::SubmitJobResponse> SubmitJob(
      const std::string& tenant, const compress::v1::SubmitJobRequest& request);
  absl::StatusOr<compress::v1::Job> GetJob(const std::string& tenant, const std::string& job_id);
  absl::StatusOr<compress::v1::ListJobsResponse> ListJobs(
      const std::string& tenant, const compress::v1::ListJobsRequest& request);
  absl::StatusOr<compress::v1::Job> CancelJob(const std::string& tenant, const std::string& job_id);
  // Pause stops the job's running tasks (their workers lose the lease and
  // stop; finished blocks are kept) and holds the rest; Resume queues them.
  absl::StatusOr<compress::v1::Job> PauseJob(const std::string& tenant, const std::string& job_id);
  absl::StatusOr<compress::v1::Job> ResumeJob(const std::string& tenant, const std::string& job_id);
  // Removes an ended job: its record and events, then its artifacts and
  // checkpoints. FAILED_PRECONDITION for a job that has not ended.
  absl::StatusOr<compress::v1::DeleteJobResponse> DeleteJob(const std::string& tenant,
                                                            const std::string& job_id);
  absl::StatusOr<EventBatch> ReadEvents(const std::string& tenant, const std::string& job_id,
                                        int64_t from_sequence, int limit);
  absl::StatusOr<ArtifactLocation> FindArtifact(const std::string& tenant,
                                                const std::string& job_id,
                                                const std::string& name);

  // Listeners are held weakly; a listener that is gone is dropped.
  absl::StatusOr<int64_t> Subscribe(const std::string& tenant, const std::string& job_id,
                                    std::weak_ptr<EventListener> listener);
  void Unsubscribe(const std::string& job_id, int64_t subscription);

  // ---- WorkerService
  absl::StatusOr<compress::v1::RegisterWorkerResponse> RegisterWorker(
      const compress::v1::RegisterWorkerRequest& request);
  // Long poll: `done` runs exactly once, on this thread or the dispatcher's.
  void AcquireTask(const compress::v1::AcquireTaskRequest& request, AcquireCallback done);
  // Returns whether the job was cancelled. FAILED_PRECONDITION when the
  // worker no longer holds this task's lease: it must stop and drop its work.
  absl::StatusOr<bool> RenewLease(const std::string& worker_id, const std::string& task_id);
  absl::StatusOr<bool> ReportEvents(const compress::v1::ReportEventsRequest& request);
  // Checks the lease and the name; returns the path the artifact goes to.
  absl::StatusOr<std::string> BeginArtifactUpload(const std::string& worker_id,
                                                  const std::string& task_id,
                                                  const compress::v1::Artifact& artifact);
  absl::Status RecordArtifact(const std::string& worker_id, const std::string& task_id,
                              const compress::v1::Artifact& artifact);
  absl::Status CompleteTask(const compress::v1::CompleteTaskRequest& request);
  // A block checkpoint of the task's job, for the worker holding the lease.
  absl::StatusOr<ArtifactLocation> FindCheckpoint(const std::string& worker_id,
                                                  const std::string& task_id,
                                                  const std::string& name);

  const SchedulerConfig& config() const { return config_; }

 private:
  struct WorkerInfo {
    compress::v1::RegisterWorkerRequest registration;
    absl::Time last_seen;
    std::string task_id;  // the lease it holds, if any
  };
  // A held lease: the job and the index of its task.
  struct Lease {
    StoredJob* stored;
    int index;
  };
  struct Waiter {
    std::string worker_id;
    absl::Time deadline;
    AcquireCallback done;
  };
  // Ordered by priority (high first), then age.
  using QueueKey = std::tuple<int, int64_t, std::string>;

  Scheduler(SchedulerConfig config, std::unique_ptr<JobStore> store, ServerMetrics* metrics);

  void DispatchLoop();
  // Each returns callbacks to run after the lock is released.
  void ExpireLeasesLocked(absl::Time now, std::vector<std::string>* changed);
  void MatchWaitersLocked(absl::Time now, std::vector<std::function<void()>>* calls,
                          std::vector<std::string>* changed);
  void UpdateGaugesLocked(absl::Time now);
  // The attempt's time from dispatch, into the task duration histogram.
  void ObserveTaskDuration(const compress::v1::JobTask& task, const std::string& result,
                           absl::Time now);
  // The next task for a worker with `memory_bytes` (0: unknown, anything
  // fits): the highest priority that has one that fits; within it, the
  // tenant with the fewest running tasks; then the oldest job. Null when
  // nothing fits.
  std::optional<std::pair<std::string, int>> PickTaskLocked(
      int64_t memory_bytes, const std::map<std::string, int>& running_by_tenant);
  // Runs task `index` of the job on the waiter's worker.
  absl::Status DispatchLocked(const std::string& job_id, int index, const std::string& worker_id,
                              absl::Time now, compress::v1::AcquireTaskResponse* response);
  // Queued tasks no connected worker has room for: their job says why.
  void NoteUnplaceableLocked(absl::Time now, std::vector<std::string>* changed);
  // Keeps queue_ in step with the job: in it while it has a task to dispatch.
  void RequeueLocked(const StoredJob& stored, absl::Time now);
  // The job's state and progress from its tasks (not for ended or paused
  // jobs); a state change becomes an event with `reason`.
  void SyncJobStateLocked(StoredJob& stored, const std::string& reason,
                          std::vector<compress::v1::JobEvent>* events);

  // Appends an event to `stored` (sequence, time) and to `events`.
  void AddEvent(StoredJob& stored, compress::v1::JobEvent event,
                std::vector<compress::v1::JobEvent>* events);
  void AddStateChange(StoredJob& stored, compress::v1::JobState state, const std::string& reason,
                      std::vector<compress::v1::JobEvent>* events);
  // Writes through the store, then replaces the in-memory job.
  absl::Status CommitLocked(StoredJob updated, const std::vector<compress::v1::JobEvent>& events);
  absl::StatusOr<StoredJob*> FindJobLocked(const std::string& tenant, const std::string& job_id);
  // The lease `task_id` held by `worker_id`: FAILED_PRECONDITION when it is
  // no longer theirs. A cancelled job's lease is still found (its worker
  // learns of the cancellation through it).
  absl::StatusOr<Lease> FindLeaseLocked(const std::string& worker_id, const std::string& task_id);
  // The spec's model, calibration and evaluation paths resolved under the
  // model roots (empty where the spec has none).
  struct ResolvedPaths {
    std::string model;
    std::string calibration;
    std::string evaluation;
    ModelShape shape;  // from the model's headers and config.json
  };
  absl::Status CheckModelPaths(const compress::v1::JobSpec& spec, ResolvedPaths* paths) const;
  // Resolution alone (model, calibration, evaluation): no file is read.
  absl::Status ResolvePaths(const compress::v1::JobSpec& spec, ResolvedPaths* paths) const;
  void Notify(const std::vector<std::string>& job_ids);
  // Deletes an ended job from the store and memory. Its artifact folder is
  // first moved aside (the job can still be restored if the store refuses);
  // the moved folder, to remove without the lock, goes to `trash`.
  absl::Status DeleteJobLocked(const std::string& job_id, const std::string& reason,
                               std::vector<std::string>* trash);
  // Ended jobs past the retention, deleted; their folders go to `trash`.
  void ApplyRetentionLocked(absl::Time now, std::vector<std::string>* trash);
  // Folders a delete moved aside before a crash: put back under a job that
  // is still stored, removed otherwise.
  void RecoverDeletedFoldersLocked();
  std::string ArtifactPath(const std::string& job_id, const std::string& name) const;

  const SchedulerConfig config_;
  const std::unique_ptr<JobStore> store_;
  ServerMetrics* const metrics_;

  std::mutex mu_;
  std::map<std::string, StoredJob> jobs_;
  // ListJobs' order, newest first: (create time in microseconds, id). A
  // job's create time never changes, so an entry is added once, with the job.
  using ListKey = std::pair<int64_t, std::string>;
  using ListIndex = std::set<ListKey, std::greater<ListKey>>;
  ListIndex list_all_;
  std::map<std::string, ListIndex> list_by_tenant_;
  void IndexForListingLocked(const compress::v1::Job& job);
  std::map<std::pair<std::string, std::string>, std::string> request_ids_;  // (tenant, id) -> job
  std::set<QueueKey> queue_;  // jobs with a task to dispatch
  // Tenants with a job in queue_, per priority key: how many jobs each.
  std::map<int, std::map<std::string, int>> queued_tenants_;
  std::map<std::pair<std::string, int>, absl::Time> queued_since_;  // (job, task)
  std::map<std::string, absl::Time> lease_expiry_;                  // lease -> expiry
  std::map<std::string, absl::Time> dispatched_at_;                 // lease -> dispatch time
  std::map<std::string, compress::v1::JobState> exported_states_;   // job -> state on /metrics
  absl::Time last_placement_check_;
  absl::Time last_retention_check_;
  absl::Time last_gauge_update_;
  std::map<std::string, WorkerInfo> workers_;
  std::vector<Waiter> waiters_;
  bool stopping_ = false;
  std::condition_variable wake_;
  std::thread dispatcher_;

  std::mutex listeners_mu_;
  int64_t next_subscription_ = 1;
  std::map<std::string, std::map<int64_t, std::weak_ptr<EventListener>>> listeners_;
};

bool IsTerminal(compress::v1::JobState state);

}  // namespace compress::server
