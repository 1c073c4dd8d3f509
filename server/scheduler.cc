#include "server/scheduler.h"

#include <algorithm>
#include <filesystem>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "common/paths.h"
#include "common/recipe.h"
#include "common/safetensors_header.h"
#include "common/stage_targets.h"
#include "common/status_macros.h"
#include "google/protobuf/util/message_differencer.h"
#include "google/protobuf/util/time_util.h"

namespace compress::server {
namespace {

using compress::v1::AcquireTaskResponse;
using compress::v1::Artifact;
using compress::v1::Job;
using compress::v1::JobEvent;
using compress::v1::JobState;
using google::protobuf::util::TimeUtil;

constexpr int kDefaultPageSize = 50;
constexpr int kMaxPageSize = 1000;
constexpr size_t kMaxEventsPerReport = 1000;

int64_t ToMicros(absl::Time t) { return absl::ToUnixMicros(t); }

google::protobuf::Timestamp ToProto(absl::Time t) {
  return TimeUtil::MicrosecondsToTimestamp(ToMicros(t));
}

int64_t CreateMicros(const Job& job) { return TimeUtil::TimestampToMicroseconds(job.create_time()); }

std::string NewJobId() {
  static std::mutex mu;
  static std::mt19937_64 rng(std::random_device{}());
  std::lock_guard<std::mutex> lock(mu);
  return absl::StrFormat("job-%016x", rng());
}

std::string TaskId(const Job& job) { return absl::StrCat(job.id(), "-a", job.attempts()); }

// Failures that another attempt, maybe on another worker, may not repeat.
// The rest (a bad recipe, a malformed model) would fail the same way again.
bool IsRetryable(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kDeadlineExceeded:
      return true;
    default:
      return false;
  }
}

}  // namespace

bool IsTerminal(JobState state) {
  return state == compress::v1::SUCCEEDED || state == compress::v1::FAILED ||
         state == compress::v1::CANCELLED;
}

Scheduler::Scheduler(SchedulerConfig config, std::unique_ptr<JobStore> store,
                     ServerMetrics* metrics)
    : config_(std::move(config)), store_(std::move(store)), metrics_(metrics) {}

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(SchedulerConfig config,
                                                             std::unique_ptr<JobStore> store,
                                                             ServerMetrics* metrics) {
  ASSIGN_OR_RETURN(std::vector<StoredJob> loaded, store->LoadJobs());
  std::unique_ptr<Scheduler> scheduler(
      new Scheduler(std::move(config), std::move(store), metrics));
  absl::Time now = absl::Now();
  int running = 0;
  for (StoredJob& stored : loaded) {
    const Job& job = stored.job;
    std::string id = job.id();
    if (!job.request_id().empty()) {
      scheduler->request_ids_[{job.tenant(), job.request_id()}] = id;
    }
    if (job.state() == compress::v1::QUEUED) {
      scheduler->queue_.insert({-job.spec().priority(), CreateMicros(job), id});
      scheduler->queued_since_[id] = now;
    } else if (job.state() == compress::v1::RUNNING) {
      // Give the worker one lease timeout to find the restarted server.
      stored.lease_expiry_micros =
          std::max(stored.lease_expiry_micros, ToMicros(now + scheduler->config_.lease_timeout));
      ++running;
    }
    scheduler->jobs_[id] = std::move(stored);
  }
  LOG_INFO("job store loaded", {{"jobs", std::to_string(scheduler->jobs_.size())},
                                {"queued", std::to_string(scheduler->queue_.size())},
                                {"running", std::to_string(running)}});
  return scheduler;
}

Scheduler::~Scheduler() { Stop(); }

void Scheduler::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (dispatcher_.joinable()) return;
  dispatcher_ = std::thread([this] { DispatchLoop(); });
}

void Scheduler::Stop() {
  std::vector<Waiter> waiters;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    waiters.swap(waiters_);
  }
  wake_.notify_all();
  if (dispatcher_.joinable()) dispatcher_.join();
  for (Waiter& w : waiters) w.done(absl::UnavailableError("server is shutting down"));
}

// ------------------------------------------------------------------ events

