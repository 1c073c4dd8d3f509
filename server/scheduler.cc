#include "server/scheduler.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <filesystem>
#include <optional>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/files.h"
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

absl::Time FromProto(const google::protobuf::Timestamp& t) {
  return absl::FromUnixMicros(TimeUtil::TimestampToMicroseconds(t));
}

google::protobuf::Timestamp ToProto(absl::Time t) {
  return TimeUtil::MicrosecondsToTimestamp(ToMicros(t));
}

int64_t CreateMicros(const Job& job) { return TimeUtil::TimestampToMicroseconds(job.create_time()); }

// A deleted job's artifact folder, moved aside until it is removed.
constexpr char kDeletedPrefix[] = ".deleted-";

// Removes `dir` and everything below it; the bytes its files held.
int64_t RemoveTree(const std::string& dir) {
  namespace fs = std::filesystem;
  int64_t bytes = 0;
  std::error_code walk;
  for (fs::recursive_directory_iterator it(dir, walk), end; !walk && it != end;
       it.increment(walk)) {
    std::error_code ec;
    if (it->is_regular_file(ec)) bytes += static_cast<int64_t>(it->file_size(ec));
  }
  std::error_code removed;
  fs::remove_all(dir, removed);
  if (removed) {
    LOG_WARN("could not remove a deleted job's folder",
             {{"folder", dir}, {"error", removed.message()}});
  }
  return bytes;
}

std::string NewJobId() {
  static std::mutex mu;
  static std::mt19937_64 rng(std::random_device{}());
  std::lock_guard<std::mutex> lock(mu);
  return absl::StrFormat("job-%016x", rng());
}

using compress::v1::JobTask;

// A lease names one attempt of one task: "<job>-t<index>-a<attempt>".
std::string LeaseId(const Job& job, int index, int attempt) {
  return absl::StrCat(job.id(), "-t", index, "-a", attempt);
}

// The job id and task index of a lease; nullopt for a malformed one.
std::optional<std::pair<std::string, int>> ParseLease(const std::string& lease) {
  const size_t t = lease.rfind("-t");
  const size_t a = lease.rfind("-a");
  int index = 0;
  if (t == std::string::npos || a == std::string::npos || a < t ||
      !absl::SimpleAtoi(lease.substr(t + 2, a - t - 2), &index)) {
    return std::nullopt;
  }
  return std::make_pair(lease.substr(0, t), index);
}

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string TaskLabel(const JobTask& task) {
  switch (task.kind()) {
    case compress::v1::TASK_BLOCKS:
      return absl::StrFormat("task %d (blocks %d-%d)", task.index(), task.first_layer(),
                             task.end_layer() - 1);
    case compress::v1::TASK_ASSEMBLE:
      return absl::StrFormat("task %d (assemble)", task.index());
    default:
      return absl::StrFormat("task %d", task.index());
  }
}

// Whether the task can be dispatched now: pending, and for the assemble
// task every block task done.
bool Runnable(const Job& job, const JobTask& task) {
  if (task.state() != compress::v1::TASK_PENDING) return false;
  if (task.kind() != compress::v1::TASK_ASSEMBLE) return true;
  for (const JobTask& other : job.tasks()) {
    if (other.kind() == compress::v1::TASK_BLOCKS && other.state() != compress::v1::TASK_DONE) {
      return false;
    }
  }
  return true;
}

bool HasRunnableTask(const Job& job) {
  for (const JobTask& task : job.tasks()) {
    if (Runnable(job, task)) return true;
  }
  return false;
}

// "blocks/layer-00007.safetensors" -> 7; -1 for any other name.
int LayerOfCheckpoint(const std::string& name) {
  absl::string_view rest = name;
  int layer = -1;
  if (!absl::ConsumePrefix(&rest, "blocks/layer-") || !absl::ConsumeSuffix(&rest, ".safetensors") ||
      !absl::SimpleAtoi(rest, &layer)) {
    return -1;
  }
  return layer;
}

// The job's progress: each task's, weighted by its share.
double JobProgress(const Job& job) {
  double progress = 0;
  for (const JobTask& task : job.tasks()) {
    progress += task.weight() * (task.state() == compress::v1::TASK_DONE ? 1.0 : task.progress());
  }
  return std::clamp(progress, 0.0, 1.0);
}

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
    if (job.state() == compress::v1::RUNNING) ++running;
    if (!IsTerminal(job.state())) {
      for (const JobTask& task : job.tasks()) {
        // Give each worker one lease timeout to find the restarted server.
        if (task.state() == compress::v1::TASK_RUNNING) {
          scheduler->lease_expiry_[task.lease_id()] = now + scheduler->config_.lease_timeout;
        }
      }
    }
    scheduler->RequeueLocked(stored, now);
    scheduler->IndexForListingLocked(stored.job);
    scheduler->jobs_[id] = std::move(stored);
  }
  scheduler->RecoverDeletedFoldersLocked();
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
    metrics_->jobs_finished.Add({{"state", JobState_Name(state)}, {"tenant", job.tenant()}}).Increment();
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
  if (!jobs_.count(id)) IndexForListingLocked(updated.job);
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

