// compress-server in-process on a loopback port, driven through the real
// gRPC stubs: a test client on JobService and a scripted worker on
// WorkerService.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/safetensors_header.h"
#include "common/sha256.h"
#include "compress/v1/compress.grpc.pb.h"
#include "server/server.h"
#include "tests/testing/job_stream.h"
#include "tests/testing/temp_dir.h"

namespace compress::server {
namespace {

using compress::v1::JobEvent;
using compress::v1::JobService;
using compress::v1::WorkerService;
namespace fs = std::filesystem;

// A valid one-tensor checkpoint: the server reads headers at submit.
void WriteTinySafetensors(const std::string& path) {
  absl::StatusOr<SafetensorsHeader> header =
      LayoutSafetensors({{"model.layers.0.mlp.up_proj.weight", SafetensorsDtype::kF32, {2, 128}}}, {});
  ASSERT_TRUE(header.ok());
  absl::StatusOr<std::string> bytes = SerializeSafetensorsHeader(&*header);
  ASSERT_TRUE(bytes.ok());
  std::ofstream(path, std::ios::binary) << *bytes << std::string(2 * 128 * 4, '\0');
}

// A four-block checkpoint (one linear per block) whose config.json claims
// `hidden` wide layers: the planner sizes its tasks from the config.
void WriteDeepModel(const std::string& folder, int64_t hidden) {
  fs::create_directories(folder);
  std::vector<SafetensorsTensorSpec> specs;
  for (int layer = 0; layer < 4; ++layer) {
    specs.push_back({absl::StrCat("model.layers.", layer, ".mlp.up_proj.weight"),
                     SafetensorsDtype::kF32, {2, 128}});
  }
  absl::StatusOr<SafetensorsHeader> header = LayoutSafetensors(specs, {});
  ASSERT_TRUE(header.ok());
  absl::StatusOr<std::string> bytes = SerializeSafetensorsHeader(&*header);
  ASSERT_TRUE(bytes.ok());
  std::ofstream(folder + "/model.safetensors", std::ios::binary)
      << *bytes << std::string(4 * 2 * 128 * 4, '\0');
  std::ofstream(folder + "/config.json")
      << absl::StrCat("{\"num_hidden_layers\": 4, \"hidden_size\": ", hidden,
                      ", \"intermediate_size\": ", 4 * hidden,
                      ", \"num_attention_heads\": 32, \"vocab_size\": 32000}");
}

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(models_.Sub("tiny"));
    WriteTinySafetensors(models_.Sub("tiny/model.safetensors"));
    WriteTinySafetensors(outside_.Sub("model.safetensors"));
    WriteDeepModel(models_.Sub("deep"), 128);
    WriteDeepModel(models_.Sub("wide"), 8192);
    std::ofstream(models_.Sub("calibration.txt")) << std::string(600, 'x');
    StartServer(/*lease_seconds=*/30);
  }