void Scheduler::AddEvent(StoredJob& stored, JobEvent event, std::vector<JobEvent>* events) {
  Job& job = stored.job;
  event.set_job_id(job.id());
  event.set_sequence(job.last_sequence() + 1);
  *event.mutable_time() = ToProto(absl::Now());
  job.set_last_sequence(event.sequence());
  events->push_back(std::move(event));
}

void Scheduler::AddStateChange(StoredJob& stored, JobState state, const std::string& reason,
                               std::vector<JobEvent>* events) {
  Job& job = stored.job;
  job.set_state(state);
  if (!reason.empty()) job.set_message(reason);
  absl::Time now = absl::Now();
  if (state == compress::v1::RUNNING && !job.has_start_time()) *job.mutable_start_time() = ToProto(now);
  if (IsTerminal(state)) {
    *job.mutable_end_time() = ToProto(now);
    stored.task_id.clear();
    stored.lease_expiry_micros = 0;
    metrics_->jobs_finished.Add({{"state", JobState_Name(state)}}).Increment();
  }
  JobEvent event;
  event.mutable_state()->set_state(state);
  event.mutable_state()->set_reason(reason);
  AddEvent(stored, std::move(event), events);
  LOG_INFO("job state", {{"job", job.id()}, {"state", JobState_Name(state)}, {"reason", reason}});
}

absl::Status Scheduler::CommitLocked(StoredJob updated, const std::vector<JobEvent>& events) {
  RETURN_IF_ERROR(store_->Commit(updated, events));
  std::string id = updated.job.id();
  jobs_[id] = std::move(updated);
  return absl::OkStatus();
}

void Scheduler::Notify(const std::vector<std::string>& job_ids) {
  std::vector<std::shared_ptr<EventListener>> to_call;
  {
    std::lock_guard<std::mutex> lock(listeners_mu_);
    for (const std::string& id : job_ids) {
      auto it = listeners_.find(id);
      if (it == listeners_.end()) continue;
      for (auto l = it->second.begin(); l != it->second.end();) {
        if (auto listener = l->second.lock()) {
          to_call.push_back(std::move(listener));
          ++l;
        } else {
          l = it->second.erase(l);
        }
      }
    }
  }
  for (auto& listener : to_call) listener->OnNewEvents();
}

absl::StatusOr<int64_t> Scheduler::Subscribe(const std::string& tenant, const std::string& job_id,
                                             std::weak_ptr<EventListener> listener) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    RETURN_IF_ERROR(FindJobLocked(tenant, job_id).status());
  }
  std::lock_guard<std::mutex> lock(listeners_mu_);
  int64_t id = next_subscription_++;
  listeners_[job_id][id] = std::move(listener);
  return id;
}

void Scheduler::Unsubscribe(const std::string& job_id, int64_t subscription) {
  std::lock_guard<std::mutex> lock(listeners_mu_);
  auto it = listeners_.find(job_id);
  if (it == listeners_.end()) return;
  it->second.erase(subscription);
  if (it->second.empty()) listeners_.erase(it);
}

// ------------------------------------------------------------------ JobService

absl::StatusOr<StoredJob*> Scheduler::FindJobLocked(const std::string& tenant,
                                                    const std::string& job_id) {
  auto it = jobs_.find(job_id);
  // Another tenant's job is indistinguishable from a missing one.
  if (it == jobs_.end() || (!tenant.empty() && it->second.job.tenant() != tenant)) {
    return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  }
  return &it->second;
}