absl::Status Scheduler::ResolvePaths(const compress::v1::JobSpec& spec,
                                     ResolvedPaths* paths) const {
  auto resolve = [&](const std::string& path, const char* field) -> absl::StatusOr<std::string> {
    absl::StatusOr<std::string> resolved = ResolveUnderRoots(path, config_.model_roots);
    if (resolved.ok()) return resolved;
    // A path outside the roots is a bad request, not a missing credential.
    absl::StatusCode code = resolved.status().code() == absl::StatusCode::kPermissionDenied
                                ? absl::StatusCode::kInvalidArgument
                                : resolved.status().code();
    return absl::Status(code, absl::StrCat(field, ": ", resolved.status().message()));
  };
  ASSIGN_OR_RETURN(paths->model, resolve(spec.model().path(), "model.path"));
  if (!spec.calibration().path().empty()) {
    ASSIGN_OR_RETURN(paths->calibration, resolve(spec.calibration().path(), "calibration.path"));
  }
  for (int i = 0; i < spec.stages_size(); ++i) {
    if (!spec.stages(i).has_evaluate()) continue;
    const std::string field = absl::StrCat("stages[", i, "].evaluate.text_path");
    ASSIGN_OR_RETURN(paths->evaluation, resolve(spec.stages(i).evaluate().text_path(), field.c_str()));
  }
  return absl::OkStatus();
}

absl::Status Scheduler::CheckModelPaths(const compress::v1::JobSpec& spec,
                                        ResolvedPaths* paths) const {
  RETURN_IF_ERROR(ResolvePaths(spec, paths));
  const std::string* model_path = &paths->model;
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
  std::string config_json;
  const fs::path config_path = fs::path(*model_path).parent_path() / "config.json";
  const fs::path folder_config = fs::path(*model_path) / "config.json";
  const fs::path& config_file = fs::is_directory(*model_path, ec) ? folder_config : config_path;
  if (fs::is_regular_file(config_file, ec)) {
    // Bounded like a recipe: config.json is a few kilobytes.
    absl::StatusOr<std::string> text = ReadFile(config_file.string(), config_.max_spec_bytes);
    if (!text.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("model.path: ", text.status().message()));
    }
    config_json = std::move(*text);
  }
  absl::StatusOr<ModelShape> shape = ReadModelShape(tensors, config_json);
  if (!shape.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("model.path: ", shape.status().message()));
  }
  paths->shape = *shape;
  if (!paths->calibration.empty()) {
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
  const std::vector<TaskPlan> plans = PlanTasks(spec, paths.shape, config_.planner);
  for (size_t i = 0; i < plans.size(); ++i) {
    if (plans[i].memory_bytes > config_.max_task_memory_bytes) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "the job needs an estimated %.1f GiB of device memory in its %s task, more than any "
          "worker may have here (%.1f GiB, --max-task-memory)",
          static_cast<double>(plans[i].memory_bytes) / kGiB,
          compress::v1::TaskKind_Name(plans[i].kind),
          static_cast<double>(config_.max_task_memory_bytes) / kGiB));
    }
  }

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
    for (size_t i = 0; i < plans.size(); ++i) {
      JobTask* task = job.add_tasks();
      task->set_index(static_cast<int32_t>(i));
      task->set_kind(plans[i].kind);
      task->set_first_layer(plans[i].first_layer);
      task->set_end_layer(plans[i].end_layer);
      task->set_state(compress::v1::TASK_PENDING);
      task->set_memory_bytes(plans[i].memory_bytes);
      task->set_weight(plans[i].weight);
    }
    std::vector<JobEvent> events;
    AddStateChange(stored, compress::v1::QUEUED,
                   plans.size() == 1 ? "submitted"
                                     : absl::StrCat("submitted; planned as ", plans.size() - 1,
                                                    " block task(s) and an assemble task"),
                   &events);
    RETURN_IF_ERROR(CommitLocked(stored, events));
    if (!request.request_id().empty()) request_ids_[{tenant, request.request_id()}] = job_id;
    RequeueLocked(jobs_.at(job_id), now);
    *response.mutable_job() = jobs_.at(job_id).job;
    response.set_created(true);
  }
  metrics_->jobs_submitted.Add({{"tenant", tenant}}).Increment();
  wake_.notify_all();
  Notify({job_id});
  return response;
}

void Scheduler::IndexForListingLocked(const Job& job) {
  ListKey key{CreateMicros(job), job.id()};
  list_all_.insert(key);
  list_by_tenant_[job.tenant()].insert(std::move(key));
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
  compress::v1::ListJobsResponse response;
  std::lock_guard<std::mutex> lock(mu_);
  const ListIndex* index = &list_all_;
  if (!tenant.empty()) {
    auto it = list_by_tenant_.find(tenant);
    if (it == list_by_tenant_.end()) return response;
    index = &it->second;
  }
  // Newest first, strictly older than the cursor; one match past the page
  // says whether there is a next page.
  auto it = request.page_token().empty() ? index->begin()
                                         : index->upper_bound({after_micros, after_id});
  const Job* last = nullptr;
  for (; it != index->end(); ++it) {
    const Job& job = jobs_.at(it->second).job;
    if (!states.empty() && !states.count(job.state())) continue;
    bool labels_match = true;
    for (const auto& [key, value] : request.labels()) {
      auto label = job.spec().labels().find(key);
      if (label == job.spec().labels().end() || label->second != value) labels_match = false;
    }
    if (!labels_match) continue;
    if (response.jobs_size() == page_size) {
      response.set_next_page_token(absl::StrCat(CreateMicros(*last), ":", last->id()));
      break;
    }
    *response.add_jobs() = job;
    last = &job;
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
    // Running tasks keep their leases: renewing one tells its worker to stop.
    AddStateChange(updated, compress::v1::CANCELLED, "cancelled by request", &events);
    RETURN_IF_ERROR(CommitLocked(std::move(updated), events));
    RequeueLocked(jobs_.at(job_id), absl::Now());
    result = jobs_.at(job_id).job;
  }
  Notify({job_id});
  return result;
}

