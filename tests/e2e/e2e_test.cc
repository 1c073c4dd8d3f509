// The whole service as a user runs it: a real compress-server and two real
// compress-worker processes on loopback ports, driven through the public API
// and the CLI. Models are random Llama-shaped checkpoints the worker writes.
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/recipe.h"
#include "common/safetensors_header.h"
#include "common/sha256.h"
#include "compress/v1/compress.grpc.pb.h"
#include "grpc_reflection_subset.grpc.pb.h"
#include "grpc_standard_services.grpc.pb.h"
#include "tests/testing/subprocess.h"
#include "tests/testing/e2e_models.h"
#include "tests/testing/job_calls.h"
#include "tests/testing/job_stream.h"
#include "tests/testing/postgres.h"
#include "tests/testing/temp_dir.h"

namespace compress {
namespace {

using compress::v1::Job;
using compress::v1::JobEvent;
using compress::v1::JobService;
using testing::Subprocess;
namespace fs = std::filesystem;

class EndToEndTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!store_.SkipReason().empty()) GTEST_SKIP() << store_.SkipReason();
    std::string output;
    ASSERT_EQ(testing::MakeRandomTestModel(COMPRESS_WORKER_BIN, dir_.Sub("models/llama"), 256,
                                           &output),
              0)
        << output;
    port_ = testing::PickFreePort();
    StartServer();
    StartWorker("worker-a");
    StartWorker("worker-b");
  }

  void StartServer(const std::vector<std::string>& extra_flags = {}) {
    std::vector<std::string> argv = {
        COMPRESS_SERVER_BIN, "--listen", absl::StrCat("127.0.0.1:", port_), "--metrics-listen",
        "127.0.0.1:0", "--data-dir", dir_.Sub("data"), "--model-root", dir_.Sub("models"),
        "--lease-seconds", "2", "--log-format", "json"};
    argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
    absl::Status store = store_.AddServerFlags(&argv);  // --store with COMPRESS_TEST_STORE=postgres
    ASSERT_TRUE(store.ok()) << store;
    // A log per start, so the port line read is this start's.
    server_ = std::make_unique<Subprocess>(argv, dir_.Sub(absl::StrCat("server-", ++server_starts_, ".log")));
    ASSERT_GT(server_->WaitForNumber("grpc_port"), 0) << server_->Log();
    auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_),
                                       grpc::InsecureChannelCredentials());
    jobs_ = JobService::NewStub(channel);
  }

  void StartWorker(const std::string& id, const std::vector<std::string>& extra_flags = {}) {
    std::vector<std::string> argv = {
        COMPRESS_WORKER_BIN, "--server", absl::StrCat("127.0.0.1:", port_), "--worker-id", id,
        "--work-dir", dir_.Sub("work-" + id), "--poll-millis", "500", "--metrics-listen",
        "127.0.0.1:0", "--log-format", "json"};
    argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
    workers_[id] = std::make_unique<Subprocess>(argv, dir_.Sub(id + ".log"));
  }

  std::string Submit(const std::string& recipe) {
    return testing::SubmitRecipe(jobs_.get(), recipe);
  }

  grpc::Status SubmitStatus(const std::string& recipe) {
    v1::SubmitJobRequest request;
    absl::StatusOr<v1::JobSpec> spec = ParseRecipe(recipe);
    if (spec.ok()) *request.mutable_spec() = *spec;
    v1::SubmitJobResponse response;
    grpc::ClientContext context;
    return jobs_->SubmitJob(&context, request, &response);
  }

  absl::StatusOr<Job> Get(const std::string& id) { return testing::GetJob(jobs_.get(), id); }

  // Polls until the job ends (tolerating a restarting server).
  Job WaitForEnd(const std::string& id, int timeout_seconds = 120) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_seconds);
    Job last;
    while (std::chrono::steady_clock::now() < deadline) {
      absl::StatusOr<Job> job = Get(id);
      if (job.ok()) {
        last = *job;
        if (last.state() >= v1::SUCCEEDED) return last;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    ADD_FAILURE() << "job " << id << " did not end; last state " << v1::JobState_Name(last.state())
                  << "\nserver log:\n" << server_->Log();
    return last;
  }

  bool WaitForState(const std::string& id, v1::JobState state, int timeout_seconds = 60) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_seconds);
    while (std::chrono::steady_clock::now() < deadline) {
      absl::StatusOr<Job> job = Get(id);
      if (job.ok() && job->state() == state) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

  std::vector<JobEvent> WatchAll(const std::string& id) {
    return testing::WatchToEnd(jobs_.get(), id);
  }

  std::string Download(const std::string& id, const std::string& name) {
    return testing::DownloadArtifact(jobs_.get(), id, name);
  }

  static std::string SleepRecipe(int millis_per_tensor) {
    return absl::StrCat("model: {path: llama}\nstages:\n  - sleep: {millis_per_tensor: ",
                        millis_per_tensor, "}\n");
  }

  testing::TempDir dir_{"e2e"};
  testing::TestStore store_;  // before server_: the server stops before its schema is dropped
  int port_ = 0;
  int server_starts_ = 0;
  std::unique_ptr<Subprocess> server_;
  std::map<std::string, std::unique_ptr<Subprocess>> workers_;
  std::unique_ptr<JobService::Stub> jobs_;
};