absl::Status Scheduler::CheckModelPaths(const compress::v1::JobSpec& spec,
                                        ResolvedPaths* paths) const {
  std::string* model_path = &paths->model;
  auto resolve = [&](const std::string& path, const char* field) -> absl::StatusOr<std::string> {
    absl::StatusOr<std::string> resolved = ResolveUnderRoots(path, config_.model_roots);
    if (resolved.ok()) return resolved;
    // A path outside the roots is a bad request, not a missing credential.
    absl::StatusCode code = resolved.status().code() == absl::StatusCode::kPermissionDenied
                                ? absl::StatusCode::kInvalidArgument
                                : resolved.status().code();
    return absl::Status(code, absl::StrCat(field, ": ", resolved.status().message()));
  };
  ASSIGN_OR_RETURN(*model_path, resolve(spec.model().path(), "model.path"));
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(*model_path, ec)) {
    bool has_weights = fs::exists(fs::path(*model_path) / "model.safetensors", ec) ||
                       fs::exists(fs::path(*model_path) / "model.safetensors.index.json", ec);
    if (!has_weights) {
      return absl::NotFoundError(absl::StrCat("model.path: ", spec.model().path(),
                                              " has no model.safetensors or "
                                              "model.safetensors.index.json"));
    }
  } else if (fs::path(*model_path).extension() != ".safetensors") {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.path: ", spec.model().path(), " is neither a model folder nor a .safetensors file"));
  }
  // Headers only (no tensor data): a malformed checkpoint is rejected here,
  // before any worker spends time on it.
  std::vector<fs::path> files;
  if (fs::is_directory(*model_path, ec)) {
    for (const auto& entry : fs::directory_iterator(*model_path, ec)) {
      if (entry.path().extension() == ".safetensors") files.push_back(entry.path());
    }
  } else {
    files.push_back(*model_path);
  }
  std::vector<SafetensorsTensorInfo> tensors;
  for (const fs::path& file : files) {
    absl::StatusOr<SafetensorsHeader> header = ReadSafetensorsHeader(file.string());
    if (!header.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("model.path: ", header.status().message()));
    }
    for (SafetensorsTensorInfo& t : header->tensors) tensors.push_back(std::move(t));
  }
  // Patterns that select nothing and group sizes that do not fit are the
  // recipe's mistakes: named now, before a worker starts.
  RETURN_IF_ERROR(CheckStagesAgainstTensors(spec, tensors));
  if (!spec.calibration().path().empty()) {
    ASSIGN_OR_RETURN(paths->calibration, resolve(spec.calibration().path(), "calibration.path"));
    // Every token takes at least one byte of text (four in a .tokens file):
    // a file smaller than that cannot hold one sample, whatever the tokenizer.
    const int64_t length = spec.calibration().sequence_length() > 0
                               ? spec.calibration().sequence_length()
                               : kDefaultCalibrationSequenceLength;
    const bool token_file = absl::EndsWith(paths->calibration, ".tokens");
    const uintmax_t size = fs::file_size(paths->calibration, ec);
    if (ec) {
      return absl::InvalidArgumentError(
          absl::StrCat("calibration.path: ", spec.calibration().path(), ": ", ec.message()));
    }
    const int64_t most_tokens = static_cast<int64_t>(token_file ? size / 4 : size);
    if (most_tokens < length) {
      return absl::InvalidArgumentError(absl::StrCat(
          "calibration.path: ", spec.calibration().path(), " holds at most ", most_tokens,
          " tokens, fewer than one sample of calibration.sequence_length ", length));
    }
  }
  for (int i = 0; i < spec.stages_size(); ++i) {
    if (!spec.stages(i).has_evaluate()) continue;
    const std::string field = absl::StrCat("stages[", i, "].evaluate.text_path");
    ASSIGN_OR_RETURN(paths->evaluation, resolve(spec.stages(i).evaluate().text_path(), field.c_str()));
  }
  return absl::OkStatus();
}