absl::StatusOr<compress::v1::DeleteJobResponse> Scheduler::DeleteJob(const std::string& tenant,
                                                                     const std::string& job_id) {
  std::vector<std::string> trash;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(StoredJob * stored, FindJobLocked(tenant, job_id));
    const JobState state = stored->job.state();
    if (!IsTerminal(state)) {
      return absl::FailedPreconditionError(
          absl::StrCat("job ", job_id, " is ", JobState_Name(state),
                       "; only an ended job can be deleted (cancel it first)"));
    }
    RETURN_IF_ERROR(DeleteJobLocked(job_id, "request", &trash));
  }
  compress::v1::DeleteJobResponse response;
  response.set_job_id(job_id);
  for (const std::string& folder : trash) {
    response.set_freed_bytes(response.freed_bytes() + RemoveTree(folder));
  }
  return response;
}

absl::Status Scheduler::DeleteJobLocked(const std::string& job_id, const std::string& reason,
                                        std::vector<std::string>* trash) {
  namespace fs = std::filesystem;
  auto found = jobs_.find(job_id);
  if (found == jobs_.end()) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  const fs::path folder = fs::path(config_.artifact_dir) / job_id;
  const fs::path aside = fs::path(config_.artifact_dir) / absl::StrCat(kDeletedPrefix, job_id);
  std::error_code ec;
  const bool has_folder = fs::exists(folder, ec);
  if (has_folder) {
    if (fs::exists(aside, ec)) RemoveTree(aside.string());  // left by a removal that failed
    fs::rename(folder, aside, ec);
    if (ec) {
      return absl::InternalError(absl::StrCat("delete job ", job_id, ": move ", folder.string(),
                                              " aside: ", ec.message()));
    }
  }
  if (absl::Status deleted = store_->DeleteJob(job_id); !deleted.ok()) {
    if (has_folder) fs::rename(aside, folder, ec);
    return deleted;
  }
  if (has_folder) trash->push_back(aside.string());

  const Job& job = found->second.job;
  const ListKey key{CreateMicros(job), job_id};
  list_all_.erase(key);
  if (auto index = list_by_tenant_.find(job.tenant()); index != list_by_tenant_.end()) {
    index->second.erase(key);
    if (index->second.empty()) list_by_tenant_.erase(index);
  }
  if (!job.request_id().empty()) request_ids_.erase({job.tenant(), job.request_id()});
  for (const JobTask& task : job.tasks()) {
    // A cancelled job's worker may still hold its lease: its next renewal
    // finds no task and stops.
    if (task.lease_id().empty()) continue;
    lease_expiry_.erase(task.lease_id());
    dispatched_at_.erase(task.lease_id());
  }
  queued_since_.erase(queued_since_.lower_bound({job_id, INT_MIN}),
                      queued_since_.upper_bound({job_id, INT_MAX}));
  metrics_->jobs_deleted.Add({{"reason", reason}}).Increment();
  LOG_INFO("job deleted", {{"job", job_id}, {"reason", reason}});
  jobs_.erase(found);  // its per-job gauges go on the next gauge update
  return absl::OkStatus();
}

void Scheduler::ApplyRetentionLocked(absl::Time now, std::vector<std::string>* trash) {
  if (config_.retention <= absl::ZeroDuration()) return;
  if (now - last_retention_check_ < std::min(absl::Minutes(1), config_.retention / 4)) return;
  last_retention_check_ = now;
  std::vector<std::string> expired;
  for (const auto& [id, stored] : jobs_) {
    const Job& job = stored.job;
    if (IsTerminal(job.state()) && job.has_end_time() &&
        FromProto(job.end_time()) + config_.retention <= now) {
      expired.push_back(id);
    }
  }
  for (const std::string& id : expired) {
    if (absl::Status deleted = DeleteJobLocked(id, "retention", trash); !deleted.ok()) {
      LOG_WARN("retention: could not delete a job", {{"job", id}, {"error", deleted.ToString()}});
    }
  }
}

void Scheduler::RecoverDeletedFoldersLocked() {
  namespace fs = std::filesystem;
  std::vector<fs::path> aside;  // listed first: the loop below renames and removes
  std::error_code ec;
  for (fs::directory_iterator it(config_.artifact_dir, ec), end; !ec && it != end;
       it.increment(ec)) {
    if (absl::StartsWith(it->path().filename().string(), kDeletedPrefix)) aside.push_back(it->path());
  }
  for (const fs::path& path : aside) {
    const std::string job_id = path.filename().string().substr(std::strlen(kDeletedPrefix));
    const fs::path folder = fs::path(config_.artifact_dir) / job_id;
    std::error_code moved;
    if (jobs_.count(job_id) && !fs::exists(folder, moved)) {
      fs::rename(path, folder, moved);
      LOG_WARN("a delete was interrupted before the job's record went; the job is kept",
               {{"job", job_id}});
    } else {
      RemoveTree(path.string());
    }
  }
}

absl::StatusOr<Job> Scheduler::PauseJob(const std::string& tenant, const std::string& job_id) {
  Job result;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(StoredJob * current, FindJobLocked(tenant, job_id));
    const JobState state = current->job.state();
    if (IsTerminal(state) || state == compress::v1::PAUSED) {
      return absl::FailedPreconditionError(
          absl::StrCat("job ", job_id, " is ", JobState_Name(state), "; only a queued or running job can be paused"));
    }
    StoredJob updated = *current;
    std::vector<JobEvent> events;
    int stopped = 0;
    for (JobTask& task : *updated.job.mutable_tasks()) {
      if (task.state() != compress::v1::TASK_RUNNING) continue;
      // The lease goes: the worker stops at its next renewal, and its
      // finished blocks stay for the resumed task.
      lease_expiry_.erase(task.lease_id());
      ObserveTaskDuration(task, "paused", absl::Now());
      task.set_state(compress::v1::TASK_PENDING);
      task.clear_lease_id();
      task.set_message("paused");
      ++stopped;
    }
    AddStateChange(updated, compress::v1::PAUSED,
                   absl::StrCat("paused by request; ", stopped, " running task(s) stopped"), &events);
    RETURN_IF_ERROR(CommitLocked(std::move(updated), events));
    RequeueLocked(jobs_.at(job_id), absl::Now());
    result = jobs_.at(job_id).job;
  }
  Notify({job_id});
  return result;
}