TEST_F(EndToEndTest, SubmitWatchFetchAndVerify) {
  std::string id = Submit(R"(
name: llama-w4
model: {path: llama}
stages:
  - rtn: {bits: 4, group_size: 128, symmetric: false}
outputs: [dequantized_safetensors, packed_safetensors]
)");
  std::vector<JobEvent> events = WatchAll(id);
  testing::ExpectGapFree(events);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().state().state(), v1::SUCCEEDED) << events.back().state().reason();
  int progress = 0, metrics = 0;
  double last_fraction = 0;
  for (const JobEvent& e : events) {
    if (e.has_progress()) {
      ++progress;
      EXPECT_GE(e.progress().fraction(), last_fraction);
      last_fraction = e.progress().fraction();
    }
    if (e.has_metric()) ++metrics;
  }
  EXPECT_GE(progress, 14) << "one progress event per quantized tensor (2 blocks x 7 linears)";
  EXPECT_GE(metrics, 4) << "seconds, bytes in, bytes out, mean relative error";

  absl::StatusOr<Job> job = Get(id);
  ASSERT_TRUE(job.ok());
  EXPECT_LT(job->report().size_after_bytes(), job->report().size_before_bytes());
  EXPECT_GT(job->report().bits_per_weight(), 4.0);
  EXPECT_LT(job->report().bits_per_weight(), 5.0);

  std::map<std::string, std::string> files;
  for (const v1::Artifact& artifact : job->artifacts()) {
    std::string data = Download(id, artifact.name());
    EXPECT_EQ(static_cast<int64_t>(data.size()), artifact.size_bytes());
    EXPECT_EQ(Sha256Hex(data), artifact.sha256()) << artifact.name();
    files[artifact.name()] = data;
  }
  ASSERT_TRUE(files.count("dequantized/model.safetensors"));
  ASSERT_TRUE(files.count("packed/model.safetensors"));

  // The dequantized checkpoint has the input's names, shapes and dtypes.
  absl::StatusOr<SafetensorsHeader> input =
      ReadSafetensorsHeader(dir_.Sub("models/llama/model.safetensors"));
  const std::string& dequantized = files["dequantized/model.safetensors"];
  absl::StatusOr<SafetensorsHeader> output =
      ParseSafetensorsHeader(dequantized, dequantized.size(), "dequantized/model.safetensors");
  ASSERT_TRUE(input.ok() && output.ok());
  ASSERT_EQ(input->tensors.size(), output->tensors.size());
  for (const SafetensorsTensorInfo& t : input->tensors) {
    const SafetensorsTensorInfo* o = output->Find(t.name);
    ASSERT_NE(o, nullptr) << t.name;
    EXPECT_EQ(o->shape, t.shape) << t.name;
    EXPECT_EQ(o->dtype, t.dtype) << t.name;
  }
  // The packed checkpoint holds int32 codes for the quantized linears.
  const std::string& packed = files["packed/model.safetensors"];
  absl::StatusOr<SafetensorsHeader> packed_header =
      ParseSafetensorsHeader(packed, packed.size(), "packed/model.safetensors");
  ASSERT_TRUE(packed_header.ok());
  const SafetensorsTensorInfo* qweight =
      packed_header->Find("model.layers.0.self_attn.q_proj.qweight");
  ASSERT_NE(qweight, nullptr);
  EXPECT_EQ(qweight->dtype, SafetensorsDtype::kI32);
  ASSERT_TRUE(files.count("packed/config.json"));
  EXPECT_NE(files["packed/config.json"].find("quantization_config"), std::string::npos);

  // Deleting the ended job frees every artifact byte on the server's disk.
  int64_t artifact_bytes = 0;
  for (const v1::Artifact& artifact : job->artifacts()) artifact_bytes += artifact.size_bytes();
  const std::string folder = dir_.Sub("data/artifacts/" + id);
  ASSERT_TRUE(std::filesystem::exists(folder));
  grpc::ClientContext context;
  v1::DeleteJobRequest request;
  request.set_job_id(id);
  v1::DeleteJobResponse deleted;
  ASSERT_TRUE(jobs_->DeleteJob(&context, request, &deleted).ok());
  EXPECT_EQ(deleted.freed_bytes(), artifact_bytes);
  EXPECT_FALSE(std::filesystem::exists(folder));
  EXPECT_FALSE(Get(id).ok());
}