absl::StatusOr<compress::v1::SubmitJobResponse> Scheduler::SubmitJob(
    const std::string& tenant, const compress::v1::SubmitJobRequest& request) {
  const compress::v1::JobSpec& spec = request.spec();
  if (static_cast<int64_t>(spec.ByteSizeLong()) > config_.max_spec_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("spec: ", spec.ByteSizeLong(),
                                                   " bytes is over the limit of ",
                                                   config_.max_spec_bytes));
  }
  if (request.request_id().size() > 128) {
    return absl::InvalidArgumentError("request_id: longer than 128 characters");
  }
  RETURN_IF_ERROR(ValidateJobSpec(spec));
  ResolvedPaths paths;
  RETURN_IF_ERROR(CheckModelPaths(spec, &paths));

  compress::v1::SubmitJobResponse response;
  std::string job_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!request.request_id().empty()) {
      auto it = request_ids_.find({tenant, request.request_id()});
      if (it != request_ids_.end()) {
        const Job& existing = jobs_.at(it->second).job;
        if (!google::protobuf::util::MessageDifferencer::Equals(existing.spec(), spec)) {
          return absl::AlreadyExistsError(
              absl::StrCat("request_id ", request.request_id(), " was used for job ",
                           existing.id(), " with a different spec"));
        }
        *response.mutable_job() = existing;
        response.set_created(false);
        return response;
      }
    }
    StoredJob stored;
    Job& job = stored.job;
    job_id = NewJobId();
    while (jobs_.count(job_id)) job_id = NewJobId();
    job.set_id(job_id);
    job.set_tenant(tenant);
    job.set_request_id(request.request_id());
    *job.mutable_spec() = spec;
    absl::Time now = absl::Now();
    *job.mutable_create_time() = ToProto(now);
    std::vector<JobEvent> events;
    AddStateChange(stored, compress::v1::QUEUED, "submitted", &events);
    RETURN_IF_ERROR(CommitLocked(stored, events));
    if (!request.request_id().empty()) request_ids_[{tenant, request.request_id()}] = job_id;
    queue_.insert({-spec.priority(), CreateMicros(job), job_id});
    queued_since_[job_id] = now;
    *response.mutable_job() = jobs_.at(job_id).job;
    response.set_created(true);
  }
  metrics_->jobs_submitted.Add({{"tenant", tenant}}).Increment();
  wake_.notify_all();
  Notify({job_id});
  return response;
}

absl::StatusOr<Job> Scheduler::GetJob(const std::string& tenant, const std::string& job_id) {
  std::lock_guard<std::mutex> lock(mu_);
  ASSIGN_OR_RETURN(StoredJob * stored, FindJobLocked(tenant, job_id));
  return stored->job;
}

absl::StatusOr<compress::v1::ListJobsResponse> Scheduler::ListJobs(
    const std::string& tenant, const compress::v1::ListJobsRequest& request) {
  int page_size = request.page_size() <= 0 ? kDefaultPageSize
                                           : std::min(request.page_size(), kMaxPageSize);
  // The page token is the (create time, id) of the last job returned.
  int64_t after_micros = INT64_MAX;
  std::string after_id;
  if (!request.page_token().empty()) {
    size_t colon = request.page_token().find(':');
    if (colon == std::string::npos ||
        !absl::SimpleAtoi(request.page_token().substr(0, colon), &after_micros)) {
      return absl::InvalidArgumentError("page_token: not a token this server issued");
    }
    after_id = request.page_token().substr(colon + 1);
  }
  std::set<int> states(request.states().begin(), request.states().end());
  std::vector<const Job*> matching;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [id, stored] : jobs_) {
    const Job& job = stored.job;
    if (!tenant.empty() && job.tenant() != tenant) continue;
    if (!states.empty() && !states.count(job.state())) continue;
    bool labels_match = true;
    for (const auto& [key, value] : request.labels()) {
      auto it = job.spec().labels().find(key);
      if (it == job.spec().labels().end() || it->second != value) labels_match = false;
    }
    if (!labels_match) continue;
    int64_t micros = CreateMicros(job);
    // Newest first: strictly older than the cursor.
    if (micros > after_micros || (micros == after_micros && job.id() >= after_id)) continue;
    matching.push_back(&job);
  }
  std::sort(matching.begin(), matching.end(), [](const Job* a, const Job* b) {
    int64_t ma = CreateMicros(*a), mb = CreateMicros(*b);
    return ma != mb ? ma > mb : a->id() > b->id();
  });
  compress::v1::ListJobsResponse response;
  for (size_t i = 0; i < matching.size() && static_cast<int>(i) < page_size; ++i) {
    *response.add_jobs() = *matching[i];
  }
  if (static_cast<int>(matching.size()) > page_size) {
    const Job& last = *matching[page_size - 1];
    response.set_next_page_token(absl::StrCat(CreateMicros(last), ":", last.id()));
  }
  return response;
}

absl::StatusOr<Job> Scheduler::CancelJob(const std::string& tenant, const std::string& job_id) {
  Job result;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(StoredJob * current, FindJobLocked(tenant, job_id));
    if (IsTerminal(current->job.state())) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job ", job_id, " already ended ", JobState_Name(current->job.state())));
    }
    StoredJob updated = *current;
    std::vector<JobEvent> events;
    AddStateChange(updated, compress::v1::CANCELLED, "cancelled by request", &events);
    RETURN_IF_ERROR(CommitLocked(std::move(updated), events));
    queue_.erase({-current->job.spec().priority(), CreateMicros(current->job), job_id});
    queued_since_.erase(job_id);
    result = jobs_.at(job_id).job;
  }
  Notify({job_id});
  return result;
}