absl::StatusOr<Job> Scheduler::ResumeJob(const std::string& tenant, const std::string& job_id) {
  Job result;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(StoredJob * current, FindJobLocked(tenant, job_id));
    if (current->job.state() != compress::v1::PAUSED) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job ", job_id, " is ", JobState_Name(current->job.state()), ", not paused"));
    }
    StoredJob updated = *current;
    for (JobTask& task : *updated.job.mutable_tasks()) {
      if (task.message() == "paused") task.clear_message();
    }
    std::vector<JobEvent> events;
    AddStateChange(updated, compress::v1::QUEUED, "resumed by request", &events);
    RETURN_IF_ERROR(CommitLocked(std::move(updated), events));
    RequeueLocked(jobs_.at(job_id), absl::Now());
    result = jobs_.at(job_id).job;
  }
  wake_.notify_all();
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

void Scheduler::RequeueLocked(const StoredJob& stored, absl::Time now) {
  const Job& job = stored.job;
  const QueueKey key{-job.spec().priority(), CreateMicros(job), job.id()};
  const bool dispatchable = !IsTerminal(job.state()) && job.state() != compress::v1::PAUSED &&
                            HasRunnableTask(job);
  if (dispatchable && queue_.insert(key).second) {
    ++queued_tenants_[std::get<0>(key)][job.tenant()];
  } else if (!dispatchable && queue_.erase(key) > 0) {
    auto level = queued_tenants_.find(std::get<0>(key));
    if (--level->second[job.tenant()] == 0) level->second.erase(job.tenant());
    if (level->second.empty()) queued_tenants_.erase(level);
  }
  for (const JobTask& task : job.tasks()) {
    const auto task_key = std::make_pair(job.id(), task.index());
    if (dispatchable && Runnable(job, task)) {
      queued_since_.emplace(task_key, now);  // keeps the first time it became runnable
    } else {
      queued_since_.erase(task_key);
    }
  }
}

void Scheduler::SyncJobStateLocked(StoredJob& stored, const std::string& reason,
                                   std::vector<JobEvent>* events) {
  Job& job = stored.job;
  job.set_progress(JobProgress(job));
  if (IsTerminal(job.state()) || job.state() == compress::v1::PAUSED) return;
  bool running = false;
  for (const JobTask& task : job.tasks()) running |= task.state() == compress::v1::TASK_RUNNING;
  const JobState state = running ? compress::v1::RUNNING : compress::v1::QUEUED;
  if (state != job.state()) AddStateChange(stored, state, reason, events);
}

std::optional<std::pair<std::string, int>> Scheduler::PickTaskLocked(
    int64_t memory_bytes, const std::map<std::string, int>& running_by_tenant) {
  std::optional<std::pair<std::string, int>> best;
  int best_running = 0;
  int level = 0;
  bool first = true;
  std::set<std::string> seen;  // tenants whose oldest fitting job at `level` was ranked
  for (const QueueKey& key : queue_) {
    if (first || std::get<0>(key) != level) {
      if (best) break;  // a lower priority is looked at only when nothing above fits
      level = std::get<0>(key);
      seen.clear();
      first = false;
    }
    const Job& job = jobs_.at(std::get<2>(key)).job;
    if (seen.count(job.tenant()) > 0) continue;  // an older job of the tenant ranked it
    for (const JobTask& task : job.tasks()) {
      if (!Runnable(job, task)) continue;
      if (memory_bytes > 0 && task.memory_bytes() > memory_bytes) continue;
      auto count = running_by_tenant.find(job.tenant());
      const int tenant_running = count == running_by_tenant.end() ? 0 : count->second;
      // Strictly fewer: among equals the older job (seen first) wins.
      if (!best || tenant_running < best_running) {
        best = std::make_pair(job.id(), task.index());
        best_running = tenant_running;
      }
      seen.insert(job.tenant());
      break;  // the job's first task that fits ranks it
    }
    if (best && best_running == 0) break;
    // Every tenant queued at this priority has been ranked: nothing later can win.
    auto tenants = queued_tenants_.find(level);
    if (best && tenants != queued_tenants_.end() && seen.size() >= tenants->second.size()) break;
  }
  return best;
}