TEST_F(EndToEndTest, JobsFinishAcrossAServerRestart) {
  std::vector<std::string> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(Submit(SleepRecipe(60)));
  ASSERT_TRUE(WaitForState(ids[0], v1::RUNNING));
  server_->Kill();  // SIGKILL: no chance to clean up
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  StartServer();
  for (const std::string& id : ids) {
    Job job = WaitForEnd(id);
    EXPECT_EQ(job.state(), v1::SUCCEEDED) << id << ": " << job.message();
    std::vector<JobEvent> events = WatchAll(id);
    testing::ExpectGapFree(events);
  }
}

TEST_F(EndToEndTest, AKilledWorkersJobFinishesOnTheOther) {
  // 2 blocks x 7 linears x 250 ms: long enough to kill mid-job.
  std::string id = Submit(SleepRecipe(250));
  ASSERT_TRUE(WaitForState(id, v1::RUNNING));
  absl::StatusOr<Job> running = Get(id);
  ASSERT_TRUE(running.ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  workers_.at(running->worker_id())->Kill();
  Job job = WaitForEnd(id);
  EXPECT_EQ(job.state(), v1::SUCCEEDED) << job.message();
  EXPECT_EQ(job.attempts(), 2);
  EXPECT_NE(job.worker_id(), running->worker_id());
  std::vector<JobEvent> events = WatchAll(id);
  testing::ExpectGapFree(events);
  bool requeued = false;
  for (const JobEvent& e : events) {
    if (e.has_state() && e.state().state() == v1::QUEUED &&
        e.state().reason().find("lease") != std::string::npos) {
      requeued = true;
    }
  }
  EXPECT_TRUE(requeued);
}

TEST_F(EndToEndTest, ASplitJobRunsOnBothWorkersAndWritesTheLocalRunsBytes) {
  testing::WriteCalibrationTokens(dir_.Sub("models/calibration.tokens"), 4096);
  const std::string recipe =
      "model: {path: llama}\n"
      "calibration: {path: calibration.tokens, num_samples: 16, sequence_length: 64, "
      "propagation: PROPAGATION_PARALLEL}\n"
      "stages:\n  - gptq: {bits: 4, group_size: 64}\n"
      "outputs: [DEQUANTIZED_SAFETENSORS, PACKED_SAFETENSORS]\n";
  // Both workers are polling before the job arrives.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  const Job job = WaitForEnd(Submit(recipe), 300);
  ASSERT_EQ(job.state(), v1::SUCCEEDED) << job.message();
  ASSERT_EQ(job.tasks_size(), 3);  // block 0, block 1, assemble
  std::set<std::string> block_workers;
  for (const v1::JobTask& task : job.tasks()) {
    EXPECT_EQ(task.state(), v1::TASK_DONE);
    if (task.kind() == v1::TASK_BLOCKS) block_workers.insert(task.worker_id());
  }
  EXPECT_EQ(block_workers.size(), 2u) << "the two block ranges ran on the two workers";
  testing::ExpectGapFree(WatchAll(job.id()));

  // The same recipe in one process on one machine.
  std::ofstream(dir_.Sub("split.json")) << ToJson(*ParseRecipe(recipe));
  std::string output;
  ASSERT_EQ(testing::RunCommand({COMPRESS_WORKER_BIN, "run", "--recipe", dir_.Sub("split.json"),
                                 "--model-root", dir_.Sub("models"), "--out", dir_.Sub("local")},
                                &output),
            0)
      << output;
  int compared = 0;
  for (const v1::Artifact& artifact : job.artifacts()) {
    if (artifact.name() == "report.json") continue;
    ASSERT_TRUE(fs::exists(dir_.Sub("local/" + artifact.name()))) << artifact.name();
    EXPECT_EQ(*Sha256OfFile(dir_.Sub("local/" + artifact.name())), artifact.sha256())
        << artifact.name() << " differs from the single-process run";
    ++compared;
  }
  EXPECT_GE(compared, 4);  // both checkpoints' weights and configs
}

// JSON log lines from every process name the job, its task and the worker,
// so a log system can follow one job from the server to the worker.
TEST_F(EndToEndTest, JsonLogsFollowOneJobAcrossProcesses) {
  const Job job = WaitForEnd(Submit("model: {path: llama}\nstages: [{rtn: {bits: 4}}]\n"));
  ASSERT_EQ(job.state(), v1::SUCCEEDED);
  const std::string task = job.tasks(0).lease_id().empty()
                               ? absl::StrCat(job.id(), "-t0-a", job.tasks(0).attempts())
                               : job.tasks(0).lease_id();
  auto lines_about = [&](const std::string& log) {
    std::vector<nlohmann::json> found;
    std::istringstream in(log);
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty() || line[0] != '{') continue;  // the port lines on stdout
      nlohmann::json object = nlohmann::json::parse(line, nullptr, false);
      EXPECT_FALSE(object.is_discarded()) << line;
      if (!object.is_discarded() && object.value("job", "") == job.id()) found.push_back(object);
    }
    return found;
  };
  bool server_dispatch = false;
  for (const nlohmann::json& line : lines_about(server_->Log())) {
    if (line["msg"] == "task dispatched") {
      server_dispatch = line["task"] == task && line["worker"] == job.worker_id();
    }
  }
  EXPECT_TRUE(server_dispatch) << server_->Log();
  bool worker_started = false;
  for (const nlohmann::json& line : lines_about(workers_.at(job.worker_id())->Log())) {
    if (line["msg"] == "task started") {
      worker_started = line["task"] == task && line["worker"] == job.worker_id() &&
                       line["component"] == "worker";
    }
  }
  EXPECT_TRUE(worker_started) << workers_.at(job.worker_id())->Log();
}