absl::StatusOr<EventBatch> Scheduler::ReadEvents(const std::string& tenant,
                                                 const std::string& job_id,
                                                 int64_t from_sequence, int limit) {
  EventBatch batch;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(StoredJob * stored, FindJobLocked(tenant, job_id));
    batch.job_ended = IsTerminal(stored->job.state());
    batch.last_sequence = stored->job.last_sequence();
  }
  if (from_sequence > batch.last_sequence) return batch;
  ASSIGN_OR_RETURN(batch.events, store_->ReadEvents(job_id, std::max<int64_t>(1, from_sequence), limit));
  return batch;
}

absl::StatusOr<ArtifactLocation> Scheduler::FindArtifact(const std::string& tenant,
                                                         const std::string& job_id,
                                                         const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  ASSIGN_OR_RETURN(StoredJob * stored, FindJobLocked(tenant, job_id));
  for (const Artifact& artifact : stored->job.artifacts()) {
    if (artifact.name() == name) return ArtifactLocation{ArtifactPath(job_id, name), artifact};
  }
  return absl::NotFoundError(absl::StrCat("job ", job_id, " has no artifact named ", name));
}

std::string Scheduler::ArtifactPath(const std::string& job_id, const std::string& name) const {
  return (std::filesystem::path(config_.artifact_dir) / job_id / name).string();
}

// ------------------------------------------------------------------ WorkerService

absl::StatusOr<compress::v1::RegisterWorkerResponse> Scheduler::RegisterWorker(
    const compress::v1::RegisterWorkerRequest& request) {
  if (request.device().empty()) return absl::InvalidArgumentError("device: empty");
  compress::v1::RegisterWorkerResponse response;
  std::lock_guard<std::mutex> lock(mu_);
  std::string id = request.worker_id();
  if (id.empty()) id = absl::StrFormat("worker-%d", static_cast<int>(workers_.size()) + 1);
  WorkerInfo& info = workers_[id];
  info.registration = request;
  info.registration.set_worker_id(id);
  info.last_seen = absl::Now();
  response.set_worker_id(id);
  response.set_lease_seconds(static_cast<int32_t>(absl::ToInt64Seconds(config_.lease_timeout)));
  LOG_INFO("worker registered", {{"worker", id}, {"device", request.device()},
                                 {"host", request.hostname()}});
  return response;
}

void Scheduler::AcquireTask(const compress::v1::AcquireTaskRequest& request,
                            AcquireCallback done) {
  std::vector<std::function<void()>> calls;
  std::vector<std::string> changed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto worker = workers_.find(request.worker_id());
    if (worker == workers_.end()) {
      done(absl::NotFoundError(absl::StrCat("worker ", request.worker_id(),
                                            " is not registered; register again")));
      return;
    }
    if (stopping_) {
      done(absl::UnavailableError("server is shutting down"));
      return;
    }
    absl::Time now = absl::Now();
    worker->second.last_seen = now;
    int wait_millis = std::clamp(request.wait_millis(), 0, 30000);
    waiters_.push_back({request.worker_id(), now + absl::Milliseconds(wait_millis), std::move(done)});
    MatchWaitersLocked(now, &calls, &changed);
  }
  for (auto& call : calls) call();
  Notify(changed);
}

std::set<Scheduler::QueueKey>::iterator Scheduler::PickNextLocked() {
  if (queue_.empty()) return queue_.end();
  const int top_priority = std::get<0>(*queue_.begin());
  std::map<std::string, int> running;
  for (const auto& [id, stored] : jobs_) {
    if (stored.job.state() == compress::v1::RUNNING) ++running[stored.job.tenant()];
  }
  auto best = queue_.end();
  int best_running = 0;
  for (auto it = queue_.begin(); it != queue_.end() && std::get<0>(*it) == top_priority; ++it) {
    int tenant_running = running[jobs_.at(std::get<2>(*it)).job.tenant()];
    // Strictly fewer: among equals the older job (seen first) wins.
    if (best == queue_.end() || tenant_running < best_running) {
      best = it;
      best_running = tenant_running;
      if (best_running == 0) break;
    }
  }
  return best;
}