absl::Status Scheduler::DispatchLocked(const std::string& job_id, int index,
                                       const std::string& worker_id, absl::Time now,
                                       AcquireTaskResponse* response) {
  StoredJob updated = jobs_.at(job_id);
  Job& job = updated.job;
  JobTask& task = *job.mutable_tasks(index);
  task.set_attempts(task.attempts() + 1);
  task.set_state(compress::v1::TASK_RUNNING);
  task.set_worker_id(worker_id);
  task.set_lease_id(LeaseId(job, index, task.attempts()));
  task.clear_message();
  // A retried block task resumes after its last checkpoint.
  task.set_progress(task.kind() == compress::v1::TASK_BLOCKS && task.end_layer() > task.first_layer()
                        ? static_cast<double>(task.finished_layers_size()) /
                              static_cast<double>(task.end_layer() - task.first_layer())
                        : 0.0);
  job.set_attempts(job.attempts() + 1);
  job.set_worker_id(worker_id);
  if (task.kind() != compress::v1::TASK_BLOCKS) job.clear_artifacts();  // an earlier attempt's
  std::vector<JobEvent> events;
  const std::string what =
      absl::StrCat(job.tasks_size() == 1 ? "" : TaskLabel(task) + " ", "dispatched to ", worker_id,
                   " (attempt ", task.attempts(), ")");
  if (job.tasks_size() > 1) {
    JobEvent log;
    log.mutable_log()->set_level("INFO");
    log.mutable_log()->set_text(what);
    AddEvent(updated, std::move(log), &events);
  }
  SyncJobStateLocked(updated, what, &events);
  RETURN_IF_ERROR(CommitLocked(updated, events));
  const JobTask& dispatched = jobs_.at(job_id).job.tasks(index);
  lease_expiry_[dispatched.lease_id()] = now + config_.lease_timeout;
  dispatched_at_[dispatched.lease_id()] = now;
  auto since = queued_since_.find({job_id, index});
  if (since != queued_since_.end()) {
    metrics_->dispatch_latency_seconds.Observe(absl::ToDoubleSeconds(now - since->second));
  }
  RequeueLocked(jobs_.at(job_id), now);
  workers_[worker_id].task_id = dispatched.lease_id();
  LOG_INFO("task dispatched", {{"job", job_id},
                               {"task", dispatched.lease_id()},
                               {"worker", worker_id},
                               {"kind", compress::v1::TaskKind_Name(dispatched.kind())},
                               {"attempt", std::to_string(dispatched.attempts())}});

  const Job& stored = jobs_.at(job_id).job;
  compress::v1::Task& out = *response->mutable_task();
  out.set_task_id(dispatched.lease_id());
  out.set_job_id(job_id);
  *out.mutable_spec() = stored.spec();
  out.set_attempt(dispatched.attempts());
  out.set_kind(dispatched.kind());
  out.set_first_layer(dispatched.first_layer());
  out.set_end_layer(dispatched.end_layer());
  for (int layer : dispatched.finished_layers()) out.add_finished_layers(layer);
  const bool sequential = stored.spec().calibration().propagation() != compress::v1::PROPAGATION_PARALLEL;
  if (dispatched.kind() == compress::v1::TASK_ASSEMBLE) {
    for (const JobTask& other : stored.tasks()) {
      for (const Artifact& checkpoint : other.checkpoints()) *out.add_inputs() = checkpoint;
    }
  } else if (dispatched.kind() == compress::v1::TASK_BLOCKS && sequential) {
    for (const Artifact& checkpoint : dispatched.checkpoints()) *out.add_inputs() = checkpoint;
  }
  ResolvedPaths paths;
  // Resolution only: the files were checked at submit, and this runs under
  // the scheduler's lock for every task.
  absl::Status resolved = ResolvePaths(stored.spec(), &paths);
  out.set_model_path(paths.model);
  out.set_calibration_path(paths.calibration);
  out.set_evaluation_path(paths.evaluation);
  // A model removed since submit still goes to the worker, which fails the
  // task with the real error; a path check here would hide the file's name.
  if (!resolved.ok()) out.set_model_path(stored.spec().model().path());
  return absl::OkStatus();
}

void Scheduler::MatchWaitersLocked(absl::Time now, std::vector<std::function<void()>>* calls,
                                   std::vector<std::string>* changed) {
  if (queue_.empty() || waiters_.empty()) return;
  // Running tasks are exactly the held leases: far fewer than the jobs.
  std::map<std::string, int> running_by_tenant;
  for (const auto& [lease, expiry] : lease_expiry_) {
    std::optional<std::pair<std::string, int>> parsed = ParseLease(lease);
    auto job = parsed ? jobs_.find(parsed->first) : jobs_.end();
    if (job != jobs_.end() && !IsTerminal(job->second.job.state())) {
      ++running_by_tenant[job->second.job.tenant()];
    }
  }
  auto waiter = waiters_.begin();
  while (waiter != waiters_.end() && !queue_.empty()) {
    const WorkerInfo& worker = workers_[waiter->worker_id];
    std::optional<std::pair<std::string, int>> pick =
        PickTaskLocked(worker.registration.memory_bytes(), running_by_tenant);
    if (!pick) {
      ++waiter;  // nothing fits this worker; another may take something
      continue;
    }
    AcquireTaskResponse response;
    absl::Status dispatched = DispatchLocked(pick->first, pick->second, waiter->worker_id, now, &response);
    if (!dispatched.ok()) {
      LOG_ERROR("dispatch failed to commit", {{"job", pick->first}, {"error", dispatched.ToString()}});
      break;  // the store is in trouble; leave the task queued and retry next tick
    }
    ++running_by_tenant[jobs_.at(pick->first).job.tenant()];
    calls->push_back([done = std::move(waiter->done), response]() { done(response); });
    changed->push_back(pick->first);
    waiter = waiters_.erase(waiter);
  }
}

void Scheduler::NoteUnplaceableLocked(absl::Time now, std::vector<std::string>* changed) {
  int64_t largest = 0;
  int connected = 0;
  for (const auto& [id, worker] : workers_) {
    if (now - worker.last_seen > config_.lease_timeout) continue;
    ++connected;
    largest = std::max(largest, worker.registration.memory_bytes());
  }
  if (connected == 0) return;  // waiting for workers is what a queue is for
  std::vector<std::string> queued;
  for (const QueueKey& key : queue_) queued.push_back(std::get<2>(key));
  for (const std::string& id : queued) {
    const StoredJob& current = jobs_.at(id);
    for (const JobTask& task : current.job.tasks()) {
      if (!Runnable(current.job, task)) continue;
      if (largest <= 0 || task.memory_bytes() <= largest) break;
      const std::string reason = absl::StrFormat(
          "waiting: %s needs an estimated %.2f GiB; the largest connected worker has %.2f GiB",
          TaskLabel(task), static_cast<double>(task.memory_bytes()) / kGiB,
          static_cast<double>(largest) / kGiB);
      if (task.message() == reason) break;
      StoredJob updated = current;
      updated.job.mutable_tasks(task.index())->set_message(reason);
      updated.job.set_message(reason);
      std::vector<JobEvent> events;
      JobEvent log;
      log.mutable_log()->set_level("WARNING");
      log.mutable_log()->set_text(reason);
      AddEvent(updated, std::move(log), &events);
      if (CommitLocked(std::move(updated), events).ok()) changed->push_back(id);
      break;
    }
  }
}

