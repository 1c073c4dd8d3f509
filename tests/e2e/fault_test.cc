// The fault suite: a real server and four real workers on loopback run
// twenty jobs while workers are killed (SIGKILL), one is frozen past its
// lease (SIGSTOP), and the server is restarted twice. Every job must end
// SUCCEEDED exactly once with artifacts that verify, and every event log
// must be gap-free. Then a full disk while an artifact is written.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/recipe.h"
#include "common/sha256.h"
#include "compress/v1/compress.grpc.pb.h"
#include "tests/testing/e2e_models.h"
#include "tests/testing/job_calls.h"
#include "tests/testing/job_stream.h"
#include "tests/testing/postgres.h"
#include "tests/testing/subprocess.h"
#include "tests/testing/temp_dir.h"

namespace compress {
namespace {

using compress::v1::Job;
using compress::v1::JobEvent;
using testing::Subprocess;
namespace fs = std::filesystem;

constexpr int kWorkers = 4;
constexpr int kSleepJobs = 16;
constexpr int kSplitJobs = 4;

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

class FaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!store_.SkipReason().empty()) GTEST_SKIP() << store_.SkipReason();
    std::string output;
    ASSERT_EQ(testing::MakeRandomTestModel(COMPRESS_WORKER_BIN, dir_.Sub("models/llama"), 128,
                                           &output),
              0)
        << output;
    testing::WriteCalibrationTokens(dir_.Sub("models/calibration.tokens"), 4096);
    port_ = testing::PickFreePort();
  }

  void StartServer(const std::vector<std::string>& wrapper = {}) {
    std::vector<std::string> argv = wrapper;
    for (const std::string& arg :
         {std::string(COMPRESS_SERVER_BIN), std::string("--listen"), absl::StrCat("127.0.0.1:", port_),
          std::string("--metrics-listen"), std::string("127.0.0.1:0"), std::string("--data-dir"),
          dir_.Sub("data"), std::string("--model-root"), dir_.Sub("models"),
          std::string("--lease-seconds"), std::string("2"),
          // More dispatches than the chaos below has disruptions (5 kills, a
          // freeze, 2 restarts), so that even a task hit by every one of them
          // on a slow machine is still retried, not failed.
          std::string("--max-attempts"), std::string("10")}) {
      argv.push_back(arg);
    }
    absl::Status store = store_.AddServerFlags(&argv);  // --store with COMPRESS_TEST_STORE=postgres
    ASSERT_TRUE(store.ok()) << store;
    server_ = std::make_unique<Subprocess>(argv, dir_.Sub(absl::StrCat("server-", ++server_starts_, ".log")));
    ASSERT_GT(server_->WaitForNumber("grpc_port"), 0) << server_->Log();
    jobs_ = v1::JobService::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_),
                                                        grpc::InsecureChannelCredentials()));
  }

  void StartWorker(int index) {
    const std::string id = absl::StrCat("worker-", index);
    workers_[index] = std::make_unique<Subprocess>(
        std::vector<std::string>{COMPRESS_WORKER_BIN, "--server", absl::StrCat("127.0.0.1:", port_),
                                 "--worker-id", id, "--work-dir", dir_.Sub("work-" + id),
                                 "--poll-millis", "300", "--metrics-listen", ""},
        dir_.Sub(absl::StrCat(id, "-", ++worker_starts_, ".log")));
  }

  std::string Submit(const std::string& recipe, const std::string& request_id) {
    return testing::SubmitRecipe(jobs_.get(), recipe, request_id);
  }

  absl::StatusOr<Job> Get(const std::string& id) { return testing::GetJob(jobs_.get(), id); }

  bool AllEnded(const std::vector<std::string>& ids) {
    for (const std::string& id : ids) {
      absl::StatusOr<Job> job = Get(id);
      if (!job.ok() || job->state() < v1::SUCCEEDED) return false;
    }
    return true;
  }

  std::string Download(const std::string& id, const std::string& name) {
    return testing::DownloadArtifact(jobs_.get(), id, name);
  }

  void RestartServer(int signal) {
    server_->Signal(signal);
    server_->Wait();
    StartServer();
  }

  testing::TempDir dir_{"faults"};
  testing::TestStore store_;  // before server_: the server stops before its schema is dropped
  int port_ = 0;
  int server_starts_ = 0;
  int worker_starts_ = 0;
  std::unique_ptr<Subprocess> server_;
  std::map<int, std::unique_ptr<Subprocess>> workers_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
};