void Scheduler::MatchWaitersLocked(absl::Time now, std::vector<std::function<void()>>* calls,
                                   std::vector<std::string>* changed) {
  auto waiter = waiters_.begin();
  while (waiter != waiters_.end() && !queue_.empty()) {
    auto next = PickNextLocked();
    std::string job_id = std::get<2>(*next);
    StoredJob updated = jobs_.at(job_id);
    Job& job = updated.job;
    job.set_attempts(job.attempts() + 1);
    job.set_worker_id(waiter->worker_id);
    job.clear_artifacts();
    updated.task_id = TaskId(job);
    updated.lease_expiry_micros = ToMicros(now + config_.lease_timeout);
    std::vector<JobEvent> events;
    AddStateChange(updated, compress::v1::RUNNING,
                   absl::StrCat("dispatched to ", waiter->worker_id, " (attempt ", job.attempts(), ")"),
                   &events);
    absl::Status committed = CommitLocked(updated, events);
    if (!committed.ok()) {
      LOG_ERROR("dispatch failed to commit", {{"job", job_id}, {"error", committed.ToString()}});
      break;  // the store is in trouble; leave the job queued and retry next tick
    }
    queue_.erase(next);
    metrics_->dispatch_latency_seconds.Observe(absl::ToDoubleSeconds(now - queued_since_[job_id]));
    queued_since_.erase(job_id);
    workers_[waiter->worker_id].task_id = updated.task_id;

    AcquireTaskResponse response;
    compress::v1::Task& task = *response.mutable_task();
    task.set_task_id(updated.task_id);
    task.set_job_id(job_id);
    *task.mutable_spec() = job.spec();
    task.set_attempt(job.attempts());
    ResolvedPaths paths;
    absl::Status resolved = CheckModelPaths(job.spec(), &paths);
    task.set_model_path(paths.model);
    task.set_calibration_path(paths.calibration);
    task.set_evaluation_path(paths.evaluation);
    // A model removed since submit still goes to the worker, which fails the
    // job with the real error; a path check here would hide the file's name.
    if (!resolved.ok()) task.set_model_path(job.spec().model().path());
    calls->push_back([done = std::move(waiter->done), response]() { done(response); });
    changed->push_back(job_id);
    waiter = waiters_.erase(waiter);
  }
}

void Scheduler::ExpireLeasesLocked(absl::Time now, std::vector<std::string>* changed) {
  int64_t now_micros = ToMicros(now);
  for (auto& [id, stored] : jobs_) {
    if (stored.job.state() != compress::v1::RUNNING) continue;
    if (stored.lease_expiry_micros > now_micros) continue;
    StoredJob updated = stored;
    std::vector<JobEvent> events;
    std::string worker = updated.job.worker_id();
    metrics_->lease_expirations.Increment();
    if (updated.job.attempts() >= config_.max_attempts) {
      AddStateChange(updated, compress::v1::FAILED,
                     absl::StrCat("worker ", worker, " stopped renewing its lease; gave up after ",
                                  updated.job.attempts(), " attempts"),
                     &events);
    } else {
      updated.task_id.clear();
      updated.lease_expiry_micros = 0;
      AddStateChange(updated, compress::v1::QUEUED,
                     absl::StrCat("worker ", worker, " stopped renewing its lease; requeued"), &events);
      metrics_->task_retries.Increment();
    }
    if (!CommitLocked(updated, events).ok()) continue;
    const Job& job = jobs_.at(id).job;
    if (job.state() == compress::v1::QUEUED) {
      queue_.insert({-job.spec().priority(), CreateMicros(job), id});
      queued_since_[id] = now;
    }
    changed->push_back(id);
  }
}