void Scheduler::ExpireLeasesLocked(absl::Time now, std::vector<std::string>* changed) {
  std::vector<std::pair<std::string, int>> expired;
  for (const auto& [lease, expiry] : lease_expiry_) {
    if (expiry > now) continue;
    std::optional<std::pair<std::string, int>> parsed = ParseLease(lease);
    if (parsed) expired.push_back(*parsed);
  }
  for (const auto& [id, index] : expired) {
    auto found = jobs_.find(id);
    if (found == jobs_.end() || index < 0 || index >= found->second.job.tasks_size()) continue;
    StoredJob updated = found->second;
    JobTask& task = *updated.job.mutable_tasks(index);
    lease_expiry_.erase(task.lease_id());
    if (IsTerminal(updated.job.state()) || task.state() != compress::v1::TASK_RUNNING) {
      dispatched_at_.erase(task.lease_id());  // a cancelled job's task
      continue;
    }
    std::vector<JobEvent> events;
    const std::string worker = task.worker_id();
    metrics_->lease_expirations.Increment();
    LOG_WARN("lease expired", {{"job", id}, {"task", task.lease_id()}, {"worker", worker}});
    ObserveTaskDuration(task, "expired", now);
    task.set_state(compress::v1::TASK_PENDING);
    task.clear_lease_id();
    const std::string label = updated.job.tasks_size() == 1 ? "" : TaskLabel(task) + ": ";
    if (task.attempts() >= config_.max_attempts) {
      AddStateChange(updated, compress::v1::FAILED,
                     absl::StrCat(label, "worker ", worker, " stopped renewing its lease; gave up after ",
                                  task.attempts(), " attempts"),
                     &events);
    } else {
      const std::string reason =
          absl::StrCat(label, "worker ", worker, " stopped renewing its lease; requeued");
      task.set_message(reason);
      if (updated.job.tasks_size() > 1) {
        JobEvent log;
        log.mutable_log()->set_level("WARNING");
        log.mutable_log()->set_text(reason);
        AddEvent(updated, std::move(log), &events);
      }
      SyncJobStateLocked(updated, reason, &events);
      metrics_->task_retries.Increment();
    }
    if (!CommitLocked(updated, events).ok()) continue;
    RequeueLocked(jobs_.at(id), now);
    changed->push_back(id);
  }
}

void Scheduler::UpdateGaugesLocked(absl::Time now) {
  std::map<JobState, int> by_state;
  int64_t stored_bytes = 0;
  for (const auto& [id, stored] : jobs_) {
    ++by_state[stored.job.state()];
    for (const Artifact& artifact : stored.job.artifacts()) stored_bytes += artifact.size_bytes();
  }
  metrics_->artifact_bytes_stored.Set(static_cast<double>(stored_bytes));
  for (int s = compress::v1::QUEUED; s <= compress::v1::PAUSED; ++s) {
    JobState state = static_cast<JobState>(s);
    metrics_->jobs.Add({{"state", JobState_Name(state)}}).Set(by_state[state]);
  }
  metrics_->queue_depth.Set(static_cast<double>(queued_since_.size()));
  int connected = 0, busy = 0;
  for (auto& [id, worker] : workers_) {
    if (now - worker.last_seen > config_.lease_timeout) continue;
    ++connected;
    if (!worker.task_id.empty() && lease_expiry_.count(worker.task_id) > 0) ++busy;
  }
  metrics_->workers_connected.Set(connected);
  metrics_->workers_busy.Set(busy);
  metrics_->workers_idle.Set(connected - busy);
  // Per-job series for jobs that have not ended; an ended job's are dropped.
  for (auto it = exported_states_.begin(); it != exported_states_.end();) {
    auto job = jobs_.find(it->first);
    const bool ended = job == jobs_.end() || IsTerminal(job->second.job.state());
    if (ended || job->second.job.state() != it->second) {
      metrics_->job_state.Remove({{"job_id", it->first}, {"state", JobState_Name(it->second)}});
    }
    if (ended) {
      metrics_->job_progress.Remove({{"job_id", it->first}});
      it = exported_states_.erase(it);
    } else {
      ++it;
    }
  }
  for (const auto& [id, stored] : jobs_) {
    const Job& job = stored.job;
    if (IsTerminal(job.state())) continue;
    metrics_->job_state.Add({{"job_id", id}, {"state", JobState_Name(job.state())}}).Set(1);
    metrics_->job_progress.Add({{"job_id", id}}).Set(job.progress());
    exported_states_[id] = job.state();
  }
}

void Scheduler::ObserveTaskDuration(const JobTask& task, const std::string& result, absl::Time now) {
  auto started = dispatched_at_.find(task.lease_id());
  if (started == dispatched_at_.end()) return;  // dispatched before a restart
  metrics_->task_duration_seconds
      .Add({{"kind", compress::v1::TaskKind_Name(task.kind())}, {"result", result}},
           metrics::LongDurationBuckets())
      .Observe(absl::ToDoubleSeconds(now - started->second));
  dispatched_at_.erase(started);
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
    if (now - last_placement_check_ >= absl::Seconds(1)) {
      NoteUnplaceableLocked(now, &changed);
      last_placement_check_ = now;
    }
    // Gauges walk every job: on a tick, not on every wake-up.
    const bool update_gauges = now - last_gauge_update_ >= absl::Milliseconds(500);
    if (update_gauges) last_gauge_update_ = now;
    for (auto w = waiters_.begin(); w != waiters_.end();) {
      if (w->deadline <= now) {
        calls.push_back([done = std::move(w->done)]() { done(AcquireTaskResponse()); });
        w = waiters_.erase(w);
      } else {
        ++w;
      }
    }
    if (update_gauges) UpdateGaugesLocked(now);
    std::vector<std::string> trash;
    ApplyRetentionLocked(now, &trash);
    lock.unlock();
    for (auto& call : calls) call();
    Notify(changed);
    for (const std::string& folder : trash) RemoveTree(folder);
    lock.lock();
  }
}