TEST_F(EndToEndTest, PauseStopsTheWorkerAndResumeFinishesWithTheUninterruptedBytes) {
  testing::WriteCalibrationTokens(dir_.Sub("models/calibration.tokens"), 4096);
  // Sequential calibration: one block task that checkpoints each block;
  // the sleep stage makes each block take a while.
  const std::string recipe =
      "model: {path: llama}\n"
      "calibration: {path: calibration.tokens, num_samples: 16, sequence_length: 64}\n"
      "stages: [{gptq: {bits: 4, group_size: 64}}, {sleep: {millis_per_tensor: 300}}]\n"
      "outputs: [DEQUANTIZED_SAFETENSORS]\n";
  const std::string id = Submit(recipe);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  absl::StatusOr<Job> job = Get(id);
  while (std::chrono::steady_clock::now() < deadline &&
         (!job.ok() || job->tasks(0).finished_layers_size() == 0)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    job = Get(id);
  }
  ASSERT_TRUE(job.ok() && job->tasks(0).finished_layers_size() == 1) << "block 0 never checkpointed";
  const std::string worker = job->tasks(0).worker_id();
  {
    grpc::ClientContext context;
    v1::PauseJobRequest request;
    request.set_job_id(id);
    Job paused;
    ASSERT_TRUE(jobs_->PauseJob(&context, request, &paused).ok());
    EXPECT_EQ(paused.state(), v1::PAUSED);
  }
  // The worker notices within a renewal or two and frees itself: a quick job
  // submitted now runs while the paused one waits.
  const Job quick = WaitForEnd(Submit(SleepRecipe(1)), 60);
  EXPECT_EQ(quick.state(), v1::SUCCEEDED);
  EXPECT_EQ(Get(id)->state(), v1::PAUSED);
  {
    grpc::ClientContext context;
    v1::ResumeJobRequest request;
    request.set_job_id(id);
    Job resumed;
    ASSERT_TRUE(jobs_->ResumeJob(&context, request, &resumed).ok());
  }
  const Job done = WaitForEnd(id, 300);
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.message();
  EXPECT_EQ(done.tasks(0).attempts(), 2);
  bool resumed_from_checkpoint = false;
  for (const JobEvent& e : WatchAll(id)) {
    if (e.has_log() && e.log().text().find("resuming: 1 block(s) already checkpointed") != std::string::npos) {
      resumed_from_checkpoint = true;
    }
  }
  EXPECT_TRUE(resumed_from_checkpoint);
  EXPECT_NE(workers_.at(worker)->Log().find("lease lost"), std::string::npos) << workers_.at(worker)->Log();

  std::ofstream(dir_.Sub("paused.json")) << ToJson(*ParseRecipe(recipe));
  std::string output;
  ASSERT_EQ(testing::RunCommand({COMPRESS_WORKER_BIN, "run", "--recipe", dir_.Sub("paused.json"),
                                 "--model-root", dir_.Sub("models"), "--out", dir_.Sub("local")},
                                &output),
            0)
      << output;
  for (const v1::Artifact& artifact : done.artifacts()) {
    if (artifact.name() == "report.json") continue;
    EXPECT_EQ(*Sha256OfFile(dir_.Sub("local/" + artifact.name())), artifact.sha256()) << artifact.name();
  }
}