void Scheduler::UpdateGaugesLocked(absl::Time now) {
  std::map<JobState, int> by_state;
  for (const auto& [id, stored] : jobs_) ++by_state[stored.job.state()];
  for (int s = compress::v1::QUEUED; s <= compress::v1::CANCELLED; ++s) {
    JobState state = static_cast<JobState>(s);
    metrics_->jobs.Add({{"state", JobState_Name(state)}}).Set(by_state[state]);
  }
  metrics_->queue_depth.Set(static_cast<double>(queue_.size()));
  int connected = 0, busy = 0;
  for (auto& [id, worker] : workers_) {
    if (now - worker.last_seen > config_.lease_timeout) continue;
    ++connected;
    auto job = worker.task_id.empty() ? jobs_.end()
                                      : jobs_.find(worker.task_id.substr(0, worker.task_id.rfind("-a")));
    if (job != jobs_.end() && job->second.task_id == worker.task_id) ++busy;
  }
  metrics_->workers_connected.Set(connected);
  metrics_->workers_busy.Set(busy);
}

void Scheduler::DispatchLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    wake_.wait_for(lock, std::chrono::milliseconds(100));
    if (stopping_) break;
    absl::Time now = absl::Now();
    std::vector<std::string> changed;
    std::vector<std::function<void()>> calls;
    ExpireLeasesLocked(now, &changed);
    MatchWaitersLocked(now, &calls, &changed);
    for (auto w = waiters_.begin(); w != waiters_.end();) {
      if (w->deadline <= now) {
        calls.push_back([done = std::move(w->done)]() { done(AcquireTaskResponse()); });
        w = waiters_.erase(w);
      } else {
        ++w;
      }
    }
    UpdateGaugesLocked(now);
    lock.unlock();
    for (auto& call : calls) call();
    Notify(changed);
    lock.lock();
  }
}

absl::StatusOr<StoredJob*> Scheduler::FindLeaseLocked(const std::string& worker_id,
                                                      const std::string& task_id) {
  auto worker = workers_.find(worker_id);
  if (worker != workers_.end()) worker->second.last_seen = absl::Now();
  std::string job_id = task_id.substr(0, task_id.rfind("-a"));
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("task ", task_id, " not found"));
  StoredJob& stored = it->second;
  if (stored.job.state() == compress::v1::CANCELLED) return &stored;
  if (stored.task_id != task_id || stored.job.worker_id() != worker_id) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", worker_id, " no longer holds the lease on task ", task_id));
  }
  return &stored;
}

absl::StatusOr<bool> Scheduler::RenewLease(const std::string& worker_id,
                                           const std::string& task_id) {
  std::lock_guard<std::mutex> lock(mu_);
  ASSIGN_OR_RETURN(StoredJob * stored, FindLeaseLocked(worker_id, task_id));
  if (stored->job.state() == compress::v1::CANCELLED) return true;
  // Lease expiry lives in memory between commits; a restarted server extends
  // every lease anyway, so there is no need to write each renewal.
  stored->lease_expiry_micros = ToMicros(absl::Now() + config_.lease_timeout);
  return false;
}

absl::StatusOr<bool> Scheduler::ReportEvents(const compress::v1::ReportEventsRequest& request) {
  if (static_cast<size_t>(request.events_size()) > kMaxEventsPerReport) {
    return absl::InvalidArgumentError(
        absl::StrCat("events: at most ", kMaxEventsPerReport, " per report"));
  }
  std::string job_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(StoredJob * stored, FindLeaseLocked(request.worker_id(), request.task_id()));
    if (stored->job.state() == compress::v1::CANCELLED) return true;
    StoredJob updated = *stored;
    updated.lease_expiry_micros = ToMicros(absl::Now() + config_.lease_timeout);
    std::vector<JobEvent> events;
    for (const JobEvent& incoming : request.events()) {
      // Workers report progress, metrics and logs; state changes and
      // artifacts are the server's to record.
      if (incoming.kind_case() != JobEvent::kProgress && incoming.kind_case() != JobEvent::kMetric &&
          incoming.kind_case() != JobEvent::kLog) {
        return absl::InvalidArgumentError("events: workers may report progress, metric and log only");
      }
      if (incoming.has_progress()) {
        updated.job.set_progress(std::clamp(incoming.progress().fraction(), 0.0, 1.0));
        updated.job.set_message(incoming.progress().message());
      }
      AddEvent(updated, incoming, &events);
    }
    job_id = updated.job.id();
    RETURN_IF_ERROR(CommitLocked(std::move(updated), events));
  }
  Notify({job_id});
  return false;
}