absl::StatusOr<Scheduler::Lease> Scheduler::FindLeaseLocked(const std::string& worker_id,
                                                            const std::string& task_id) {
  auto worker = workers_.find(worker_id);
  if (worker != workers_.end()) worker->second.last_seen = absl::Now();
  std::optional<std::pair<std::string, int>> parsed = ParseLease(task_id);
  auto it = parsed ? jobs_.find(parsed->first) : jobs_.end();
  if (it == jobs_.end() || parsed->second < 0 || parsed->second >= it->second.job.tasks_size()) {
    return absl::NotFoundError(absl::StrCat("task ", task_id, " not found"));
  }
  StoredJob& stored = it->second;
  const JobTask& task = stored.job.tasks(parsed->second);
  const bool held = task.state() == compress::v1::TASK_RUNNING && task.lease_id() == task_id &&
                    task.worker_id() == worker_id;
  if (stored.job.state() == compress::v1::CANCELLED && task.lease_id() == task_id) {
    return Lease{&stored, parsed->second};
  }
  if (!held || IsTerminal(stored.job.state())) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", worker_id, " no longer holds the lease on task ", task_id));
  }
  return Lease{&stored, parsed->second};
}

absl::StatusOr<bool> Scheduler::RenewLease(const std::string& worker_id,
                                           const std::string& task_id) {
  std::lock_guard<std::mutex> lock(mu_);
  ASSIGN_OR_RETURN(const Lease lease, FindLeaseLocked(worker_id, task_id));
  if (lease.stored->job.state() == compress::v1::CANCELLED) return true;
  // Lease expiry lives in memory; a restarted server extends every lease.
  lease_expiry_[task_id] = absl::Now() + config_.lease_timeout;
  return false;
}

absl::StatusOr<bool> Scheduler::ReportEvents(const compress::v1::ReportEventsRequest& request) {
  if (static_cast<size_t>(request.events_size()) > kMaxEventsPerReport) {
    return absl::InvalidArgumentError(
        absl::StrCat("events: at most ", kMaxEventsPerReport, " per report"));
  }
  for (const JobEvent& incoming : request.events()) {
    // Workers report progress, metrics and logs; state changes and
    // artifacts are the server's to record.
    if (incoming.kind_case() != JobEvent::kProgress && incoming.kind_case() != JobEvent::kMetric &&
        incoming.kind_case() != JobEvent::kLog) {
      return absl::InvalidArgumentError("events: workers may report progress, metric and log only");
    }
  }
  std::string job_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(const Lease lease, FindLeaseLocked(request.worker_id(), request.task_id()));
    if (lease.stored->job.state() == compress::v1::CANCELLED) return true;
    lease_expiry_[request.task_id()] = absl::Now() + config_.lease_timeout;
    StoredJob updated = *lease.stored;
    JobTask& task = *updated.job.mutable_tasks(lease.index);
    std::vector<JobEvent> events;
    for (const JobEvent& incoming : request.events()) {
      JobEvent event = incoming;
      if (event.has_progress()) {
        // The worker measures its task; the job's progress weighs every task.
        task.set_progress(std::clamp(event.progress().fraction(), 0.0, 1.0));
        updated.job.set_progress(JobProgress(updated.job));
        updated.job.set_message(event.progress().message());
        event.mutable_progress()->set_fraction(updated.job.progress());
      }
      AddEvent(updated, std::move(event), &events);
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
  ASSIGN_OR_RETURN(const Lease lease, FindLeaseLocked(worker_id, task_id));
  const Job& job = lease.stored->job;
  if (job.state() == compress::v1::CANCELLED) {
    return absl::CancelledError(absl::StrCat("job ", job.id(), " was cancelled"));
  }
  const JobTask& task = job.tasks(lease.index);
  const int layer = LayerOfCheckpoint(artifact.name());
  if (task.kind() == compress::v1::TASK_BLOCKS) {
    if (layer < task.first_layer() || layer >= task.end_layer()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "artifact ", artifact.name(), ": ", TaskLabel(task),
          " uploads only its blocks' checkpoints (blocks/layer-NNNNN.safetensors)"));
    }
  } else if (layer >= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("artifact ", artifact.name(), ": only block tasks upload checkpoints"));
  }
  return ArtifactPath(job.id(), artifact.name());
}

absl::Status Scheduler::RecordArtifact(const std::string& worker_id, const std::string& task_id,
                                       const Artifact& artifact) {
  std::string job_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(const Lease lease, FindLeaseLocked(worker_id, task_id));
    if (lease.stored->job.state() == compress::v1::CANCELLED) {
      return absl::CancelledError(absl::StrCat("job ", lease.stored->job.id(), " was cancelled"));
    }
    StoredJob updated = *lease.stored;
    Job& job = updated.job;
    std::vector<JobEvent> events;
    const int layer = LayerOfCheckpoint(artifact.name());
    auto replace_or_add = [&](google::protobuf::RepeatedPtrField<Artifact>* list) {
      for (Artifact& existing : *list) {
        if (existing.name() == artifact.name()) {
          existing = artifact;
          return;
        }
      }
      *list->Add() = artifact;
    };
    if (layer >= 0) {
      // A block checkpoint: the task's own, kept across attempts.
      JobTask& task = *job.mutable_tasks(lease.index);
      replace_or_add(task.mutable_checkpoints());
      if (std::find(task.finished_layers().begin(), task.finished_layers().end(), layer) ==
          task.finished_layers().end()) {
        task.add_finished_layers(layer);
      }
      JobEvent log;
      log.mutable_log()->set_level("INFO");
      log.mutable_log()->set_text(absl::StrCat(TaskLabel(task), ": block ", layer, " checkpointed (",
                                               artifact.size_bytes(), " bytes)"));
      AddEvent(updated, std::move(log), &events);
    } else {
      replace_or_add(job.mutable_artifacts());
      JobEvent event;
      *event.mutable_artifact() = artifact;
      AddEvent(updated, std::move(event), &events);
    }
    job_id = job.id();
    RETURN_IF_ERROR(CommitLocked(std::move(updated), events));
  }
  metrics_->artifact_bytes_written.Increment(static_cast<double>(artifact.size_bytes()));
  Notify({job_id});
  return absl::OkStatus();
}