TEST_F(EndToEndTest, CancelFreesTheWorkerWithinSeconds) {
  const std::string id = Submit(SleepRecipe(2000));  // ~40 s of work
  ASSERT_TRUE(WaitForState(id, v1::RUNNING));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const std::string worker = Get(id)->worker_id();
  // Keep the other worker busy so the next job must wait for this one.
  for (auto& [name, process] : workers_) {
    if (name != worker) process->Kill();
  }
  {
    grpc::ClientContext context;
    v1::CancelJobRequest request;
    request.set_job_id(id);
    Job cancelled;
    ASSERT_TRUE(jobs_->CancelJob(&context, request, &cancelled).ok());
  }
  const auto cancelled_at = std::chrono::steady_clock::now();
  const Job next = WaitForEnd(Submit(SleepRecipe(1)), 60);
  ASSERT_EQ(next.state(), v1::SUCCEEDED);
  EXPECT_EQ(next.worker_id(), worker);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - cancelled_at).count();
  EXPECT_LT(seconds, 10.0) << "the cancelled task held its worker too long";
}

TEST_F(EndToEndTest, BadRequestsAreRefusedAndTheServerKeepsServing) {
  EXPECT_EQ(SubmitStatus("model: {path: llama}\nstages: [{name: nothing}]\n").error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(SubmitStatus("model: {path: /etc}\nstages: [{rtn: {bits: 4}}]\n").error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(SubmitStatus("model: {path: no-such-model}\nstages: [{rtn: {bits: 4}}]\n").error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(SubmitStatus("model: {path: llama}\nstages: [{rtn: {bits: -3}}]\n").error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  // The recipe against the model's tensors, at submit: a group size that
  // does not divide the inputs, a pattern that selects nothing.
  const grpc::Status group =
      SubmitStatus("model: {path: llama}\nstages: [{rtn: {bits: 4, group_size: 100}}]\n");
  EXPECT_EQ(group.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(group.error_message().find("stages[0].rtn.group_size: 100 does not divide"),
            std::string::npos)
      << group.error_message();
  const grpc::Status pattern =
      SubmitStatus("model: {path: llama}\nstages: [{hqq: {bits: 3, include: [vision_tower]}}]\n");
  EXPECT_EQ(pattern.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(pattern.error_message().find("include pattern 'vision_tower' matches no"),
            std::string::npos)
      << pattern.error_message();
  EXPECT_TRUE(server_->Running());
  Job ok = WaitForEnd(Submit("model: {path: llama}\nstages: [{rtn: {bits: 8}}]\n"));
  EXPECT_EQ(ok.state(), v1::SUCCEEDED) << ok.message();
}

TEST_F(EndToEndTest, TheCliSubmitsWatchesAndFetches) {
  std::string server = absl::StrCat("127.0.0.1:", port_);
  std::string output;
  int rc = testing::RunCommand({COMPRESSCTL_BIN, "--server", server, "submit", "--model", "llama",
                                "--method", "rtn", "--bits", "4", "--group-size", "128",
                                "--output", "dequantized,packed", "--watch", "--json"},
                               &output);
  ASSERT_EQ(rc, 0) << output;
  // The job id is the first job-... token printed.
  size_t at = output.find("job-");
  ASSERT_NE(at, std::string::npos) << output;
  std::string id = output.substr(at, 20);
  rc = testing::RunCommand({COMPRESSCTL_BIN, "--server", server, "fetch", id, "--out",
                            dir_.Sub("fetched")},
                           &output);
  ASSERT_EQ(rc, 0) << output;
  absl::StatusOr<Job> job = Get(id);
  ASSERT_TRUE(job.ok());
  for (const v1::Artifact& artifact : job->artifacts()) {
    absl::StatusOr<std::string> sha = Sha256OfFile(dir_.Sub("fetched/" + artifact.name()));
    ASSERT_TRUE(sha.ok()) << artifact.name();
    EXPECT_EQ(*sha, artifact.sha256());
  }
  rc = testing::RunCommand({COMPRESSCTL_BIN, "--server", server, "get", "job-missing"}, &output);
  EXPECT_EQ(rc, 2) << output;
  EXPECT_NE(output.find("NOT_FOUND"), std::string::npos) << output;
}

TEST_F(EndToEndTest, GenericGrpcToolsSeeHealthAndReflection) {
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_),
                                     grpc::InsecureChannelCredentials());
  auto health = grpc::health::v1::Health::NewStub(channel);
  for (const std::string service : {"", "compress.v1.JobService", "compress.v1.WorkerService"}) {
    grpc::ClientContext context;
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(service);
    grpc::health::v1::HealthCheckResponse response;
    grpc::Status status = health->Check(&context, request, &response);
    ASSERT_TRUE(status.ok()) << "service '" << service << "': " << status.error_message();
    EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING) << service;
  }

  auto reflection = grpc::reflection::v1alpha::ServerReflection::NewStub(channel);
  grpc::ClientContext context;
  auto stream = reflection->ServerReflectionInfo(&context);
  grpc::reflection::v1alpha::ServerReflectionRequest request;
  request.set_list_services("");
  ASSERT_TRUE(stream->Write(request));
  request.set_file_containing_symbol("compress.v1.JobService");
  ASSERT_TRUE(stream->Write(request));
  stream->WritesDone();
  grpc::reflection::v1alpha::ServerReflectionResponse listed, described;
  ASSERT_TRUE(stream->Read(&listed));
  ASSERT_TRUE(stream->Read(&described));
  EXPECT_TRUE(stream->Finish().ok());
  std::set<std::string> names;
  for (const auto& service : listed.list_services_response().service()) names.insert(service.name());
  EXPECT_TRUE(names.count("compress.v1.JobService"));
  EXPECT_TRUE(names.count("compress.v1.WorkerService"));
  EXPECT_TRUE(names.count("grpc.health.v1.Health"));
  ASSERT_GT(described.file_descriptor_response().file_descriptor_proto_size(), 0);
  EXPECT_NE(described.file_descriptor_response().file_descriptor_proto(0).find("SubmitJob"),
            std::string::npos);
}

// With tokens configured, the CLI and workers authenticate and jobs still run.
TEST_F(EndToEndTest, TokensGuardClientsAndWorkers) {
  std::ofstream(dir_.Sub("tokens")) << "client-token-00000000 team-a client\n"
                                    << "worker-token-00000000 - worker\n";
  std::ofstream(dir_.Sub("worker.token")) << "worker-token-00000000\n";
  for (auto& [id, worker] : workers_) worker->Kill();
  workers_.clear();
  server_->Kill();
  StartServer({"--auth-tokens", dir_.Sub("tokens")});
  StartWorker("worker-a");  // no token: refused, keeps retrying
  StartWorker("worker-t", {"--token-file", dir_.Sub("worker.token")});
  std::string server = absl::StrCat("127.0.0.1:", port_);
  std::string output;
  EXPECT_EQ(testing::RunCommand({COMPRESSCTL_BIN, "--server", server, "list"}, &output), 2);
  EXPECT_NE(output.find("UNAUTHENTICATED"), std::string::npos) << output;
  int rc = testing::RunCommand({COMPRESSCTL_BIN, "--server", server, "--token",
                                "client-token-00000000", "submit", "--model", "llama", "--bits",
                                "8", "--watch", "--json"},
                               &output);
  EXPECT_EQ(rc, 0) << output;
  EXPECT_NE(output.find("worker-t"), std::string::npos) << output;
  EXPECT_EQ(output.find("worker-a"), std::string::npos) << output;
  // The tokenless worker may still be starting on a loaded machine: give it time to be refused.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (workers_["worker-a"]->Log().find("UNAUTHENTICATED") == std::string::npos &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_NE(workers_["worker-a"]->Log().find("UNAUTHENTICATED"), std::string::npos)
      << workers_["worker-a"]->Log();
}

// Every /metrics page parses as Prometheus text and passes promtool's lint.
TEST_F(EndToEndTest, MetricsPagesPassPromtool) {
  Job job = WaitForEnd(Submit("model: {path: llama}\nstages: [{rtn: {bits: 4}}]\n"));
  ASSERT_EQ(job.state(), v1::SUCCEEDED);
  std::vector<std::pair<std::string, int>> pages = {
      {"server", server_->WaitForNumber("metrics_port")}};
  for (auto& [id, worker] : workers_) pages.push_back({id, worker->WaitForNumber("metrics_port")});
  for (const auto& [who, port] : pages) {
    ASSERT_GT(port, 0) << who;
    httplib::Client http("127.0.0.1", port);
    auto health = http.Get("/healthz");
    ASSERT_TRUE(health) << who;
    EXPECT_EQ(health->status, 200) << who;
    auto page = http.Get("/metrics");
    ASSERT_TRUE(page) << who;
    EXPECT_NE(page->body.find(who == "server" ? "compress_jobs_finished_total{state=\"SUCCEEDED\",tenant=\"default\"} 1"
                                              : "compress_worker_resident_memory_bytes"),
              std::string::npos)
        << who << "\n" << page->body;
    if (!fs::exists("/usr/bin/promtool")) continue;
    std::string path = dir_.Sub(who + ".metrics");
    std::ofstream(path) << page->body;
    std::string output;
    int rc = testing::RunCommand({"/bin/sh", "-c", "/usr/bin/promtool check metrics < " + path}, &output);
    EXPECT_EQ(rc, 0) << who << ": " << output;
  }
  if (!fs::exists("/usr/bin/promtool")) GTEST_SKIP() << "promtool not installed (scripts/setup.sh installs it)";
}

// The project's trained model (tests/fixtures/kjv-llama) under the model
// root, with held-out text (Revelation) and calibration text (the Gospels)
// from Debian's bible-kjv.
void AddTrainedModel(const testing::TempDir& dir) {
  fs::copy(FIXTURES_DIR "/kjv-llama", dir.Sub("models/kjv-llama"), fs::copy_options::recursive);
  for (const auto& [file, range] : {std::pair{"revelation.txt", "Rev1:1-Rev22:21"},
                                    std::pair{"gospels.txt", "Matt1:1-John21:25"}}) {
    std::string text;
    ASSERT_EQ(testing::RunCommand({"/bin/sh", "-c",
                                   absl::StrCat("bible -f ", range, " | sed 's/^[^ ]* //'")},
                                  &text),
              0);
    ASSERT_GT(text.size(), 10000u) << "bible-kjv is missing: bash scripts/setup.sh installs it";
    std::ofstream(dir.Sub(absl::StrCat("models/", file))) << text;
  }
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// An example recipe, made quicker for a test: fewer calibration samples,
// fewer evaluation tokens.
v1::JobSpec QuickExample(const std::string& file) {
  absl::StatusOr<v1::JobSpec> spec = LoadRecipeFile(absl::StrCat(EXAMPLES_DIR, "/", file));
  EXPECT_TRUE(spec.ok()) << spec.status();
  if (spec->has_calibration()) spec->mutable_calibration()->set_num_samples(16);
  for (v1::Stage& stage : *spec->mutable_stages()) {
    if (stage.has_evaluate()) stage.mutable_evaluate()->set_max_tokens(2048);
  }
  return *spec;
}

TEST_F(EndToEndTest, TheTrainedModelIsQuantizedWithGptqAndEvaluatedByTheServiceAndLocally) {
  AddTrainedModel(dir_);
  // Through the service: the README demo's recipe.
  const Job gptq = WaitForEnd(Submit(ToJson(QuickExample("kjv-w4-gptq.yaml"))), 300);
  ASSERT_EQ(gptq.state(), v1::SUCCEEDED) << gptq.message();
  const v1::EvaluationReport& service = gptq.report().evaluation();
  EXPECT_EQ(service.before().tokens_scored(), 2047);
  EXPECT_GT(service.before().perplexity(), 1.0);
  // Four bits with GPTQ cost a few percent of perplexity, not more.
  EXPECT_LT(service.after().perplexity(), 1.10 * service.before().perplexity());
  EXPECT_GT(service.mean_kl_divergence(), 0.0);
  EXPECT_LT(service.mean_kl_divergence(), 0.1);
  EXPECT_GT(service.top1_agreement(), 0.8);
  EXPECT_NE(service.before().sample().find(" the "), std::string::npos) << service.before().sample();
  EXPECT_FALSE(service.after().sample().empty());
  EXPECT_EQ(gptq.report().stages(0).method(), "gptq");
  // Every layer's output error on the calibration inputs is below RTN's.
  ASSERT_EQ(gptq.report().stages(0).tensors_size(), 6 * 7);
  for (const v1::TensorReport& t : gptq.report().stages(0).tensors()) {
    EXPECT_GT(t.output_error(), 0.0) << t.name();
    EXPECT_LT(t.output_error(), t.rtn_output_error()) << t.name();
  }
  // The GPTQ result as llama.cpp's file, uploaded like the other artifacts.
  bool gguf = false;
  for (const v1::Artifact& a : gptq.artifacts()) {
    if (a.name() == "gguf/kjv-llama-Q4_K_M.gguf" && a.format() == v1::GGUF && a.size_bytes() > 0) gguf = true;
  }
  EXPECT_TRUE(gguf);
  ASSERT_EQ(gptq.report().gguf_size(), 1);
  // Q4_K_M on 6 blocks: 13 norms F32; the output and attn_v/ffn_down of
  // blocks 2 and 5 (use_more_bits) Q6_K; the other 39 matrices Q4_K.
  std::map<std::string, int> types(gptq.report().gguf(0).tensor_types().begin(),
                                   gptq.report().gguf(0).tensor_types().end());
  EXPECT_EQ(types, (std::map<std::string, int>{{"F32", 13}, {"Q4_K", 39}, {"Q6_K", 5}}));

  // Locally: the RTN example on the same files, with the worker's local mode.
  std::string output;
  std::ofstream(dir_.Sub("w4-rtn.json")) << ToJson(QuickExample("w4-rtn.yaml"));
  ASSERT_EQ(testing::RunCommand({COMPRESS_WORKER_BIN, "run", "--recipe",
                                 dir_.Sub("w4-rtn.json"), "--model-root", dir_.Sub("models"),
                                 "--out", dir_.Sub("local")},
                                &output),
            0)
      << output;
  v1::JobReport local;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(ReadText(dir_.Sub("local/report.json")),
                                                          &local)
                  .ok());
  // The same original model and windows; RTN loses more than GPTQ.
  EXPECT_DOUBLE_EQ(local.evaluation().before().perplexity(), service.before().perplexity());
  EXPECT_GT(local.evaluation().mean_kl_divergence(), service.mean_kl_divergence());
  EXPECT_TRUE(fs::exists(dir_.Sub("local/packed/model.safetensors")));
  EXPECT_NE(output.find("evaluate"), std::string::npos) << "progress lines name the stages";
}

}  // namespace
}  // namespace compress