absl::StatusOr<std::string> Scheduler::BeginArtifactUpload(const std::string& worker_id,
                                                           const std::string& task_id,
                                                           const Artifact& artifact) {
  if (!IsSafeRelativeName(artifact.name())) {
    return absl::InvalidArgumentError(absl::StrCat("artifact name '", artifact.name(),
                                                   "' is not a safe relative path"));
  }
  if (artifact.size_bytes() < 0 || artifact.size_bytes() > config_.max_artifact_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("artifact ", artifact.name(), ": size ",
                                                   artifact.size_bytes(), " is outside 0..",
                                                   config_.max_artifact_bytes));
  }
  if (artifact.sha256().size() != 64) {
    return absl::InvalidArgumentError(absl::StrCat("artifact ", artifact.name(), ": sha256 must be 64 hex digits"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  ASSIGN_OR_RETURN(StoredJob * stored, FindLeaseLocked(worker_id, task_id));
  if (stored->job.state() == compress::v1::CANCELLED) {
    return absl::CancelledError(absl::StrCat("job ", stored->job.id(), " was cancelled"));
  }
  return ArtifactPath(stored->job.id(), artifact.name());
}

absl::Status Scheduler::RecordArtifact(const std::string& worker_id, const std::string& task_id,
                                       const Artifact& artifact) {
  std::string job_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(StoredJob * stored, FindLeaseLocked(worker_id, task_id));
    if (stored->job.state() == compress::v1::CANCELLED) {
      return absl::CancelledError(absl::StrCat("job ", stored->job.id(), " was cancelled"));
    }
    StoredJob updated = *stored;
    Job& job = updated.job;
    bool replaced = false;
    for (Artifact& existing : *job.mutable_artifacts()) {
      if (existing.name() == artifact.name()) {
        existing = artifact;
        replaced = true;
      }
    }
    if (!replaced) *job.add_artifacts() = artifact;
    std::vector<JobEvent> events;
    JobEvent event;
    *event.mutable_artifact() = artifact;
    AddEvent(updated, std::move(event), &events);
    job_id = job.id();
    RETURN_IF_ERROR(CommitLocked(std::move(updated), events));
  }
  metrics_->artifact_bytes_written.Increment(static_cast<double>(artifact.size_bytes()));
  Notify({job_id});
  return absl::OkStatus();
}

absl::Status Scheduler::CompleteTask(const compress::v1::CompleteTaskRequest& request) {
  std::string job_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(StoredJob * stored, FindLeaseLocked(request.worker_id(), request.task_id()));
    if (IsTerminal(stored->job.state())) return absl::OkStatus();  // cancelled meanwhile
    StoredJob updated = *stored;
    std::vector<JobEvent> events;
    if (request.success()) {
      *updated.job.mutable_report() = request.report();
      updated.job.set_progress(1.0);
      AddStateChange(updated, compress::v1::SUCCEEDED, "finished", &events);
    } else {
      absl::StatusCode code = static_cast<absl::StatusCode>(request.error_code());
      std::string error = absl::StrCat(absl::StatusCodeToString(code), ": ",
                                       request.error().empty() ? "worker reported failure"
                                                               : request.error());
      updated.job.set_failed_attempts(updated.job.failed_attempts() + 1);
      if (IsRetryable(code) && updated.job.failed_attempts() < config_.max_failed_attempts) {
        updated.task_id.clear();
        updated.lease_expiry_micros = 0;
        AddStateChange(updated, compress::v1::QUEUED,
                       absl::StrCat("attempt ", updated.job.attempts(), " failed on ",
                                    request.worker_id(), " (", error, "); requeued"),
                       &events);
        metrics_->task_retries.Increment();
      } else {
        AddStateChange(updated, compress::v1::FAILED, error, &events);
      }
    }
    job_id = updated.job.id();
    RETURN_IF_ERROR(CommitLocked(std::move(updated), events));
    const Job& job = jobs_.at(job_id).job;
    if (job.state() == compress::v1::QUEUED) {
      queue_.insert({-job.spec().priority(), CreateMicros(job), job_id});
      queued_since_[job_id] = absl::Now();
    }
    auto worker = workers_.find(request.worker_id());
    if (worker != workers_.end()) worker->second.task_id.clear();
  }
  Notify({job_id});
  return absl::OkStatus();
}

}  // namespace compress::server