absl::StatusOr<ArtifactLocation> Scheduler::FindCheckpoint(const std::string& worker_id,
                                                           const std::string& task_id,
                                                           const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  ASSIGN_OR_RETURN(const Lease lease, FindLeaseLocked(worker_id, task_id));
  const Job& job = lease.stored->job;
  if (job.state() == compress::v1::CANCELLED) {
    return absl::CancelledError(absl::StrCat("job ", job.id(), " was cancelled"));
  }
  for (const JobTask& task : job.tasks()) {
    for (const Artifact& checkpoint : task.checkpoints()) {
      if (checkpoint.name() == name) return ArtifactLocation{ArtifactPath(job.id(), name), checkpoint};
    }
  }
  return absl::NotFoundError(absl::StrCat("job ", job.id(), " has no checkpoint named ", name));
}

absl::Status Scheduler::CompleteTask(const compress::v1::CompleteTaskRequest& request) {
  std::string job_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(const Lease lease, FindLeaseLocked(request.worker_id(), request.task_id()));
    if (IsTerminal(lease.stored->job.state())) return absl::OkStatus();  // cancelled meanwhile
    StoredJob updated = *lease.stored;
    Job& job = updated.job;
    JobTask& task = *job.mutable_tasks(lease.index);
    const std::string label = job.tasks_size() == 1 ? "" : TaskLabel(task) + ": ";
    LOG_INFO("task completed", {{"job", job.id()},
                                {"task", task.lease_id()},
                                {"worker", request.worker_id()},
                                {"success", request.success() ? "true" : "false"},
                                {"error", request.error()}});
    lease_expiry_.erase(task.lease_id());
    ObserveTaskDuration(task, request.success() ? "succeeded" : "failed", absl::Now());
    task.clear_lease_id();
    std::vector<JobEvent> events;
    bool success = request.success();
    absl::StatusCode code = static_cast<absl::StatusCode>(request.error_code());
    std::string error = request.error().empty() ? "worker reported failure" : request.error();
    if (success && task.kind() == compress::v1::TASK_BLOCKS) {
      std::vector<int> missing;
      for (int layer = task.first_layer(); layer < task.end_layer(); ++layer) {
        if (std::find(task.finished_layers().begin(), task.finished_layers().end(), layer) ==
            task.finished_layers().end()) {
          missing.push_back(layer);
        }
      }
      if (!missing.empty()) {
        success = false;
        code = absl::StatusCode::kInternal;
        error = absl::StrCat("finished without a checkpoint for block ", missing.front());
      }
    }
    if (success) {
      task.set_state(compress::v1::TASK_DONE);
      task.set_progress(1.0);
      task.clear_message();
      if (task.kind() != compress::v1::TASK_BLOCKS) *job.mutable_report() = request.report();
      const bool all_done = std::all_of(job.tasks().begin(), job.tasks().end(), [](const JobTask& t) {
        return t.state() == compress::v1::TASK_DONE;
      });
      if (all_done) {
        job.set_progress(1.0);
        AddStateChange(updated, compress::v1::SUCCEEDED, "finished", &events);
      } else {
        JobEvent log;
        log.mutable_log()->set_level("INFO");
        log.mutable_log()->set_text(absl::StrCat(TaskLabel(task), " finished on ", request.worker_id()));
        AddEvent(updated, std::move(log), &events);
        SyncJobStateLocked(updated, absl::StrCat(label, "finished; waiting for the next task"), &events);
      }
    } else {
      error = absl::StrCat(absl::StatusCodeToString(code), ": ", error);
      task.set_failed_attempts(task.failed_attempts() + 1);
      job.set_failed_attempts(job.failed_attempts() + 1);
      task.set_message(error);
      if (IsRetryable(code) && task.failed_attempts() < config_.max_failed_attempts) {
        task.set_state(compress::v1::TASK_PENDING);
        const std::string reason =
            absl::StrCat(label, "attempt ", task.attempts(), " failed on ", request.worker_id(),
                         " (", error, "); requeued");
        if (job.tasks_size() > 1) {
          JobEvent log;
          log.mutable_log()->set_level("WARNING");
          log.mutable_log()->set_text(reason);
          AddEvent(updated, std::move(log), &events);
        }
        SyncJobStateLocked(updated, reason, &events);
        metrics_->task_retries.Increment();
      } else {
        task.set_state(compress::v1::TASK_FAILED);
        AddStateChange(updated, compress::v1::FAILED, absl::StrCat(label, error), &events);
      }
    }
    job_id = job.id();
    RETURN_IF_ERROR(CommitLocked(std::move(updated), events));
    RequeueLocked(jobs_.at(job_id), absl::Now());
    auto worker = workers_.find(request.worker_id());
    if (worker != workers_.end()) worker->second.task_id.clear();
  }
  wake_.notify_all();
  Notify({job_id});
  return absl::OkStatus();
}

}  // namespace compress::server