TEST_F(FaultTest, EveryJobSucceedsOnceThroughKillsAFreezeAndServerRestarts) {
  StartServer();
  for (int i = 0; i < kWorkers; ++i) StartWorker(i);
  const std::string sleep_recipe =
      "model: {path: llama}\nstages: [{sleep: {millis_per_tensor: 60}}]\n"
      "outputs: [DEQUANTIZED_SAFETENSORS]\n";
  // Parallel calibration: two block tasks and an assemble task each.
  const std::string split_recipe =
      "model: {path: llama}\n"
      "calibration: {path: calibration.tokens, num_samples: 16, sequence_length: 64, "
      "propagation: PROPAGATION_PARALLEL}\n"
      "stages: [{gptq: {bits: 4, group_size: 64}}, {sleep: {millis_per_tensor: 40}}]\n"
      "outputs: [PACKED_SAFETENSORS]\n";
  std::vector<std::string> sleep_ids, split_ids;
  for (int i = 0; i < kSleepJobs + kSplitJobs; ++i) {
    const bool split = i % 5 == 4;
    const std::string id = Submit(split ? split_recipe : sleep_recipe, absl::StrCat("job-", i));
    (split ? split_ids : sleep_ids).push_back(id);
  }
  std::vector<std::string> all = sleep_ids;
  all.insert(all.end(), split_ids.begin(), split_ids.end());

  // The chaos, on a fixed schedule with a seeded choice of victims.
  std::mt19937 rng(20261205);
  auto kill_a_worker = [&] {
    const int victim = static_cast<int>(rng() % kWorkers);
    workers_[victim]->Kill();
    StartWorker(victim);
  };
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  kill_a_worker();
  // Frozen past its lease (2 s): its task moves on, its late words are refused.
  const int frozen = static_cast<int>(rng() % kWorkers);
  workers_[frozen]->Signal(SIGSTOP);
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  RestartServer(SIGTERM);
  std::this_thread::sleep_for(std::chrono::milliseconds(3000));
  workers_[frozen]->Signal(SIGCONT);
  kill_a_worker();
  std::this_thread::sleep_for(std::chrono::milliseconds(2000));
  RestartServer(SIGKILL);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(240);
  int kills = 2;
  while (!AllEnded(all) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2500));
    if (kills < 5) {
      kill_a_worker();
      ++kills;
    }
  }
  ASSERT_TRUE(AllEnded(all)) << "jobs still running after 240 s";

  const std::string original = ReadBytes(dir_.Sub("models/llama/model.safetensors"));
  std::string split_weights_sha256;
  int retried = 0;
  for (const std::string& id : all) {
    SCOPED_TRACE(id);
    const Job job = *Get(id);
    ASSERT_EQ(job.state(), v1::SUCCEEDED) << job.message();
    const std::vector<JobEvent> events = testing::WatchToEnd(jobs_.get(), id);
    testing::ExpectGapFree(events);
    int succeeded = 0;
    for (const JobEvent& e : events) succeeded += e.has_state() && e.state().state() == v1::SUCCEEDED;
    EXPECT_EQ(succeeded, 1);
    retried += job.attempts() > job.tasks_size();
    // Each artifact once, and each downloads with its recorded checksum.
    std::set<std::string> names;
    for (const v1::Artifact& artifact : job.artifacts()) {
      EXPECT_TRUE(names.insert(artifact.name()).second) << artifact.name() << " recorded twice";
      const std::string data = Download(id, artifact.name());
      EXPECT_EQ(static_cast<int64_t>(data.size()), artifact.size_bytes()) << artifact.name();
      EXPECT_EQ(Sha256Hex(data), artifact.sha256()) << artifact.name();
      // A sleep job changes nothing: its model is the original, byte for byte.
      if (artifact.name() == "dequantized/model.safetensors") EXPECT_TRUE(data == original);
      // Every split job computed the same packed model, however often interrupted.
      if (artifact.name() == "packed/model.safetensors") {
        if (split_weights_sha256.empty()) split_weights_sha256 = artifact.sha256();
        EXPECT_EQ(artifact.sha256(), split_weights_sha256);
      }
    }
    EXPECT_TRUE(names.count("report.json") > 0);
  }
  EXPECT_FALSE(split_weights_sha256.empty());
  EXPECT_GT(retried, 0) << "the faults should have cost some job a retry";
  // The frozen worker, thawed, dropped what it had and took new work.
  EXPECT_TRUE(workers_[frozen]->Running());
}

TEST_F(FaultTest, AFullDiskFailsTheTaskClearlyAndLeavesNoPartialArtifact) {
  // The server may write files of at most 1 MiB: its job store fits, the
  // 1.8 MB model does not.
  StartServer({"/usr/bin/prlimit", "--fsize=1048576"});
  StartWorker(0);
  const std::string id = Submit(
      "model: {path: llama}\nstages: [{rtn: {bits: 8}}]\noutputs: [DEQUANTIZED_SAFETENSORS]\n",
      "full-disk");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!AllEnded({id}) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  const Job job = *Get(id);
  ASSERT_EQ(job.state(), v1::FAILED);
  EXPECT_NE(job.message().find("RESOURCE_EXHAUSTED"), std::string::npos) << job.message();
  EXPECT_NE(job.message().find("model.safetensors"), std::string::npos) << job.message();
  EXPECT_NE(job.message().find("File too large"), std::string::npos) << job.message();
  EXPECT_EQ(job.tasks(0).failed_attempts(), 3);
  // Nothing finished-looking in the store: no artifact recorded, no file but temp-free folders.
  EXPECT_TRUE(job.artifacts().empty());
  for (const auto& entry : fs::recursive_directory_iterator(dir_.Sub("data"))) {
    if (!entry.is_regular_file()) continue;
    const std::string name = entry.path().filename().string();
    EXPECT_EQ(name.find("model.safetensors"), std::string::npos) << entry.path();
  }
  EXPECT_TRUE(server_->Running()) << "the server survives a full disk";
}

}  // namespace
}  // namespace compress
