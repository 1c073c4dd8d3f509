// The scheduler: the job lifecycle behind both gRPC services. Holds every job
// in memory, writes each change through to the JobStore before it becomes
// visible, hands queued jobs to waiting workers, and expires leases.
// The gRPC classes stay thin: they check requests and call this.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
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

  const SchedulerConfig& config() const { return config_; }

 private:
  struct WorkerInfo {
    compress::v1::RegisterWorkerRequest registration;
    absl::Time last_seen;
    std::string task_id;
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
  // The next job to dispatch: highest priority; within it, the tenant with
  // the fewest running jobs; then the oldest.
  std::set<QueueKey>::iterator PickNextLocked();

  // Appends an event to `stored` (sequence, time) and to `events`.
  void AddEvent(StoredJob& stored, compress::v1::JobEvent event,
                std::vector<compress::v1::JobEvent>* events);
  void AddStateChange(StoredJob& stored, compress::v1::JobState state, const std::string& reason,
                      std::vector<compress::v1::JobEvent>* events);
  // Writes through the store, then replaces the in-memory job.
  absl::Status CommitLocked(StoredJob updated, const std::vector<compress::v1::JobEvent>& events);
  absl::StatusOr<StoredJob*> FindJobLocked(const std::string& tenant, const std::string& job_id);
  absl::StatusOr<StoredJob*> FindLeaseLocked(const std::string& worker_id,
                                             const std::string& task_id);
  // The spec's model, calibration and evaluation paths resolved under the
  // model roots (empty where the spec has none).
  struct ResolvedPaths {
    std::string model;
    std::string calibration;
    std::string evaluation;
  };
  absl::Status CheckModelPaths(const compress::v1::JobSpec& spec, ResolvedPaths* paths) const;
  void Notify(const std::vector<std::string>& job_ids);
  std::string ArtifactPath(const std::string& job_id, const std::string& name) const;

  const SchedulerConfig config_;
  const std::unique_ptr<JobStore> store_;
  ServerMetrics* const metrics_;

  std::mutex mu_;
  std::map<std::string, StoredJob> jobs_;
  std::map<std::pair<std::string, std::string>, std::string> request_ids_;  // (tenant, id) -> job
  std::set<QueueKey> queue_;
  std::map<std::string, absl::Time> queued_since_;
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