  void StartServer(int lease_seconds, const std::string& auth_tokens_file = "",
                   int max_task_memory_gib = 256) {
    ServerConfig config;
    config.max_task_memory_gib = max_task_memory_gib;
    config.auth_tokens_file = auth_tokens_file;
    config.listen = "127.0.0.1:0";
    config.metrics_listen = "127.0.0.1:0";
    config.data_dir = data_.path();
    config.model_roots = {models_.path()};
    config.lease_seconds = lease_seconds;
    config.retention = retention_;
    server_ = std::make_unique<CompressServer>(config);
    ASSERT_TRUE(server_->Start().ok());
    auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->grpc_port()),
                                       grpc::InsecureChannelCredentials());
    jobs_ = JobService::NewStub(channel);
    workers_ = WorkerService::NewStub(channel);
  }

  grpc::Status Delete(const std::string& id,
                      compress::v1::DeleteJobResponse* response = nullptr) {
    grpc::ClientContext context;
    compress::v1::DeleteJobRequest request;
    request.set_job_id(id);
    compress::v1::DeleteJobResponse ignored;
    return jobs_->DeleteJob(&context, request, response ? response : &ignored);
  }

  grpc::StatusCode GetCode(const std::string& id) {
    grpc::ClientContext context;
    compress::v1::GetJobRequest request;
    request.set_job_id(id);
    compress::v1::Job job;
    return jobs_->GetJob(&context, request, &job).error_code();
  }

  std::string MetricsPage() {
    httplib::Client http("127.0.0.1", server_->metrics_port());
    auto page = http.Get("/metrics");
    return page ? page->body : "";
  }

  // True once /metrics holds `line` (gauges update on the dispatcher's tick).
  bool MetricsPageShows(const std::string& line) {
    const absl::Time deadline = absl::Now() + absl::Seconds(5);
    while (absl::Now() < deadline) {
      if (MetricsPage().find("\n" + line + "\n") != std::string::npos) return true;
      absl::SleepFor(absl::Milliseconds(100));
    }
    return false;
  }

  std::vector<std::string> ArtifactDirEntries() {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(data_.Sub("artifacts"))) {
      names.push_back(entry.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }

  void RestartServer(int lease_seconds, int max_task_memory_gib = 256) {
    server_->Shutdown();
    server_.reset();
    StartServer(lease_seconds, "", max_task_memory_gib);
  }

  // GPTQ on `model` with calibration: planned as block tasks and an assemble task.
  compress::v1::SubmitJobRequest GptqRequest(const std::string& model, bool parallel) {
    compress::v1::SubmitJobRequest request;
    compress::v1::JobSpec& spec = *request.mutable_spec();
    spec.mutable_model()->set_path(model);
    spec.add_stages()->mutable_gptq()->set_bits(4);
    spec.mutable_calibration()->set_path("calibration.txt");
    spec.mutable_calibration()->set_sequence_length(64);
    spec.mutable_calibration()->set_num_samples(8);
    spec.mutable_calibration()->set_propagation(parallel ? compress::v1::PROPAGATION_PARALLEL
                                                         : compress::v1::PROPAGATION_SEQUENTIAL);
    return request;
  }

  static std::string CheckpointName(int layer) {
    char name[64];
    std::snprintf(name, sizeof(name), "blocks/layer-%05d.safetensors", layer);
    return name;
  }

  grpc::Status UploadCheckpoint(const std::string& worker, const std::string& task_id, int layer) {
    const std::string data = absl::StrCat("checkpoint of block ", layer);
    return Upload(worker, task_id, CheckpointName(layer), data, Sha256Hex(data));
  }

  // The checkpoint's bytes as FetchCheckpoint serves them.
  grpc::Status Fetch(const std::string& worker, const std::string& task_id,
                     const std::string& name, std::string* data) {
    grpc::ClientContext context;
    compress::v1::FetchCheckpointRequest request;
    request.set_worker_id(worker);
    request.set_task_id(task_id);
    request.set_name(name);
    auto reader = workers_->FetchCheckpoint(&context, request);
    compress::v1::ArtifactChunk chunk;
    while (reader->Read(&chunk)) *data += chunk.data();
    return reader->Finish();
  }

  grpc::Status Pause(const std::string& id, compress::v1::Job* job) {
    grpc::ClientContext context;
    compress::v1::PauseJobRequest request;
    request.set_job_id(id);
    return jobs_->PauseJob(&context, request, job);
  }

  grpc::Status Resume(const std::string& id, compress::v1::Job* job) {
    grpc::ClientContext context;
    compress::v1::ResumeJobRequest request;
    request.set_job_id(id);
    return jobs_->ResumeJob(&context, request, job);
  }

  compress::v1::SubmitJobRequest RtnRequest(const std::string& model = "tiny", int bits = 4) {
    compress::v1::SubmitJobRequest request;
    request.mutable_spec()->mutable_model()->set_path(model);
    auto* rtn = request.mutable_spec()->add_stages()->mutable_rtn();
    rtn->set_bits(bits);
    rtn->set_group_size(128);
    return request;
  }

  grpc::Status Submit(const compress::v1::SubmitJobRequest& request,
                      compress::v1::SubmitJobResponse* response) {
    grpc::ClientContext context;
    return jobs_->SubmitJob(&context, request, response);
  }

  std::string SubmitOk(const compress::v1::SubmitJobRequest& request) {
    compress::v1::SubmitJobResponse response;
    grpc::Status status = Submit(request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response.job().id();
  }

  // The ids of every job `request` lists, page by page (`page_size` each).
  std::vector<std::string> ListAllPages(compress::v1::ListJobsRequest request, int page_size) {
    std::vector<std::string> seen;
    request.set_page_size(page_size);
    do {
      grpc::ClientContext context;
      compress::v1::ListJobsResponse page;
      grpc::Status status = jobs_->ListJobs(&context, request, &page);
      EXPECT_TRUE(status.ok()) << status.error_message();
      if (!status.ok()) break;
      EXPECT_LE(page.jobs_size(), page_size);
      for (const auto& j : page.jobs()) seen.push_back(j.id());
      request.set_page_token(page.next_page_token());
    } while (!request.page_token().empty());
    return seen;
  }

  compress::v1::Job Get(const std::string& id) {
    grpc::ClientContext context;
    compress::v1::GetJobRequest request;
    request.set_job_id(id);
    compress::v1::Job job;
    grpc::Status status = jobs_->GetJob(&context, request, &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return job;
  }

  std::string Register(const std::string& worker_id, int64_t memory_bytes = 0) {
    grpc::ClientContext context;
    compress::v1::RegisterWorkerRequest request;
    request.set_worker_id(worker_id);
    request.set_device("cpu");
    request.set_memory_bytes(memory_bytes);
    compress::v1::RegisterWorkerResponse response;
    EXPECT_TRUE(workers_->RegisterWorker(&context, request, &response).ok());
    return response.worker_id();
  }

  compress::v1::AcquireTaskResponse Acquire(const std::string& worker_id, int wait_millis = 2000) {
    grpc::ClientContext context;
    compress::v1::AcquireTaskRequest request;
    request.set_worker_id(worker_id);
    request.set_wait_millis(wait_millis);
    compress::v1::AcquireTaskResponse response;
    grpc::Status status = workers_->AcquireTask(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }

  grpc::Status Report(const std::string& worker_id, const std::string& task_id, double fraction,
                      bool* cancelled = nullptr) {
    grpc::ClientContext context;
    compress::v1::ReportEventsRequest request;
    request.set_worker_id(worker_id);
    request.set_task_id(task_id);
    JobEvent* event = request.add_events();
    event->mutable_progress()->set_fraction(fraction);
    event->mutable_progress()->set_message(absl::StrCat("at ", fraction));
    compress::v1::ReportEventsResponse response;
    grpc::Status status = workers_->ReportEvents(&context, request, &response);
    if (cancelled) *cancelled = response.cancelled();
    return status;
  }

  grpc::Status Upload(const std::string& worker_id, const std::string& task_id,
                      const std::string& name, const std::string& data,
                      const std::string& declared_sha256) {
    grpc::ClientContext context;
    compress::v1::UploadArtifactResponse response;
    auto writer = workers_->UploadArtifact(&context, &response);
    compress::v1::UploadArtifactRequest request;
    request.set_worker_id(worker_id);
    request.set_task_id(task_id);
    request.mutable_artifact()->set_name(name);
    request.mutable_artifact()->set_size_bytes(static_cast<int64_t>(data.size()));
    request.mutable_artifact()->set_sha256(declared_sha256);
    // Two messages, to exercise reassembly.
    size_t half = data.size() / 2;
    request.set_data(data.substr(0, half));
    writer->Write(request);
    request.clear_artifact();
    request.set_data(data.substr(half));
    writer->Write(request);
    writer->WritesDone();
    return writer->Finish();
  }

  grpc::Status Complete(const std::string& worker_id, const std::string& task_id, bool success,
                        const std::string& error = "",
                        grpc::StatusCode code = grpc::StatusCode::INVALID_ARGUMENT) {
    grpc::ClientContext context;
    compress::v1::CompleteTaskRequest request;
    request.set_worker_id(worker_id);
    request.set_task_id(task_id);
    request.set_success(success);
    request.set_error(error);
    request.set_error_code(success ? 0 : static_cast<int>(code));
    request.mutable_report()->set_bits_per_weight(4.25);
    compress::v1::CompleteTaskResponse response;
    return workers_->CompleteTask(&context, request, &response);
  }

  std::vector<JobEvent> WatchAll(const std::string& id, int64_t from = 0) {
    return testing::WatchToEnd(jobs_.get(), id, from);
  }

  testing::TempDir data_{"data"};
  testing::TempDir models_{"models"};
  testing::TempDir outside_{"outside"};
  absl::Duration retention_ = absl::ZeroDuration();
  std::unique_ptr<CompressServer> server_;
  std::unique_ptr<JobService::Stub> jobs_;
  std::unique_ptr<WorkerService::Stub> workers_;
};

TEST_F(ServerTest, SubmitGetAndListWithPagingAndLabels) {
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) {
    auto request = RtnRequest();
    (*request.mutable_spec()->mutable_labels())["team"] = i % 2 ? "odd" : "even";
    ids.push_back(SubmitOk(request));
  }
  compress::v1::Job job = Get(ids[0]);
  EXPECT_EQ(job.state(), compress::v1::QUEUED);
  EXPECT_EQ(job.spec().stages(0).rtn().bits(), 4);

  std::vector<std::string> newest_first(ids.rbegin(), ids.rend());
  EXPECT_EQ(ListAllPages(compress::v1::ListJobsRequest(), 2), newest_first);

  grpc::ClientContext context;
  compress::v1::ListJobsRequest request;
  (*request.mutable_labels())["team"] = "odd";
  compress::v1::ListJobsResponse page;
  ASSERT_TRUE(jobs_->ListJobs(&context, request, &page).ok());
  EXPECT_EQ(page.jobs_size(), 2);
}

TEST_F(ServerTest, ListingFiltersByStateAcrossPagesAndSurvivesARestart) {
  std::vector<std::string> ids;
  for (int i = 0; i < 7; ++i) ids.push_back(SubmitOk(RtnRequest()));
  for (int cancelled : {1, 4}) {
    grpc::ClientContext context;
    compress::v1::CancelJobRequest cancel;
    cancel.set_job_id(ids[cancelled]);
    compress::v1::Job job;
    ASSERT_TRUE(jobs_->CancelJob(&context, cancel, &job).ok());
  }
  auto list_all_pages = [&](compress::v1::JobState state) {
    compress::v1::ListJobsRequest request;
    request.add_states(state);
    return ListAllPages(request, 2);
  };
  const std::vector<std::string> queued = {ids[6], ids[5], ids[3], ids[2], ids[0]};
  const std::vector<std::string> cancelled = {ids[4], ids[1]};
  EXPECT_EQ(list_all_pages(compress::v1::QUEUED), queued);
  EXPECT_EQ(list_all_pages(compress::v1::CANCELLED), cancelled);
  RestartServer(/*lease_seconds=*/30);
  EXPECT_EQ(list_all_pages(compress::v1::QUEUED), queued);
  EXPECT_EQ(list_all_pages(compress::v1::CANCELLED), cancelled);
  const std::string newest = SubmitOk(RtnRequest());
  EXPECT_EQ(list_all_pages(compress::v1::QUEUED).front(), newest);
}

TEST_F(ServerTest, SubmitIsIdempotentOnRequestId) {
  auto request = RtnRequest();
  request.set_request_id("pipeline-run-7");
  compress::v1::SubmitJobResponse first, second, third;
  ASSERT_TRUE(Submit(request, &first).ok());
  ASSERT_TRUE(Submit(request, &second).ok());
  EXPECT_TRUE(first.created());
  EXPECT_FALSE(second.created());
  EXPECT_EQ(first.job().id(), second.job().id());
  request.mutable_spec()->mutable_stages(0)->mutable_rtn()->set_bits(8);
  EXPECT_EQ(Submit(request, &third).error_code(), grpc::StatusCode::ALREADY_EXISTS);
}

TEST_F(ServerTest, BadRequestsGetClearCodesAndTheServerKeepsServing) {
  compress::v1::SubmitJobResponse response;
  auto no_method = RtnRequest();
  no_method.mutable_spec()->mutable_stages(0)->clear_method();
  EXPECT_EQ(Submit(no_method, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  auto negative_bits = RtnRequest("tiny", -4);
  grpc::Status bits_status = Submit(negative_bits, &response);
  EXPECT_EQ(bits_status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(bits_status.error_message().find("bits"), std::string::npos);

  grpc::Status outside = Submit(RtnRequest(outside_.Sub("model.safetensors")), &response);
  EXPECT_EQ(outside.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(outside.error_message().find("outside"), std::string::npos);

  EXPECT_EQ(Submit(RtnRequest("tiny/../../etc"), &response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Submit(RtnRequest("missing"), &response).error_code(), grpc::StatusCode::NOT_FOUND);

  fs::create_directories(models_.Sub("broken"));
  std::ofstream(models_.Sub("broken/model.safetensors")) << "not a safetensors file";
  grpc::Status broken = Submit(RtnRequest("broken"), &response);
  EXPECT_EQ(broken.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(broken.error_message().find("model.safetensors"), std::string::npos)
      << broken.error_message();

  // The recipe against the model's tensors: a pattern that selects nothing,
  // a group size that does not divide a selected tensor's inputs.
  auto no_match = RtnRequest();
  no_match.mutable_spec()->mutable_stages(0)->mutable_rtn()->add_include("lm_head");
  grpc::Status unmatched = Submit(no_match, &response);
  EXPECT_EQ(unmatched.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(unmatched.error_message().find("stages[0].rtn: include pattern 'lm_head' matches no"),
            std::string::npos)
      << unmatched.error_message();
  auto bad_group = RtnRequest();
  bad_group.mutable_spec()->mutable_stages(0)->mutable_rtn()->set_group_size(96);
  grpc::Status group = Submit(bad_group, &response);
  EXPECT_EQ(group.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(group.error_message().find("stages[0].rtn.group_size: 96 does not divide the 128 "
                                       "inputs of tensor 'model.layers.0.mlp.up_proj.weight'"),
            std::string::npos)
      << group.error_message();

  // A symlink inside the root that points outside it is still outside.
  fs::create_directory_symlink(outside_.path(), models_.Sub("escape"));
  EXPECT_EQ(Submit(RtnRequest("escape/model.safetensors"), &response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);

  grpc::ClientContext context;
  compress::v1::GetJobRequest get;
  get.set_job_id("job-does-not-exist");
  compress::v1::Job job;
  EXPECT_EQ(jobs_->GetJob(&context, get, &job).error_code(), grpc::StatusCode::NOT_FOUND);

  EXPECT_FALSE(SubmitOk(RtnRequest()).empty());  // still serving
}

TEST_F(ServerTest, CalibrationAndEvaluationFilesAreCheckedAtSubmitAndResolvedForTheWorker) {
  compress::v1::SubmitJobResponse response;
  std::ofstream(models_.Sub("short.txt")) << "too short for one sample";
  std::ofstream(models_.Sub("eval.txt")) << std::string(600, 'x');
  auto gptq = RtnRequest();
  compress::v1::JobSpec& spec = *gptq.mutable_spec();
  spec.clear_stages();
  spec.add_stages()->mutable_gptq()->set_bits(4);
  EXPECT_EQ(Submit(gptq, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT)
      << "gptq without calibration data";

  spec.mutable_calibration()->set_path("short.txt");
  spec.mutable_calibration()->set_sequence_length(64);
  grpc::Status short_text = Submit(gptq, &response);
  EXPECT_EQ(short_text.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(short_text.error_message().find("calibration.path: short.txt holds at most 24 tokens"),
            std::string::npos)
      << short_text.error_message();
  // The same bytes as ids: a quarter as many tokens.
  std::ofstream(models_.Sub("ids.tokens")) << std::string(200, '\0');
  spec.mutable_calibration()->set_path("ids.tokens");
  EXPECT_EQ(Submit(gptq, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  spec.mutable_calibration()->set_path("eval.txt");
  compress::v1::EvaluateStage* evaluate = spec.add_stages()->mutable_evaluate();
  evaluate->set_text_path(outside_.Sub("model.safetensors"));
  grpc::Status outside = Submit(gptq, &response);
  EXPECT_EQ(outside.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(outside.error_message().find("stages[1].evaluate.text_path"), std::string::npos)
      << outside.error_message();

  evaluate->set_text_path("eval.txt");
  SubmitOk(gptq);
  const std::string worker = Register("w-calibration");
  const compress::v1::AcquireTaskResponse acquired = Acquire(worker);
  ASSERT_TRUE(acquired.has_task());
  EXPECT_EQ(acquired.task().calibration_path(), fs::canonical(models_.Sub("eval.txt")).string());
  EXPECT_EQ(acquired.task().evaluation_path(), fs::canonical(models_.Sub("eval.txt")).string());
}

TEST_F(ServerTest, WorkerLifecycleEventsArtifactAndResumableDownload) {
  std::string id = SubmitOk(RtnRequest());
  std::string worker = Register("w1");
  auto acquired = Acquire(worker);
  ASSERT_TRUE(acquired.has_task());
  const auto& task = acquired.task();
  EXPECT_EQ(task.job_id(), id);
  EXPECT_EQ(task.model_path(), fs::canonical(models_.Sub("tiny")).string());
  EXPECT_EQ(Get(id).state(), compress::v1::RUNNING);

  ASSERT_TRUE(Report(worker, task.task_id(), 0.5).ok());
  EXPECT_DOUBLE_EQ(Get(id).progress(), 0.5);

  std::string data(3 << 20, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 7 + 3);
  ASSERT_TRUE(Upload(worker, task.task_id(), "packed/model.safetensors", data, Sha256Hex(data)).ok());
  ASSERT_TRUE(Complete(worker, task.task_id(), true).ok());

  compress::v1::Job job = Get(id);
  EXPECT_EQ(job.state(), compress::v1::SUCCEEDED);
  ASSERT_EQ(job.artifacts_size(), 1);
  EXPECT_EQ(job.artifacts(0).sha256(), Sha256Hex(data));
  EXPECT_DOUBLE_EQ(job.report().bits_per_weight(), 4.25);

  std::vector<JobEvent> events = WatchAll(id);
  testing::ExpectGapFree(events);
  ASSERT_GE(events.size(), 5u);  // queued, running, progress, artifact, succeeded
  EXPECT_EQ(events.front().state().state(), compress::v1::QUEUED);
  EXPECT_EQ(events.back().state().state(), compress::v1::SUCCEEDED);
  EXPECT_EQ(events.back().sequence(), job.last_sequence());

  std::vector<JobEvent> tail = WatchAll(id, 3);
  ASSERT_FALSE(tail.empty());
  EXPECT_EQ(tail.front().sequence(), 3);

  // Resume a download from the middle.
  const int64_t offset = 1234567;
  grpc::ClientContext context;
  compress::v1::DownloadArtifactRequest download;
  download.set_job_id(id);
  download.set_name("packed/model.safetensors");
  download.set_offset(offset);
  auto reader = jobs_->DownloadArtifact(&context, download);
  std::string received;
  compress::v1::ArtifactChunk chunk;
  while (reader->Read(&chunk)) {
    EXPECT_EQ(chunk.offset(), offset + static_cast<int64_t>(received.size()));
    received += chunk.data();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(received, data.substr(offset));
}

TEST_F(ServerTest, DeleteRemovesAnEndedJobWithItsArtifactsForGood) {
  compress::v1::SubmitJobRequest nightly = RtnRequest();
  nightly.set_request_id("nightly-1");
  const std::string id = SubmitOk(nightly);
  const std::string kept = SubmitOk(RtnRequest());
  const std::string worker = Register("w1");
  const auto task = Acquire(worker).task();
  ASSERT_EQ(task.job_id(), id);

  grpc::Status running = Delete(id);
  EXPECT_EQ(running.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(running.error_message().find("is RUNNING; only an ended job"), std::string::npos)
      << running.error_message();

  const std::string data(1 << 20, 'w');
  ASSERT_TRUE(Upload(worker, task.task_id(), "packed/model.safetensors", data, Sha256Hex(data)).ok());
  ASSERT_TRUE(Complete(worker, task.task_id(), true).ok());
  ASSERT_EQ(ArtifactDirEntries(), std::vector<std::string>{id});
  EXPECT_TRUE(MetricsPageShows("compress_artifact_stored_bytes 1048576")) << MetricsPage();

  compress::v1::DeleteJobResponse response;
  ASSERT_TRUE(Delete(id, &response).ok());
  EXPECT_EQ(response.job_id(), id);
  EXPECT_EQ(response.freed_bytes(), static_cast<int64_t>(data.size()));
  EXPECT_TRUE(ArtifactDirEntries().empty());
  EXPECT_EQ(GetCode(id), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(ListAllPages(compress::v1::ListJobsRequest(), 10), std::vector<std::string>{kept});
  EXPECT_EQ(Delete(id).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(MetricsPageShows("compress_jobs_deleted_total{reason=\"request\"} 1"));
  EXPECT_TRUE(MetricsPageShows("compress_artifact_stored_bytes 0")) << MetricsPage();

  RestartServer(/*lease_seconds=*/30);
  EXPECT_EQ(GetCode(id), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(ListAllPages(compress::v1::ListJobsRequest(), 10), std::vector<std::string>{kept});
  // Its request id names nothing now: the same request makes a new job.
  compress::v1::SubmitJobResponse again;
  ASSERT_TRUE(Submit(nightly, &again).ok());
  EXPECT_TRUE(again.created());
  EXPECT_NE(again.job().id(), id);
}

TEST_F(ServerTest, EndedJobsPastTheRetentionAreDeleted) {
  retention_ = absl::Seconds(1);
  RestartServer(/*lease_seconds=*/30);
  const std::string ended = SubmitOk(RtnRequest());
  {
    grpc::ClientContext context;
    compress::v1::CancelJobRequest cancel;
    cancel.set_job_id(ended);
    compress::v1::Job job;
    ASSERT_TRUE(jobs_->CancelJob(&context, cancel, &job).ok());
  }
  const std::string queued = SubmitOk(RtnRequest());
  EXPECT_EQ(GetCode(ended), grpc::StatusCode::OK);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (GetCode(ended) == grpc::StatusCode::OK && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_EQ(GetCode(ended), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(GetCode(queued), grpc::StatusCode::OK);  // not ended: kept however old
  EXPECT_TRUE(MetricsPageShows("compress_jobs_deleted_total{reason=\"retention\"} 1"));
}

// A delete moves the job's folder aside, deletes the record, then removes
// the folder; a crash in between is mended at the next start.
TEST_F(ServerTest, AnInterruptedDeleteIsFinishedOrUndoneAtStart) {
  const std::string id = SubmitOk(RtnRequest());
  const std::string worker = Register("w1");
  const auto task = Acquire(worker).task();
  const std::string data(4096, 'k');
  ASSERT_TRUE(Upload(worker, task.task_id(), "packed/model.safetensors", data, Sha256Hex(data)).ok());
  ASSERT_TRUE(Complete(worker, task.task_id(), true).ok());
  server_->Shutdown();
  // The record is still stored: its folder comes back. The other job is gone.
  fs::rename(data_.Sub("artifacts/" + id), data_.Sub("artifacts/.deleted-" + id));
  fs::create_directories(data_.Sub("artifacts/.deleted-job-gone/packed"));
  std::ofstream(data_.Sub("artifacts/.deleted-job-gone/packed/x")) << "x";
  server_.reset();
  StartServer(/*lease_seconds=*/30);
  EXPECT_EQ(ArtifactDirEntries(), std::vector<std::string>{id});
  grpc::ClientContext context;
  compress::v1::DownloadArtifactRequest download;
  download.set_job_id(id);
  download.set_name("packed/model.safetensors");
  auto reader = jobs_->DownloadArtifact(&context, download);
  std::string received;
  compress::v1::ArtifactChunk chunk;
  while (reader->Read(&chunk)) received += chunk.data();
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(received, data);
}

TEST_F(ServerTest, WatchFollowsLiveEventsUntilTheJobEnds) {
  std::string id = SubmitOk(RtnRequest());
  std::string worker = Register("w1");
  auto task = Acquire(worker).task();
  std::thread producer([&] {
    for (int i = 1; i <= 20; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      Report(worker, task.task_id(), i / 20.0);
    }
    Complete(worker, task.task_id(), false, "engine said no");
  });
  std::vector<JobEvent> events = WatchAll(id);
  producer.join();
  testing::ExpectGapFree(events);
  ASSERT_EQ(events.size(), 2u + 20u + 1u);
  EXPECT_EQ(events.back().state().state(), compress::v1::FAILED);
  EXPECT_NE(events.back().state().reason().find("engine said no"), std::string::npos);
}

TEST_F(ServerTest, ALapsedLeaseRequeuesTheJobAndRefusesTheLateWorker) {
  RestartServer(/*lease_seconds=*/1);
  std::string id = SubmitOk(RtnRequest());
  std::string slow = Register("slow");
  auto first = Acquire(slow).task();
  EXPECT_EQ(first.attempt(), 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(1600));
  EXPECT_EQ(Get(id).state(), compress::v1::QUEUED);

  std::string fast = Register("fast");
  auto second = Acquire(fast).task();
  EXPECT_EQ(second.job_id(), id);
  EXPECT_EQ(second.attempt(), 2);
  EXPECT_EQ(Report(slow, first.task_id(), 0.9).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Upload(slow, first.task_id(), "x.bin", "late", Sha256Hex("late")).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Complete(slow, first.task_id(), true).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(Complete(fast, second.task_id(), true).ok());
  EXPECT_EQ(Get(id).state(), compress::v1::SUCCEEDED);
  EXPECT_EQ(Get(id).attempts(), 2);
}

TEST_F(ServerTest, RetryableFailuresRetryElsewhereAndTheThirdFailsTheJob) {
  std::string id = SubmitOk(RtnRequest());
  for (int attempt = 1; attempt <= 3; ++attempt) {
    std::string worker = Register(absl::StrCat("w", attempt));
    auto task = Acquire(worker).task();
    ASSERT_EQ(task.job_id(), id);
    EXPECT_EQ(task.attempt(), attempt);
    ASSERT_TRUE(Complete(worker, task.task_id(), false, absl::StrCat("out of memory ", attempt),
                         grpc::StatusCode::RESOURCE_EXHAUSTED)
                    .ok());
    EXPECT_EQ(Get(id).state(), attempt < 3 ? compress::v1::QUEUED : compress::v1::FAILED);
  }
  EXPECT_NE(Get(id).message().find("out of memory 3"), std::string::npos) << Get(id).message();

  // A deterministic failure (a bad recipe) fails at once.
  std::string bad = SubmitOk(RtnRequest());
  std::string worker = Register("w9");
  auto task = Acquire(worker).task();
  ASSERT_TRUE(Complete(worker, task.task_id(), false, "group size", grpc::StatusCode::INVALID_ARGUMENT).ok());
  EXPECT_EQ(Get(bad).state(), compress::v1::FAILED);
}

TEST_F(ServerTest, BlockRangesRunOnSeveralWorkersAtOnceThenOneTaskAssembles) {
  const std::string id = SubmitOk(GptqRequest("deep", /*parallel=*/true));
  const compress::v1::Job planned = Get(id);
  ASSERT_EQ(planned.tasks_size(), 5);  // one block each, then the assemble task
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(planned.tasks(i).kind(), compress::v1::TASK_BLOCKS);
    EXPECT_EQ(planned.tasks(i).first_layer(), i);
    EXPECT_EQ(planned.tasks(i).end_layer(), i + 1);
    EXPECT_GT(planned.tasks(i).memory_bytes(), 0);
  }
  EXPECT_EQ(planned.tasks(4).kind(), compress::v1::TASK_ASSEMBLE);

  // Four workers take the four ranges at once.
  std::vector<std::string> workers;
  std::vector<compress::v1::Task> tasks;
  for (int i = 0; i < 4; ++i) {
    workers.push_back(Register(absl::StrCat("w", i)));
    tasks.push_back(Acquire(workers[i]).task());
    ASSERT_EQ(tasks[i].job_id(), id);
    EXPECT_EQ(tasks[i].kind(), compress::v1::TASK_BLOCKS);
    EXPECT_EQ(tasks[i].first_layer(), i);
    EXPECT_EQ(tasks[i].inputs_size(), 0) << "parallel blocks need no one else's checkpoint";
  }
  EXPECT_EQ(Get(id).state(), compress::v1::RUNNING);
  // Nothing else to hand out: the assemble task waits for every block.
  const std::string assembler = Register("assembler");
  EXPECT_FALSE(Acquire(assembler, 300).has_task());

  // A block task uploads its own checkpoints and nothing else.
  EXPECT_EQ(UploadCheckpoint(workers[0], tasks[0].task_id(), 1).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Upload(workers[0], tasks[0].task_id(), "packed/model.safetensors", "x", Sha256Hex("x"))
                .error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  // Progress is the task's, weighed into the job's: a quarter of the blocks' share, half done.
  ASSERT_TRUE(Report(workers[0], tasks[0].task_id(), 0.5).ok());
  EXPECT_NEAR(Get(id).progress(), 0.8 * 0.25 * 0.5, 1e-9);
  // Claiming success without the checkpoint is a failure, retried.
  ASSERT_TRUE(Complete(workers[3], tasks[3].task_id(), true).ok());
  EXPECT_EQ(Get(id).tasks(3).state(), compress::v1::TASK_PENDING);
  EXPECT_NE(Get(id).tasks(3).message().find("without a checkpoint for block 3"), std::string::npos)
      << Get(id).tasks(3).message();
  tasks[3] = Acquire(workers[3]).task();
  EXPECT_EQ(tasks[3].first_layer(), 3);
  EXPECT_EQ(tasks[3].attempt(), 2);

  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(UploadCheckpoint(workers[i], tasks[i].task_id(), i).ok());
    ASSERT_TRUE(Complete(workers[i], tasks[i].task_id(), true).ok());
    EXPECT_EQ(Get(id).state(), i < 3 ? compress::v1::RUNNING : compress::v1::QUEUED);
  }
  const compress::v1::Task assemble = Acquire(assembler).task();
  ASSERT_EQ(assemble.kind(), compress::v1::TASK_ASSEMBLE);
  ASSERT_EQ(assemble.inputs_size(), 4);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(assemble.inputs(i).name(), CheckpointName(i));
    std::string data;
    ASSERT_TRUE(Fetch(assembler, assemble.task_id(), assemble.inputs(i).name(), &data).ok());
    EXPECT_EQ(data, absl::StrCat("checkpoint of block ", i));
    EXPECT_EQ(Sha256Hex(data), assemble.inputs(i).sha256());
  }
  // Only the lease holder fetches, and only checkpoints.
  std::string data;
  EXPECT_EQ(Fetch(workers[0], assemble.task_id(), CheckpointName(0), &data).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Fetch(assembler, assemble.task_id(), "report.json", &data).error_code(),
            grpc::StatusCode::NOT_FOUND);
  ASSERT_TRUE(Complete(assembler, assemble.task_id(), true).ok());
  const compress::v1::Job done = Get(id);
  EXPECT_EQ(done.state(), compress::v1::SUCCEEDED);
  EXPECT_DOUBLE_EQ(done.report().bits_per_weight(), 4.25);
  EXPECT_EQ(done.progress(), 1.0);
  EXPECT_TRUE(done.artifacts().empty()) << "checkpoints are not the job's outputs";
  const std::vector<JobEvent> events = WatchAll(id);
  testing::ExpectGapFree(events);
  int checkpoint_logs = 0;
  for (const JobEvent& e : events) {
    if (e.has_log() && e.log().text().find("checkpointed") != std::string::npos) ++checkpoint_logs;
  }
  EXPECT_EQ(checkpoint_logs, 4);
}

TEST_F(ServerTest, ARetriedBlockTaskResumesAfterItsLastCheckpoint) {
  RestartServer(/*lease_seconds=*/1);
  // Sequential propagation: one task runs the blocks in order.
  const std::string id = SubmitOk(GptqRequest("deep", /*parallel=*/false));
  ASSERT_EQ(Get(id).tasks_size(), 2);
  const std::string first = Register("first");
  const compress::v1::Task killed = Acquire(first).task();
  EXPECT_EQ(killed.first_layer(), 0);
  EXPECT_EQ(killed.end_layer(), 4);
  ASSERT_TRUE(UploadCheckpoint(first, killed.task_id(), 0).ok());
  ASSERT_TRUE(UploadCheckpoint(first, killed.task_id(), 1).ok());
  // The worker dies: its lease lapses and the task returns to the queue.
  std::this_thread::sleep_for(std::chrono::milliseconds(1600));
  EXPECT_EQ(Get(id).state(), compress::v1::QUEUED);
  EXPECT_NEAR(Get(id).tasks(0).progress(), 0.0, 1e-9);

  const std::string second = Register("second");
  const compress::v1::Task resumed = Acquire(second).task();
  EXPECT_EQ(resumed.attempt(), 2);
  EXPECT_EQ(std::vector<int>(resumed.finished_layers().begin(), resumed.finished_layers().end()),
            (std::vector<int>{0, 1}));
  // Sequential: the finished blocks' weights carry the activations on.
  ASSERT_EQ(resumed.inputs_size(), 2);
  EXPECT_EQ(resumed.inputs(1).name(), CheckpointName(1));
  EXPECT_NEAR(Get(id).tasks(0).progress(), 0.5, 1e-9) << "half of its blocks are done";
  // The dead worker's late checkpoint is refused, not merged.
  EXPECT_EQ(UploadCheckpoint(first, killed.task_id(), 2).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(UploadCheckpoint(second, resumed.task_id(), 2).ok());
  ASSERT_TRUE(UploadCheckpoint(second, resumed.task_id(), 3).ok());
  ASSERT_TRUE(Complete(second, resumed.task_id(), true).ok());
  const compress::v1::Task assemble = Acquire(second).task();
  EXPECT_EQ(assemble.kind(), compress::v1::TASK_ASSEMBLE);
  EXPECT_EQ(assemble.inputs_size(), 4);
}

TEST_F(ServerTest, ABlockTaskFailingThreeTimesFailsTheJobWithTheLastError) {
  const std::string id = SubmitOk(GptqRequest("deep", /*parallel=*/true));
  for (int attempt = 1; attempt <= 3; ++attempt) {
    const std::string worker = Register(absl::StrCat("w", attempt));
    compress::v1::Task task = Acquire(worker).task();
    // Other ranges are handed out too; fail range 2 each time it comes.
    while (task.first_layer() != 2) {
      ASSERT_TRUE(task.task_id().size() > 0);
      ASSERT_TRUE(UploadCheckpoint(worker, task.task_id(), task.first_layer()).ok());
      ASSERT_TRUE(Complete(worker, task.task_id(), true).ok());
      task = Acquire(worker).task();
    }
    ASSERT_TRUE(Complete(worker, task.task_id(), false, absl::StrCat("out of memory ", attempt),
                         grpc::StatusCode::RESOURCE_EXHAUSTED)
                    .ok());
  }
  const compress::v1::Job failed = Get(id);
  EXPECT_EQ(failed.state(), compress::v1::FAILED);
  EXPECT_NE(failed.message().find("out of memory 3"), std::string::npos) << failed.message();
  EXPECT_NE(failed.message().find("blocks 2-2"), std::string::npos) << failed.message();
}

TEST_F(ServerTest, TasksGoOnlyToWorkersWithRoomAndImpossibleJobsAreRefused) {
  // A block task of the wide model needs several GiB.
  RestartServer(/*lease_seconds=*/30, /*max_task_memory_gib=*/2);
  compress::v1::SubmitJobResponse response;
  grpc::Status refused = Submit(GptqRequest("wide", true), &response);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.error_message().find("needs an estimated"), std::string::npos)
      << refused.error_message();
  EXPECT_NE(refused.error_message().find("TASK_BLOCKS"), std::string::npos) << refused.error_message();

  RestartServer(/*lease_seconds=*/30);
  const std::string id = SubmitOk(GptqRequest("wide", true));
  const int64_t needed = Get(id).tasks(0).memory_bytes();
  EXPECT_GT(needed, int64_t{2} << 30);
  const std::string small = Register("small", int64_t{1} << 30);
  EXPECT_FALSE(Acquire(small, 1500).has_task());
  // The job says why it waits, in get and as an event.
  const compress::v1::Job waiting = Get(id);
  EXPECT_EQ(waiting.state(), compress::v1::QUEUED);
  EXPECT_NE(waiting.message().find("needs an estimated"), std::string::npos) << waiting.message();
  EXPECT_NE(waiting.message().find("largest connected worker has 1.00 GiB"), std::string::npos)
      << waiting.message();
  const std::string big = Register("big", int64_t{64} << 30);
  const compress::v1::Task task = Acquire(big).task();
  EXPECT_EQ(task.job_id(), id);
}

TEST_F(ServerTest, PauseStopsRunningTasksAndResumeContinuesAfterTheirCheckpoints) {
  const std::string id = SubmitOk(GptqRequest("deep", /*parallel=*/false));
  const std::string worker = Register("w");
  const compress::v1::Task first = Acquire(worker).task();
  ASSERT_TRUE(UploadCheckpoint(worker, first.task_id(), 0).ok());

  compress::v1::Job job;
  ASSERT_TRUE(Pause(id, &job).ok());
  EXPECT_EQ(job.state(), compress::v1::PAUSED);
  EXPECT_EQ(job.tasks(0).state(), compress::v1::TASK_PENDING);
  // The running worker loses its lease at its next report and stops.
  EXPECT_EQ(Report(worker, first.task_id(), 0.6).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_FALSE(Acquire(worker, 300).has_task()) << "a paused job hands out nothing";
  EXPECT_EQ(Pause(id, &job).error_code(), grpc::StatusCode::FAILED_PRECONDITION);

  ASSERT_TRUE(Resume(id, &job).ok());
  EXPECT_EQ(job.state(), compress::v1::QUEUED);
  EXPECT_EQ(Resume(id, &job).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  const compress::v1::Task resumed = Acquire(worker).task();
  EXPECT_EQ(resumed.job_id(), id);
  EXPECT_EQ(std::vector<int>(resumed.finished_layers().begin(), resumed.finished_layers().end()),
            std::vector<int>{0});
  ASSERT_TRUE(
      Complete(worker, resumed.task_id(), false, "stop", grpc::StatusCode::INVALID_ARGUMENT).ok());
  const std::vector<JobEvent> events = WatchAll(id);
  std::vector<compress::v1::JobState> states;
  for (const JobEvent& e : events) {
    if (e.has_state()) states.push_back(e.state().state());
  }
  EXPECT_EQ(states, (std::vector<compress::v1::JobState>{
                        compress::v1::QUEUED, compress::v1::RUNNING, compress::v1::PAUSED,
                        compress::v1::QUEUED, compress::v1::RUNNING, compress::v1::FAILED}));
}

TEST_F(ServerTest, HigherPriorityRunsFirst) {
  std::string low = SubmitOk(RtnRequest());
  auto urgent_request = RtnRequest();
  urgent_request.mutable_spec()->set_priority(10);
  std::string urgent = SubmitOk(urgent_request);
  std::string worker = Register("w1");
  EXPECT_EQ(Acquire(worker).task().job_id(), urgent);
  EXPECT_EQ(Acquire(Register("w2")).task().job_id(), low);
}

TEST_F(ServerTest, CancelStopsQueuedAndTellsTheRunningWorker) {
  std::string running = SubmitOk(RtnRequest());
  std::string worker = Register("w1");
  auto task = Acquire(worker).task();
  std::string queued = SubmitOk(RtnRequest());
  for (const std::string& id : {queued, running}) {
    grpc::ClientContext context;
    compress::v1::CancelJobRequest request;
    request.set_job_id(id);
    compress::v1::Job job;
    ASSERT_TRUE(jobs_->CancelJob(&context, request, &job).ok());
    EXPECT_EQ(job.state(), compress::v1::CANCELLED);
  }
  bool cancelled = false;
  ASSERT_TRUE(Report(worker, task.task_id(), 0.3, &cancelled).ok());
  EXPECT_TRUE(cancelled);
  // The queued one is never dispatched.
  EXPECT_FALSE(Acquire(worker, 300).has_task());
  grpc::ClientContext context;
  compress::v1::CancelJobRequest again;
  again.set_job_id(queued);
  compress::v1::Job job;
  EXPECT_EQ(jobs_->CancelJob(&context, again, &job).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
}

TEST_F(ServerTest, AnUploadWhoseChecksumDiffersLeavesNothingBehind) {
  std::string id = SubmitOk(RtnRequest());
  std::string worker = Register("w1");
  auto task = Acquire(worker).task();
  grpc::Status status = Upload(worker, task.task_id(), "out/model.safetensors", "abcdef",
                               Sha256Hex("something else"));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_EQ(Get(id).artifacts_size(), 0);
  std::vector<std::string> files;
  for (const auto& entry : fs::recursive_directory_iterator(data_.Sub("artifacts"))) {
    if (entry.is_regular_file()) files.push_back(entry.path().string());
  }
  EXPECT_TRUE(files.empty()) << files.front();
  EXPECT_EQ(Upload(worker, task.task_id(), "../escape", "x", Sha256Hex("x")).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(ServerTest, ARestartKeepsJobsEventsAndRunningLeases) {
  std::string queued = SubmitOk(RtnRequest());
  std::string worker = Register("w1");
  auto task = Acquire(worker).task();  // takes `queued`
  ASSERT_TRUE(Report(worker, task.task_id(), 0.25).ok());
  std::string still_queued = SubmitOk(RtnRequest());
  int64_t last = Get(queued).last_sequence();

  RestartServer(/*lease_seconds=*/30);
  EXPECT_EQ(Get(queued).state(), compress::v1::RUNNING);
  EXPECT_EQ(Get(queued).last_sequence(), last);
  EXPECT_EQ(Get(still_queued).state(), compress::v1::QUEUED);
  // The worker carries on with its lease after the restart.
  ASSERT_TRUE(Report(worker, task.task_id(), 0.75).ok());
  ASSERT_TRUE(Complete(worker, task.task_id(), true).ok());
  std::vector<JobEvent> events = WatchAll(queued);
  testing::ExpectGapFree(events);
  EXPECT_EQ(events.back().state().state(), compress::v1::SUCCEEDED);
  // Unknown to the restarted server until it registers again.
  grpc::ClientContext context;
  compress::v1::AcquireTaskRequest acquire;
  acquire.set_worker_id("w1");
  compress::v1::AcquireTaskResponse response;
  EXPECT_EQ(workers_->AcquireTask(&context, acquire, &response).error_code(),
            grpc::StatusCode::NOT_FOUND);
  Register("w1");
  EXPECT_EQ(Acquire("w1").task().job_id(), still_queued);
}

TEST_F(ServerTest, MetricsAndHealthAreServedOverHttp) {
  SubmitOk(RtnRequest());
  httplib::Client http("127.0.0.1", server_->metrics_port());
  auto health = http.Get("/healthz");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  std::this_thread::sleep_for(std::chrono::milliseconds(250));  // one dispatcher tick for gauges
  auto page = http.Get("/metrics");
  ASSERT_TRUE(page);
  EXPECT_NE(page->body.find("compress_jobs_submitted_total{tenant=\"default\"} 1"), std::string::npos)
      << page->body;
  EXPECT_NE(page->body.find("compress_queue_depth 1"), std::string::npos) << page->body;
  EXPECT_NE(page->body.find("compress_rpcs_total{code=\"OK\",method=\"SubmitJob\"} 1"),
            std::string::npos)
      << page->body;
}

// Tokens map callers to tenants; a tenant never sees another tenant's jobs.
class AuthTest : public ServerTest {
 protected:
  void SetUp() override {
    ServerTest::SetUp();
    std::string tokens = data_.Sub("tokens");
    std::ofstream(tokens) << "# token tenant role\n"
                          << "alpha-token-0000000000 alpha\n"
                          << "beta-token-00000000000 beta client\n"
                          << "admin-token-0000000000 ops admin\n"
                          << "worker-token-000000000 - worker\n";
    server_->Shutdown();
    StartServer(30, tokens);
  }

  static void As(grpc::ClientContext* context, const std::string& token) {
    context->AddMetadata("authorization", "Bearer " + token);
  }

  grpc::Status GetAs(const std::string& token, const std::string& id) {
    grpc::ClientContext context;
    As(&context, token);
    compress::v1::GetJobRequest request;
    request.set_job_id(id);
    compress::v1::Job job;
    return jobs_->GetJob(&context, request, &job);
  }

  std::vector<std::string> ListAs(const std::string& token) {
    grpc::ClientContext context;
    As(&context, token);
    compress::v1::ListJobsResponse page;
    EXPECT_TRUE(jobs_->ListJobs(&context, compress::v1::ListJobsRequest(), &page).ok());
    std::vector<std::string> ids;
    for (const auto& job : page.jobs()) ids.push_back(job.id());
    return ids;
  }
};

TEST_F(AuthTest, TenantsSeeOnlyTheirOwnJobs) {
  compress::v1::SubmitJobResponse response;
  {
    grpc::ClientContext context;
    EXPECT_EQ(jobs_->SubmitJob(&context, RtnRequest(), &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext context;
    As(&context, "not-a-token-at-all-000");
    EXPECT_EQ(jobs_->SubmitJob(&context, RtnRequest(), &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  grpc::ClientContext submit;
  As(&submit, "alpha-token-0000000000");
  ASSERT_TRUE(jobs_->SubmitJob(&submit, RtnRequest(), &response).ok());
  const std::string id = response.job().id();
  EXPECT_EQ(response.job().tenant(), "alpha");

  EXPECT_TRUE(GetAs("alpha-token-0000000000", id).ok());
  EXPECT_TRUE(GetAs("admin-token-0000000000", id).ok());
  EXPECT_EQ(GetAs("beta-token-00000000000", id).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(ListAs("alpha-token-0000000000"), std::vector<std::string>{id});
  EXPECT_TRUE(ListAs("beta-token-00000000000").empty());
  EXPECT_EQ(ListAs("admin-token-0000000000"), std::vector<std::string>{id});
  {
    grpc::ClientContext context;
    As(&context, "beta-token-00000000000");
    compress::v1::CancelJobRequest cancel;
    cancel.set_job_id(id);
    compress::v1::Job job;
    EXPECT_EQ(jobs_->CancelJob(&context, cancel, &job).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext context;
    As(&context, "beta-token-00000000000");
    compress::v1::DeleteJobRequest request;
    request.set_job_id(id);
    compress::v1::DeleteJobResponse response;
    EXPECT_EQ(jobs_->DeleteJob(&context, request, &response).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  for (bool pause : {true, false}) {
    grpc::ClientContext context;
    As(&context, "beta-token-00000000000");
    compress::v1::Job job;
    if (pause) {
      compress::v1::PauseJobRequest request;
      request.set_job_id(id);
      EXPECT_EQ(jobs_->PauseJob(&context, request, &job).error_code(), grpc::StatusCode::NOT_FOUND);
    } else {
      compress::v1::ResumeJobRequest request;
      request.set_job_id(id);
      EXPECT_EQ(jobs_->ResumeJob(&context, request, &job).error_code(), grpc::StatusCode::NOT_FOUND);
    }
  }
  {
    grpc::ClientContext context;
    As(&context, "beta-token-00000000000");
    compress::v1::WatchJobRequest watch;
    watch.set_job_id(id);
    auto reader = jobs_->WatchJob(&context, watch);
    JobEvent event;
    EXPECT_FALSE(reader->Read(&event));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext context;
    As(&context, "beta-token-00000000000");
    compress::v1::DownloadArtifactRequest download;
    download.set_job_id(id);
    download.set_name("report.json");
    auto reader = jobs_->DownloadArtifact(&context, download);
    compress::v1::ArtifactChunk chunk;
    EXPECT_FALSE(reader->Read(&chunk));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
}

TEST_F(AuthTest, TenantsShareWorkersFairly) {
  auto submit_as = [&](const std::string& token) {
    grpc::ClientContext context;
    As(&context, token);
    compress::v1::SubmitJobResponse response;
    EXPECT_TRUE(jobs_->SubmitJob(&context, RtnRequest(), &response).ok());
    return response.job().id();
  };
  std::vector<std::string> alpha;
  for (int i = 0; i < 5; ++i) alpha.push_back(submit_as("alpha-token-0000000000"));
  std::string beta = submit_as("beta-token-00000000000");
  auto acquire_as_worker = [&](const std::string& worker_id) {
    grpc::ClientContext register_context;
    As(&register_context, "worker-token-000000000");
    compress::v1::RegisterWorkerRequest request;
    request.set_worker_id(worker_id);
    request.set_device("cpu");
    compress::v1::RegisterWorkerResponse registered;
    EXPECT_TRUE(workers_->RegisterWorker(&register_context, request, &registered).ok());
    grpc::ClientContext context;
    As(&context, "worker-token-000000000");
    compress::v1::AcquireTaskRequest acquire;
    acquire.set_worker_id(worker_id);
    acquire.set_wait_millis(1000);
    compress::v1::AcquireTaskResponse response;
    EXPECT_TRUE(workers_->AcquireTask(&context, acquire, &response).ok());
    return response.task().job_id();
  };
  // alpha's hundred jobs do not starve beta's one: with alpha running one
  // job, beta's goes next although it is younger than alpha's backlog.
  EXPECT_EQ(acquire_as_worker("w1"), alpha[0]);
  EXPECT_EQ(acquire_as_worker("w2"), beta);
  EXPECT_EQ(acquire_as_worker("w3"), alpha[1]);
}

TEST_F(AuthTest, OnlyWorkerTokensOpenTheWorkerService) {
  compress::v1::RegisterWorkerRequest request;
  request.set_worker_id("w1");
  request.set_device("cpu");
  compress::v1::RegisterWorkerResponse response;
  for (const std::string token : {"", "alpha-token-0000000000", "admin-token-0000000000"}) {
    grpc::ClientContext context;
    if (!token.empty()) As(&context, token);
    grpc::StatusCode code = workers_->RegisterWorker(&context, request, &response).error_code();
    EXPECT_EQ(code, token.empty() ? grpc::StatusCode::UNAUTHENTICATED
                                  : grpc::StatusCode::PERMISSION_DENIED)
        << token;
  }
  {
    grpc::ClientContext context;
    As(&context, "worker-token-000000000");
    EXPECT_TRUE(workers_->RegisterWorker(&context, request, &response).ok());
  }
  // A worker token cannot read jobs either.
  EXPECT_EQ(GetAs("worker-token-000000000", "job-x").error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  // An upload without the worker token is refused before anything is written.
  grpc::ClientContext context;
  As(&context, "alpha-token-0000000000");
  compress::v1::UploadArtifactResponse uploaded;
  auto writer = workers_->UploadArtifact(&context, &uploaded);
  compress::v1::UploadArtifactRequest chunk;
  chunk.mutable_artifact()->set_name("x");
  writer->Write(chunk);
  writer->WritesDone();
  EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::PERMISSION_DENIED);
}

TEST_F(ServerTest, ServesTlsWithACertificateAndKey) {
  std::string cert = data_.Sub("cert.pem"), key = data_.Sub("key.pem");
  std::string command = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
                        "-addext subjectAltName=DNS:localhost -keyout " + key + " -out " + cert +
                        " >/dev/null 2>&1";
  if (std::system(command.c_str()) != 0) GTEST_SKIP() << "openssl cannot make a test certificate";
  server_->Shutdown();
  ServerConfig config;
  config.listen = "127.0.0.1:0";
  config.metrics_listen = "";
  config.data_dir = data_.path();
  config.model_roots = {models_.path()};
  config.tls_cert_file = cert;
  config.tls_key_file = key;
  server_ = std::make_unique<CompressServer>(config);
  ASSERT_TRUE(server_->Start().ok());

  std::ifstream in(cert);
  std::stringstream pem;
  pem << in.rdbuf();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = pem.str();
  auto tls = JobService::NewStub(grpc::CreateChannel(
      absl::StrCat("localhost:", server_->grpc_port()), grpc::SslCredentials(options)));
  grpc::ClientContext context;
  compress::v1::SubmitJobResponse response;
  grpc::Status status = tls->SubmitJob(&context, RtnRequest(), &response);
  EXPECT_TRUE(status.ok()) << status.error_message();

  auto plaintext = JobService::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", server_->grpc_port()), grpc::InsecureChannelCredentials()));
  grpc::ClientContext plain_context;
  plain_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(3));
  EXPECT_FALSE(plaintext->SubmitJob(&plain_context, RtnRequest(), &response).ok());
}

}  // namespace
}  // namespace compress::server
