#include "client/commands.h"

#include <gmock/gmock.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/message_differencer.h>
#include <grpcpp/test/client_context_test_peer.h>
#include <grpcpp/test/mock_stream.h>
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "common/gguf_file.h"
#include "common/safetensors_header.h"
#include "common/sha256.h"
#include "compress/v1/compress_mock.grpc.pb.h"
#include "tests/testing/temp_dir.h"

namespace compress::client {
namespace {

namespace fs = std::filesystem;
namespace v1 = compress::v1;
using ::grpc::testing::MockClientReader;
using ::testing::_;
using ::testing::AllOf;
using ::testing::ContainsRegex;
using ::testing::HasSubstr;
using ::testing::DoAll;
using ::testing::Invoke;
using ::testing::Not;
using ::testing::Return;
using ::testing::SetArgPointee;

// A mock stream that yields `messages`, then finishes with `finish`. The stub
// wrapper (WatchJob, DownloadArtifact) takes ownership.
template <typename T>
MockClientReader<T>* StreamOf(std::vector<T> messages, grpc::Status finish = grpc::Status::OK) {
  auto* reader = new MockClientReader<T>();
  auto next = std::make_shared<size_t>(0);
  EXPECT_CALL(*reader, Read(_)).WillRepeatedly(Invoke([messages, next](T* out) {
    if (*next >= messages.size()) return false;
    *out = messages[(*next)++];
    return true;
  }));
  EXPECT_CALL(*reader, Finish()).WillOnce(Return(finish));
  return reader;
}

v1::JobEvent ProgressEvent(int64_t sequence, double fraction, const std::string& message) {
  v1::JobEvent event;
  event.set_job_id("j-1");
  event.set_sequence(sequence);
  event.mutable_time()->set_seconds(1714564800 + sequence * 10);
  event.mutable_progress()->set_fraction(fraction);
  event.mutable_progress()->set_message(message);
  event.mutable_progress()->set_stage("w4");
  return event;
}

v1::JobEvent LogEvent(int64_t sequence, const std::string& level, const std::string& text) {
  v1::JobEvent event;
  event.set_job_id("j-1");
  event.set_sequence(sequence);
  event.mutable_time()->set_seconds(1714564800 + sequence * 10);
  event.mutable_log()->set_level(level);
  event.mutable_log()->set_text(text);
  return event;
}

v1::JobEvent StateEvent(int64_t sequence, v1::JobState state, const std::string& reason = "") {
  v1::JobEvent event;
  event.set_job_id("j-1");
  event.set_sequence(sequence);
  event.mutable_time()->set_seconds(1714564800 + sequence * 10);
  event.mutable_state()->set_state(state);
  event.mutable_state()->set_reason(reason);
  return event;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> Lines(const std::string& text) {
  return absl::StrSplit(text, '\n', absl::SkipEmpty());
}

class CommandsTest : public ::testing::Test {
 protected:
  // Runs compressctl with `args` against the mock; output lands in out_/err_.
  int Run(const std::vector<std::string>& args, bool is_terminal = false) {
    out_.str("");
    err_.str("");
    absl::StatusOr<ParsedArgs> parsed = ParseArgs(args);
    EXPECT_TRUE(parsed.ok()) << parsed.status();
    if (!parsed.ok()) return -1;
    return RunCommand(&stub_, *parsed, out_, err_, is_terminal);
  }

  v1::MockJobServiceStub stub_;
  std::ostringstream out_;
  std::ostringstream err_;
  testing::TempDir temp_{"client"};
  fs::path dir_{temp_.path()};
};

// ---------------------------------------------------------------- submit

TEST_F(CommandsTest, SubmitBuildsTheJobSpecFromFlags) {
  v1::SubmitJobRequest sent;
  EXPECT_CALL(stub_, SubmitJob(_, _, _))
      .WillOnce(Invoke([&](grpc::ClientContext*, const v1::SubmitJobRequest& request,
                           v1::SubmitJobResponse* response) {
        sent = request;
        response->mutable_job()->set_id("j-1");
        response->set_created(true);
        return grpc::Status::OK;
      }));
  ASSERT_EQ(Run({"submit",
                 "--model",
                 "models/llama",
                 "--method",
                 "rtn",
                 "--bits",
                 "3",
                 "--group-size",
                 "64",
                 "--asym",
                 "--output",
                 "dequantized,packed",
                 "--priority",
                 "7",
                 "--label",
                 "team=nlp",
                 "--label",
                 "env=dev",
                 "--name",
                 "llama-w3",
                 "--request-id",
                 "req-1"}),
            kExitOk)
      << err_.str();
  EXPECT_EQ(out_.str(), "j-1\n");
  EXPECT_EQ(err_.str(), "");

  EXPECT_EQ(sent.request_id(), "req-1");
  const v1::JobSpec& spec = sent.spec();
  EXPECT_EQ(spec.name(), "llama-w3");
  EXPECT_EQ(spec.model().path(), "models/llama");
  ASSERT_EQ(spec.stages_size(), 1);
  EXPECT_EQ(spec.stages(0).rtn().bits(), 3);
  EXPECT_EQ(spec.stages(0).rtn().group_size(), 64);
  EXPECT_FALSE(spec.stages(0).rtn().symmetric());
  ASSERT_EQ(spec.outputs_size(), 2);
  EXPECT_EQ(spec.outputs(0), v1::DEQUANTIZED_SAFETENSORS);
  EXPECT_EQ(spec.outputs(1), v1::PACKED_SAFETENSORS);
  EXPECT_EQ(spec.priority(), 7);
  EXPECT_EQ(spec.labels().at("team"), "nlp");
  EXPECT_EQ(spec.labels().at("env"), "dev");
}

TEST_F(CommandsTest, SubmitWithOnlyAModelUsesTheDefaultStageAndARandomRequestId) {
  std::vector<v1::SubmitJobRequest> sent;
  EXPECT_CALL(stub_, SubmitJob(_, _, _))
      .Times(2)
      .WillRepeatedly(Invoke([&](grpc::ClientContext*, const v1::SubmitJobRequest& request,
                                 v1::SubmitJobResponse* response) {
        sent.push_back(request);
        response->mutable_job()->set_id("j-1");
        return grpc::Status::OK;
      }));
  ASSERT_EQ(Run({"submit", "--model", "m"}), kExitOk);
  ASSERT_EQ(Run({"submit", "--model", "m"}), kExitOk);
  const v1::RtnStage& rtn = sent[0].spec().stages(0).rtn();
  EXPECT_EQ(rtn.bits(), 4);
  EXPECT_EQ(rtn.group_size(), 128);
  EXPECT_TRUE(rtn.symmetric());
  EXPECT_THAT(
      sent[0].request_id(),
      ContainsRegex("^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"));
  EXPECT_NE(sent[0].request_id(), sent[1].request_id());
}

TEST_F(CommandsTest, SubmitFromARecipeWithFlagsOverriding) {
  const std::string recipe = (dir_ / "w8.yaml").string();
  std::ofstream(recipe) << "name: from-recipe\n"
                           "model: {path: models/recipe}\n"
                           "stages:\n"
                           "  - name: w8\n"
                           "    rtn: {bits: 8, group_size: 32, symmetric: true, include: [mlp]}\n"
                           "outputs: [packed_safetensors]\n"
                           "labels: {team: nlp, tier: gold}\n";
  v1::SubmitJobRequest sent;
  EXPECT_CALL(stub_, SubmitJob(_, _, _))
      .WillOnce(Invoke([&](grpc::ClientContext*, const v1::SubmitJobRequest& request,
                           v1::SubmitJobResponse* response) {
        sent = request;
        response->mutable_job()->set_id("j-2");
        return grpc::Status::OK;
      }));
  ASSERT_EQ(Run({"submit", "--recipe", recipe, "--bits", "4", "--label", "tier=silver"}), kExitOk)
      << err_.str();
  const v1::JobSpec& spec = sent.spec();
  EXPECT_EQ(spec.name(), "from-recipe");
  EXPECT_EQ(spec.model().path(), "models/recipe");
  ASSERT_EQ(spec.stages_size(), 1);
  EXPECT_EQ(spec.stages(0).name(), "w8");
  EXPECT_EQ(spec.stages(0).rtn().bits(), 4);         // overridden
  EXPECT_EQ(spec.stages(0).rtn().group_size(), 32);  // kept
  EXPECT_EQ(spec.stages(0).rtn().include(0), "mlp");
  EXPECT_EQ(spec.labels().at("team"), "nlp");
  EXPECT_EQ(spec.labels().at("tier"), "silver");
  ASSERT_EQ(spec.outputs_size(), 1);
  EXPECT_EQ(spec.outputs(0), v1::PACKED_SAFETENSORS);
}

TEST_F(CommandsTest, SubmitMakesAGptqStageWithItsCalibration) {
  v1::SubmitJobRequest sent;
  EXPECT_CALL(stub_, SubmitJob(_, _, _))
      .WillOnce(Invoke([&](grpc::ClientContext*, const v1::SubmitJobRequest& request,
                           v1::SubmitJobResponse* response) {
        sent = request;
        response->mutable_job()->set_id("j-2");
        return grpc::Status::OK;
      }));
  ASSERT_EQ(Run({"submit", "--model", "m", "--method", "gptq", "--bits", "3", "--asym",
                 "--calibration", "calib.txt"}),
            kExitOk)
      << err_.str();
  ASSERT_EQ(sent.spec().stages_size(), 1);
  const v1::GptqStage& gptq = sent.spec().stages(0).gptq();
  EXPECT_EQ(gptq.bits(), 3);
  EXPECT_EQ(gptq.group_size(), 128);
  EXPECT_FALSE(gptq.symmetric());
  EXPECT_EQ(sent.spec().calibration().path(), "calib.txt");
}

TEST_F(CommandsTest, SubmitNamesEveryMethod) {
  std::vector<v1::SubmitJobRequest> sent;
  EXPECT_CALL(stub_, SubmitJob(_, _, _))
      .WillRepeatedly(Invoke([&](grpc::ClientContext*, const v1::SubmitJobRequest& request,
                                 v1::SubmitJobResponse* response) {
        sent.push_back(request);
        response->mutable_job()->set_id("j-3");
        return grpc::Status::OK;
      }));
  ASSERT_EQ(Run({"submit", "--model", "m", "--method", "awq", "--bits", "3", "--calibration", "c.txt"}),
            kExitOk)
      << err_.str();
  ASSERT_EQ(Run({"submit", "--model", "m", "--method", "hqq", "--group-size", "64", "--asym"}), kExitOk)
      << err_.str();
  ASSERT_EQ(Run({"submit", "--model", "m", "--method", "nf4", "--double-quant"}), kExitOk) << err_.str();
  ASSERT_EQ(Run({"submit", "--model", "m", "--method", "fp4", "--group-size", "128"}), kExitOk)
      << err_.str();
  ASSERT_EQ(Run({"submit", "--model", "m", "--method", "int8"}), kExitOk) << err_.str();
  ASSERT_EQ(Run({"submit", "--model", "m", "--calibration", "c.txt", "--gguf", "Q4_K_M, q6_k+imatrix"}),
            kExitOk)
      << err_.str();
  ASSERT_EQ(sent.size(), 6u);
  ASSERT_EQ(sent[5].spec().gguf_size(), 2);
  EXPECT_EQ(sent[5].spec().gguf(0).preset(), "Q4_K_M");
  EXPECT_FALSE(sent[5].spec().gguf(0).importance());
  EXPECT_EQ(sent[5].spec().gguf(1).preset(), "q6_k");
  EXPECT_TRUE(sent[5].spec().gguf(1).importance());
  EXPECT_EQ(sent[0].spec().stages(0).awq().bits(), 3);
  EXPECT_EQ(sent[0].spec().stages(0).awq().group_size(), 128);
  EXPECT_EQ(sent[1].spec().stages(0).hqq().group_size(), 64);
  EXPECT_FALSE(sent[1].spec().stages(0).hqq().symmetric());
  EXPECT_EQ(sent[2].spec().stages(0).bnb_4bit().type(), v1::BNB_4BIT_NF4);
  EXPECT_TRUE(sent[2].spec().stages(0).bnb_4bit().double_quant());
  EXPECT_EQ(sent[3].spec().stages(0).bnb_4bit().type(), v1::BNB_4BIT_FP4);
  EXPECT_EQ(sent[3].spec().stages(0).bnb_4bit().block_size(), 128);
  const v1::RtnStage& int8 = sent[4].spec().stages(0).rtn();
  EXPECT_EQ(int8.bits(), 8);
  EXPECT_TRUE(int8.symmetric());
  EXPECT_EQ(int8.group_size(), -1);
}

TEST_F(CommandsTest, InvalidJobIsRejectedLocally) {
  EXPECT_CALL(stub_, SubmitJob(_, _, _)).Times(0);
  EXPECT_EQ(Run({"submit", "--model", "m", "--bits", "9"}), kExitUsage);
  EXPECT_EQ(err_.str(),
            "compressctl: submit: invalid job: stages[0].rtn.bits: 9 is outside 2..8\n");
  EXPECT_EQ(out_.str(), "");

  EXPECT_EQ(Run({"submit", "--bits", "4"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("model.path: is required"));
  EXPECT_EQ(Run({"submit", "--model", "m", "--bits", "four"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("--bits wants an integer, got \"four\""));
  EXPECT_EQ(Run({"submit", "--model", "m", "--sym", "--asym"}), kExitUsage);
  EXPECT_EQ(Run({"submit", "--model", "m", "--method", "spqr"}), kExitUsage);
  EXPECT_THAT(err_.str(),
              HasSubstr("unknown --method \"spqr\" (methods: rtn, gptq, awq, hqq, nf4, fp4, int8, "
                        "magnitude, wanda, sparsegpt)"));
  EXPECT_EQ(Run({"submit", "--model", "m", "--method", "nf4", "--bits", "3"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("do not apply to nf4/fp4"));
  EXPECT_EQ(Run({"submit", "--model", "m", "--method", "int8", "--group-size", "64"}), kExitUsage);
  EXPECT_EQ(Run({"submit", "--model", "m", "--method", "hqq", "--double-quant"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("--double-quant applies to nf4 and fp4 only"));
  EXPECT_EQ(Run({"submit", "--model", "m", "--method", "awq"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("stages[0].awq: needs calibration data"));
  EXPECT_EQ(Run({"submit", "--model", "m", "--method", "gptq"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("stages[0].gptq: needs calibration data"));
  EXPECT_EQ(Run({"submit", "--model", "m", "--output", "onnx"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("unknown output format \"onnx\" (dequantized, packed, gguf)"));
  EXPECT_EQ(Run({"submit", "--model", "m", "--gguf", "Q4_K_XL"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("gguf[0].preset: \"Q4_K_XL\" is not a preset"));
  EXPECT_EQ(Run({"submit", "--model", "m", "--label", "=x"}), kExitUsage);
  EXPECT_EQ(Run({"submit", "--recipe", (dir_ / "missing.yaml").string()}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("missing.yaml"));
}

TEST_F(CommandsTest, SubmitMakesPruneStages) {
  std::vector<v1::SubmitJobRequest> sent;
  EXPECT_CALL(stub_, SubmitJob(_, _, _))
      .WillRepeatedly(Invoke([&](grpc::ClientContext*, const v1::SubmitJobRequest& request,
                                 v1::SubmitJobResponse* response) {
        sent.push_back(request);
        response->mutable_job()->set_id("j-4");
        return grpc::Status::OK;
      }));
  ASSERT_EQ(Run({"submit", "--model", "m", "--method", "magnitude", "--sparsity", "0.6"}), kExitOk)
      << err_.str();
  ASSERT_EQ(Run({"submit", "--model", "m", "--method", "wanda", "--pattern", "2:4", "--calibration",
                 "c.txt"}),
            kExitOk)
      << err_.str();
  ASSERT_EQ(Run({"submit", "--model", "m", "--method", "SparseGPT", "--calibration", "c.txt"}),
            kExitOk)
      << err_.str();
  ASSERT_EQ(Run({"submit", "--model", "m", "--pattern", "4:8"}), kExitOk) << err_.str();
  // A recipe's prune stage edited by the flags: the pattern replaces the sparsity.
  const std::string recipe = (dir_ / "prune.yaml").string();
  std::ofstream(recipe) << "model: {path: m}\ncalibration: {path: c.txt}\n"
                           "stages: [{prune: {method: wanda, sparsity: 0.7, exclude: [down_proj]}}]\n";
  ASSERT_EQ(Run({"submit", "--recipe", recipe, "--pattern", "2:4"}), kExitOk) << err_.str();
  ASSERT_EQ(sent.size(), 5u);

  const v1::PruneStage& magnitude = sent[0].spec().stages(0).prune();
  EXPECT_EQ(magnitude.method(), v1::MAGNITUDE);
  EXPECT_DOUBLE_EQ(magnitude.sparsity(), 0.6);
  EXPECT_EQ(magnitude.m(), 0);
  const v1::PruneStage& wanda = sent[1].spec().stages(0).prune();
  EXPECT_EQ(wanda.method(), v1::WANDA);
  EXPECT_EQ(wanda.sparsity(), 0.0);
  EXPECT_EQ(wanda.n(), 2);
  EXPECT_EQ(wanda.m(), 4);
  const v1::PruneStage& sparsegpt = sent[2].spec().stages(0).prune();
  EXPECT_EQ(sparsegpt.method(), v1::SPARSEGPT);
  EXPECT_DOUBLE_EQ(sparsegpt.sparsity(), 0.5) << "the default";
  const v1::PruneStage& pattern_only = sent[3].spec().stages(0).prune();
  EXPECT_EQ(pattern_only.method(), v1::MAGNITUDE);
  EXPECT_EQ(pattern_only.n(), 4);
  EXPECT_EQ(pattern_only.m(), 8);
  const v1::PruneStage& edited = sent[4].spec().stages(0).prune();
  EXPECT_EQ(edited.method(), v1::WANDA);
  EXPECT_EQ(edited.sparsity(), 0.0);
  EXPECT_EQ(edited.n(), 2);
  ASSERT_EQ(edited.exclude_size(), 1);
}

TEST_F(CommandsTest, BadPruneFlagsAreRejectedLocally) {
  EXPECT_CALL(stub_, SubmitJob(_, _, _)).Times(0);
  EXPECT_EQ(Run({"submit", "--model", "m", "--method", "wanda"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("stages[0].prune: needs calibration data"));
  EXPECT_EQ(Run({"submit", "--model", "m", "--method", "magnitude", "--sparsity", "1"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("stages[0].prune.sparsity: 1 is outside [0, 1)"));
  EXPECT_EQ(Run({"submit", "--model", "m", "--method", "magnitude", "--sparsity", "half"}),
            kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("--sparsity wants a number, got \"half\""));
  EXPECT_EQ(Run({"submit", "--model", "m", "--method", "magnitude", "--pattern", "2-4"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("--pattern wants N:M, e.g. 2:4, got \"2-4\""));
  EXPECT_EQ(Run({"submit", "--model", "m", "--method", "magnitude", "--pattern", "4:2"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("stages[0].prune.n: 4:2 is not an N:M pattern"));
  EXPECT_EQ(Run({"submit", "--model", "m", "--pattern", "2:4", "--sparsity", "0.5"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("give one"));
  EXPECT_EQ(Run({"submit", "--model", "m", "--method", "wanda", "--bits", "4"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("do not apply to wanda (a pruning method)"));
  EXPECT_EQ(Run({"submit", "--model", "m", "--method", "rtn", "--sparsity", "0.5"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("--sparsity and --pattern apply to the pruning methods"));
}

TEST_F(CommandsTest, StageFlagsDoNotGuessWhichOfSeveralStages) {
  const std::string recipe = (dir_ / "two.yaml").string();
  std::ofstream(recipe) << "model: {path: m}\nstages: [{rtn: {bits: 4}}, {sleep: {}}]\n";
  EXPECT_CALL(stub_, SubmitJob(_, _, _)).Times(0);
  EXPECT_EQ(Run({"submit", "--recipe", recipe, "--bits", "3"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("this one has 2 stages"));
}

TEST_F(CommandsTest, ServerErrorIsExit2WithTheCodeName) {
  EXPECT_CALL(stub_, SubmitJob(_, _, _))
      .WillOnce(Return(
          grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "model.path: models/x does not exist")));
  EXPECT_EQ(Run({"submit", "--model", "models/x"}), kExitRpcError);
  EXPECT_EQ(err_.str(),
            "compressctl: submit: INVALID_ARGUMENT: model.path: models/x does not exist\n");

  EXPECT_CALL(stub_, GetJob(_, _, _))
      .WillOnce(Return(grpc::Status(grpc::StatusCode::UNAVAILABLE, "connection refused")));
  EXPECT_EQ(Run({"get", "j-1"}), kExitRpcError);
  EXPECT_EQ(err_.str(), "compressctl: get: UNAVAILABLE: connection refused\n");
}

TEST_F(CommandsTest, CallsCarryTheTokenAndADeadline) {
  std::multimap<std::string, std::string> metadata;
  std::chrono::system_clock::time_point deadline;
  EXPECT_CALL(stub_, GetJob(_, _, _))
      .WillRepeatedly(Invoke([&](grpc::ClientContext* context, const v1::GetJobRequest&, v1::Job*) {
        metadata = grpc::testing::ClientContextTestPeer(context).GetSendInitialMetadata();
        deadline = context->deadline();
        return grpc::Status::OK;
      }));
  auto now = std::chrono::system_clock::now();
  ASSERT_EQ(Run({"get", "j-1", "--token", "s3cret"}), kExitOk);
  EXPECT_EQ(metadata.count("authorization"), 1u);
  EXPECT_EQ(metadata.find("authorization")->second, "Bearer s3cret");
  EXPECT_NEAR(std::chrono::duration<double>(deadline - now).count(), 30, 2);  // the default

  ASSERT_EQ(Run({"get", "j-1", "--timeout", "5"}), kExitOk);
  EXPECT_EQ(metadata.count("authorization"), 0u);
  EXPECT_NEAR(std::chrono::duration<double>(deadline - now).count(), 5, 2);
}

TEST_F(CommandsTest, SubmitJsonAndResubmission) {
  EXPECT_CALL(stub_, SubmitJob(_, _, _))
      .WillOnce(Invoke(
          [&](grpc::ClientContext*, const v1::SubmitJobRequest&, v1::SubmitJobResponse* response) {
            response->mutable_job()->set_id("j-1");
            response->mutable_job()->set_state(v1::QUEUED);
            response->set_created(false);
            return grpc::Status::OK;
          }));
  ASSERT_EQ(Run({"submit", "--model", "m", "--json", "--request-id", "r"}), kExitOk);
  EXPECT_EQ(out_.str(), "{\"id\":\"j-1\",\"state\":\"QUEUED\"}\n");
  EXPECT_THAT(err_.str(), HasSubstr("request id r was submitted before"));
}

TEST_F(CommandsTest, SubmitWatchFollowsTheNewJob) {
  EXPECT_CALL(stub_, SubmitJob(_, _, _))
      .WillOnce(Invoke(
          [&](grpc::ClientContext*, const v1::SubmitJobRequest&, v1::SubmitJobResponse* response) {
            response->mutable_job()->set_id("j-1");
            response->set_created(true);
            return grpc::Status::OK;
          }));
  EXPECT_CALL(stub_, WatchJobRaw(_, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::WatchJobRequest& request) {
        EXPECT_EQ(request.job_id(), "j-1");
        return StreamOf<v1::JobEvent>({StateEvent(1, v1::CANCELLED, "cancelled by alice")});
      }));
  EXPECT_EQ(Run({"submit", "--model", "m", "--watch"}), kExitJobFailed);
  EXPECT_THAT(out_.str(), HasSubstr("j-1\n"));
  EXPECT_EQ(err_.str(), "compressctl: submit: job j-1 CANCELLED: cancelled by alice\n");
}

// ---------------------------------------------------------------- get, list, cancel

v1::Job FinishedJob() {
  v1::Job job;
  job.set_id("j-7");
  job.mutable_spec()->set_name("llama-w4");
  job.mutable_spec()->mutable_model()->set_path("models/llama");
  (*job.mutable_spec()->mutable_labels())["team"] = "nlp";
  job.set_state(v1::SUCCEEDED);
  job.set_progress(1);
  job.set_message("done");
  job.set_worker_id("worker-a");
  job.set_attempts(2);
  job.mutable_create_time()->set_seconds(1714564800);  // 2024-05-01T12:00:00Z
  job.mutable_start_time()->set_seconds(1714564805);
  job.mutable_end_time()->set_seconds(1714564865);
  v1::JobReport* report = job.mutable_report();
  report->set_size_before_bytes(int64_t{4} << 30);
  report->set_size_after_bytes(int64_t{1} << 30);
  report->set_bits_per_weight(4.25);
  report->set_parameters(2000);
  report->set_quantized_parameters(1800);
  report->set_seconds(60);
  v1::StageReport* stage = report->add_stages();
  stage->set_name("w4");
  stage->set_method("rtn");
  stage->set_seconds(58.5);
  stage->set_bytes_in(int64_t{4} << 30);
  stage->set_bytes_out(int64_t{1} << 30);
  stage->set_mean_relative_error(0.0123);
  v1::StageReport* gguf = report->add_stages();
  gguf->set_name("gguf");
  gguf->set_kind("export");
  gguf->set_method("gguf");
  gguf->set_seconds(1.25);
  gguf->set_bytes_out(int64_t{3} << 20);
  v1::Artifact* artifact = job.add_artifacts();
  artifact->set_name("dequantized/model.safetensors");
  artifact->set_size_bytes(1536);
  artifact->set_sha256(std::string(64, 'a'));
  return job;
}

TEST_F(CommandsTest, GetShowsTheKeyFields) {
  EXPECT_CALL(stub_, GetJob(_, _, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::GetJobRequest& request, v1::Job* job) {
        EXPECT_EQ(request.job_id(), "j-7");
        *job = FinishedJob();
        return grpc::Status::OK;
      }));
  ASSERT_EQ(Run({"get", "j-7"}), kExitOk);
  const std::string text = out_.str();
  EXPECT_THAT(text, HasSubstr("Job:       j-7\n"));
  EXPECT_THAT(text, HasSubstr("Name:      llama-w4\n"));
  EXPECT_THAT(text, HasSubstr("State:     SUCCEEDED (100.0%)\n"));
  EXPECT_THAT(text, HasSubstr("Message:   done\n"));
  EXPECT_THAT(text, HasSubstr("Labels:    team=nlp\n"));
  EXPECT_THAT(text, HasSubstr("Worker:    worker-a\n"));
  EXPECT_THAT(text, HasSubstr("Attempts:  2\n"));
  EXPECT_THAT(text, HasSubstr("Created:   2024-05-01T12:00:00Z\n"));
  EXPECT_THAT(text, HasSubstr("Ended:     2024-05-01T12:01:05Z\n"));
  EXPECT_THAT(text, HasSubstr("4.0 GiB -> 1.0 GiB (4.00x smaller)"));
  EXPECT_THAT(text, HasSubstr("Bits per weight:  4.25"));
  EXPECT_THAT(text, HasSubstr("Stage w4 (rtn): 58.5 s"));
  EXPECT_THAT(text, HasSubstr("mean relative error 0.0123"));
  EXPECT_THAT(text, HasSubstr("Export gguf: 1.2 s, 3.0 MiB written\n"));
  EXPECT_THAT(
      text, HasSubstr("dequantized/model.safetensors     1.5 KiB  sha256 " + std::string(64, 'a')));
}

TEST_F(CommandsTest, GetShowsTheEvaluationBeforeAndAfter) {
  v1::Job finished = FinishedJob();
  v1::EvaluationReport* e = finished.mutable_report()->mutable_evaluation();
  e->set_text_path("eval/revelation.txt");
  e->set_context_length(256);
  e->set_stride(128);
  e->set_sample_prompt("And God said");
  e->mutable_before()->set_perplexity(20.0);
  e->mutable_before()->set_tokens_scored(20482);
  e->mutable_before()->set_sample(", Let there be light");
  e->mutable_after()->set_perplexity(21.0);
  e->mutable_after()->set_sample(", Let there be lights");
  e->set_mean_kl_divergence(0.0312);
  e->set_max_kl_divergence(1.5);
  e->set_top1_agreement(0.9375);
  EXPECT_CALL(stub_, GetJob(_, _, _))
      .WillOnce(DoAll(SetArgPointee<2>(finished), Return(grpc::Status::OK)));
  ASSERT_EQ(Run({"get", "j-7"}), kExitOk);
  const std::string text = out_.str();
  EXPECT_THAT(text, HasSubstr("Evaluation on eval/revelation.txt (20482 tokens, windows of 256, stride 128)"));
  EXPECT_THAT(text, HasSubstr("Perplexity:       20.000 -> 21.000 (+5.00%)"));
  EXPECT_THAT(text, HasSubstr("KL divergence:    mean 0.0312, max 1.5000 nats"));
  EXPECT_THAT(text, HasSubstr("Top-1 agreement:  93.75%"));
  EXPECT_THAT(text, HasSubstr("Sample before:    And God said, Let there be light\n"));
  EXPECT_THAT(text, HasSubstr("Sample after:     And God said, Let there be lights\n"));
}

TEST_F(CommandsTest, GetJsonIsTheJobMessage) {
  EXPECT_CALL(stub_, GetJob(_, _, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::GetJobRequest&, v1::Job* job) {
        *job = FinishedJob();
        return grpc::Status::OK;
      }));
  ASSERT_EQ(Run({"get", "j-7", "--json"}), kExitOk);
  v1::Job parsed;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(out_.str(), &parsed).ok());
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(parsed, FinishedJob()));
}

TEST_F(CommandsTest, ListPagesFiltersAndPrintsATable) {
  std::vector<v1::ListJobsRequest> requests;
  EXPECT_CALL(stub_, ListJobs(_, _, _))
      .Times(2)
      .WillRepeatedly(Invoke([&](grpc::ClientContext*, const v1::ListJobsRequest& request,
                                 v1::ListJobsResponse* response) {
        requests.push_back(request);
        if (request.page_token().empty()) {
          v1::Job* job = response->add_jobs();
          job->set_id("j-3");
          job->set_state(v1::RUNNING);
          job->set_progress(0.5);
          job->mutable_spec()->set_name("third");
          response->add_jobs()->set_id("j-2");
          response->set_next_page_token("page-2");
        } else {
          EXPECT_EQ(request.page_token(), "page-2");
          response->add_jobs()->set_id("j-1");
        }
        return grpc::Status::OK;
      }));
  ASSERT_EQ(Run({"list", "--state", "running,Queued", "--state", "failed", "--label", "team=nlp"}),
            kExitOk)
      << err_.str();
  ASSERT_EQ(requests.size(), 2u);
  EXPECT_THAT(requests[0].states(), ::testing::ElementsAre(v1::RUNNING, v1::QUEUED, v1::FAILED));
  EXPECT_EQ(requests[0].labels().at("team"), "nlp");
  EXPECT_EQ(requests[0].page_size(), 100);
  EXPECT_EQ(requests[1].page_size(), 98);

  std::vector<std::string> lines = Lines(out_.str());
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_THAT(lines[0], ContainsRegex("^ID +STATE +PROGRESS +CREATED +NAME$"));
  EXPECT_THAT(lines[1], ContainsRegex("^j-3 +RUNNING +50% +- +third$"));
  EXPECT_THAT(lines[2], ContainsRegex("^j-2 +UNKNOWN +0% +-$"));
  EXPECT_THAT(lines[3], ContainsRegex("^j-1 "));
  EXPECT_EQ(err_.str(), "");
}

TEST_F(CommandsTest, ListStopsAtTheLimitAndSaysThereIsMore) {
  EXPECT_CALL(stub_, ListJobs(_, _, _))
      .WillOnce(Invoke([&](grpc::ClientContext*, const v1::ListJobsRequest& request,
                           v1::ListJobsResponse* response) {
        EXPECT_EQ(request.page_size(), 2);
        response->add_jobs()->set_id("j-9");
        response->add_jobs()->set_id("j-8");
        response->set_next_page_token("more");
        return grpc::Status::OK;
      }));
  ASSERT_EQ(Run({"list", "--limit", "2", "--json"}), kExitOk);
  EXPECT_EQ(out_.str(), "{\"id\":\"j-9\"}\n{\"id\":\"j-8\"}\n");

  EXPECT_EQ(Run({"list", "--state", "sleeping"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("unknown state \"sleeping\""));
}

TEST_F(CommandsTest, CancelPrintsTheNewState) {
  EXPECT_CALL(stub_, CancelJob(_, _, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::CancelJobRequest& request, v1::Job* job) {
        job->set_id(request.job_id());
        job->set_state(v1::CANCELLED);
        return grpc::Status::OK;
      }));
  ASSERT_EQ(Run({"cancel", "j-4"}), kExitOk);
  EXPECT_EQ(out_.str(), "j-4 CANCELLED\n");
}

TEST_F(CommandsTest, DeletePrintsWhatWasFreedAndPassesRefusalsOn) {
  EXPECT_CALL(stub_, DeleteJob(_, _, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::DeleteJobRequest& request,
                          v1::DeleteJobResponse* response) {
        response->set_job_id(request.job_id());
        response->set_freed_bytes(int64_t{3} << 20);
        return grpc::Status::OK;
      }))
      .WillOnce(Return(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                    "job j-6 is RUNNING; only an ended job can be deleted")));
  ASSERT_EQ(Run({"delete", "j-5"}), kExitOk);
  EXPECT_EQ(out_.str(), "deleted j-5 (3.0 MiB freed)\n");
  EXPECT_NE(Run({"delete", "j-6"}), kExitOk);
  EXPECT_THAT(err_.str(), HasSubstr("only an ended job can be deleted"));
}

TEST_F(CommandsTest, PauseAndResumeSendTheJobAndPrintTheNewState) {
  EXPECT_CALL(stub_, PauseJob(_, _, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::PauseJobRequest& request, v1::Job* job) {
        job->set_id(request.job_id());
        job->set_state(v1::PAUSED);
        return grpc::Status::OK;
      }));
  EXPECT_CALL(stub_, ResumeJob(_, _, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::ResumeJobRequest& request, v1::Job*) {
        EXPECT_EQ(request.job_id(), "j-5");
        return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "job j-5 is RUNNING, not paused");
      }));
  ASSERT_EQ(Run({"pause", "j-5"}), kExitOk);
  EXPECT_EQ(out_.str(), "j-5 PAUSED\n");
  EXPECT_NE(Run({"resume", "j-5"}), kExitOk);
  EXPECT_THAT(err_.str(), HasSubstr("not paused"));
}

TEST_F(CommandsTest, GetShowsEachTaskOfASplitJob) {
  EXPECT_CALL(stub_, GetJob(_, _, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::GetJobRequest& request, v1::Job* job) {
        job->set_id(request.job_id());
        job->set_state(v1::RUNNING);
        v1::JobTask* blocks = job->add_tasks();
        blocks->set_index(0);
        blocks->set_kind(v1::TASK_BLOCKS);
        blocks->set_first_layer(0);
        blocks->set_end_layer(16);
        blocks->set_state(v1::TASK_RUNNING);
        blocks->set_progress(0.25);
        blocks->set_worker_id("gpu-3");
        blocks->set_memory_bytes(int64_t{3} << 30);
        v1::JobTask* assemble = job->add_tasks();
        assemble->set_index(1);
        assemble->set_kind(v1::TASK_ASSEMBLE);
        assemble->set_state(v1::TASK_PENDING);
        assemble->set_message("waiting: task 1 (assemble) needs an estimated 90.00 GiB");
        return grpc::Status::OK;
      }));
  ASSERT_EQ(Run({"get", "j-6"}), kExitOk);
  EXPECT_THAT(out_.str(), HasSubstr("blocks 0-15"));
  EXPECT_THAT(out_.str(), HasSubstr("running"));
  EXPECT_THAT(out_.str(), HasSubstr("25.0%"));
  EXPECT_THAT(out_.str(), HasSubstr("gpu-3"));
  EXPECT_THAT(out_.str(), HasSubstr("assemble"));
  EXPECT_THAT(out_.str(), HasSubstr("needs an estimated 90.00 GiB"));
}

// ---------------------------------------------------------------- watch, logs

TEST_F(CommandsTest, WatchJsonPrintsOneObjectPerEventAndExit3OnFailure) {
  EXPECT_CALL(stub_, WatchJobRaw(_, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::WatchJobRequest& request) {
        EXPECT_EQ(request.job_id(), "j-1");
        EXPECT_EQ(request.from_sequence(), 0);
        return StreamOf<v1::JobEvent>({StateEvent(1, v1::RUNNING), ProgressEvent(2, 0.5, "half"),
                                       LogEvent(3, "ERROR", "CUDA out of memory"),
                                       StateEvent(4, v1::FAILED, "out of memory")});
      }));
  EXPECT_EQ(Run({"watch", "j-1", "--json"}, /*is_terminal=*/true), kExitJobFailed);
  std::vector<std::string> lines = Lines(out_.str());
  ASSERT_EQ(lines.size(), 4u);
  for (size_t i = 0; i < lines.size(); ++i) {
    v1::JobEvent event;
    ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(lines[i], &event).ok()) << lines[i];
    EXPECT_EQ(event.sequence(), static_cast<int64_t>(i + 1));
  }
  EXPECT_THAT(lines[1], HasSubstr("\"fraction\":0.5"));
  EXPECT_EQ(err_.str(), "compressctl: watch: job j-1 FAILED: out of memory\n");
}

TEST_F(CommandsTest, WatchOutsideATerminalPrintsJsonAndExit0OnSuccess) {
  EXPECT_CALL(stub_, WatchJobRaw(_, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::WatchJobRequest& request) {
        EXPECT_EQ(request.from_sequence(), 5);
        return StreamOf<v1::JobEvent>({ProgressEvent(5, 1, "done"), StateEvent(6, v1::SUCCEEDED)});
      }));
  EXPECT_EQ(Run({"watch", "j-1", "--from-sequence", "5"}), kExitOk);
  EXPECT_EQ(Lines(out_.str()).size(), 2u);
  EXPECT_EQ(err_.str(), "");
}

TEST_F(CommandsTest, WatchOnATerminalDrawsAProgressBar) {
  EXPECT_CALL(stub_, WatchJobRaw(_, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::WatchJobRequest&) {
        return StreamOf<v1::JobEvent>(
            {StateEvent(1, v1::RUNNING), ProgressEvent(2, 0.25, "block 8"),
             ProgressEvent(3, 0.5, "block 16"), StateEvent(4, v1::SUCCEEDED)});
      }));
  EXPECT_EQ(Run({"watch", "j-1"}, /*is_terminal=*/true), kExitOk);
  const std::string text = out_.str();
  EXPECT_THAT(text, HasSubstr("\r\x1b[K[###############...............]  50.0%"));
  // A quarter per 10 s of event time leaves 20 s for the second half.
  EXPECT_THAT(text, HasSubstr("ETA 20s  w4: block 16"));
  EXPECT_THAT(text, HasSubstr("INFO state RUNNING\n"));
  EXPECT_THAT(text, HasSubstr("INFO state SUCCEEDED\n"));
  EXPECT_THAT(text, Not(HasSubstr("{")));
}

TEST_F(CommandsTest, WatchReconnectsFromTheLastSeenSequence) {
  EXPECT_CALL(stub_, WatchJobRaw(_, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::WatchJobRequest& request) {
        EXPECT_EQ(request.from_sequence(), 0);
        return StreamOf<v1::JobEvent>(
            {StateEvent(1, v1::RUNNING), ProgressEvent(2, 0.5, "half")},
            grpc::Status(grpc::StatusCode::UNAVAILABLE, "server restart"));
      }))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::WatchJobRequest& request) {
        EXPECT_EQ(request.from_sequence(), 3);
        // A server may repeat an event; it is shown once.
        return StreamOf<v1::JobEvent>(
            {ProgressEvent(2, 0.5, "half"), StateEvent(3, v1::SUCCEEDED)});
      }));
  EXPECT_EQ(Run({"watch", "j-1", "--json"}), kExitOk) << err_.str();
  EXPECT_EQ(Lines(out_.str()).size(), 3u);
}

TEST_F(CommandsTest, WatchStopsOnOtherErrors) {
  EXPECT_CALL(stub_, WatchJobRaw(_, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::WatchJobRequest&) {
        return StreamOf<v1::JobEvent>({},
                                      grpc::Status(grpc::StatusCode::NOT_FOUND, "no job j-404"));
      }));
  EXPECT_EQ(Run({"watch", "j-404"}), kExitRpcError);
  EXPECT_EQ(err_.str(), "compressctl: watch: NOT_FOUND: no job j-404\n");
}

TEST_F(CommandsTest, WatchAsksTheJobWhenTheStreamEndsWithoutAFinalState) {
  EXPECT_CALL(stub_, WatchJobRaw(_, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::WatchJobRequest&) {
        return StreamOf<v1::JobEvent>({});
      }));
  EXPECT_CALL(stub_, GetJob(_, _, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::GetJobRequest&, v1::Job* job) {
        job->set_state(v1::FAILED);
        job->set_message("lease lost 3 times");
        return grpc::Status::OK;
      }));
  EXPECT_EQ(Run({"watch", "j-1", "--from-sequence", "99"}), kExitJobFailed);
  EXPECT_EQ(err_.str(), "compressctl: watch: job j-1 FAILED: lease lost 3 times\n");
}

TEST_F(CommandsTest, LogsPrintsLogLinesAndStateChangesUpToNow) {
  EXPECT_CALL(stub_, GetJob(_, _, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::GetJobRequest&, v1::Job* job) {
        job->set_state(v1::RUNNING);
        job->set_last_sequence(3);
        return grpc::Status::OK;
      }));
  EXPECT_CALL(stub_, WatchJobRaw(_, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::WatchJobRequest&) {
        // Event 4 arrives while reading; without --follow it is past "now".
        return StreamOf<v1::JobEvent>(
            {StateEvent(1, v1::RUNNING), ProgressEvent(2, 0.1, "x"),
             LogEvent(3, "WARNING", "slow disk"), LogEvent(4, "INFO", "later")},
            grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
      }));
  ASSERT_EQ(Run({"logs", "j-1"}), kExitOk) << err_.str();
  EXPECT_EQ(out_.str(),
            "2024-05-01T12:00:10.000Z INFO state RUNNING\n"
            "2024-05-01T12:00:30.000Z WARNING slow disk\n");
}

TEST_F(CommandsTest, LogsFollowReadsUntilTheStreamEnds) {
  EXPECT_CALL(stub_, GetJob(_, _, _)).Times(0);
  EXPECT_CALL(stub_, WatchJobRaw(_, _))
      .WillOnce(Invoke([](grpc::ClientContext*, const v1::WatchJobRequest&) {
        return StreamOf<v1::JobEvent>(
            {LogEvent(1, "INFO", "a"), LogEvent(2, "", "b"), StateEvent(3, v1::FAILED, "boom")});
      }));
  ASSERT_EQ(Run({"logs", "j-1", "--follow"}), kExitOk);
  EXPECT_EQ(out_.str(),
            "2024-05-01T12:00:10.000Z INFO a\n"
            "2024-05-01T12:00:20.000Z INFO b\n"
            "2024-05-01T12:00:30.000Z ERROR state FAILED: boom\n");
}

// ---------------------------------------------------------------- fetch

class FetchTest : public CommandsTest {
 protected:
  static constexpr char kName[] = "dequantized/model.safetensors";

  void SetUp() override {
    CommandsTest::SetUp();
    for (int i = 0; i < 1000; ++i) content_.push_back(static_cast<char>(i * 7));
    out_dir_ = (dir_ / "out").string();
  }

  // GetJob answers a job with one artifact whose recorded sha256 is `sha256`.
  void ExpectGetJob(const std::string& sha256) {
    EXPECT_CALL(stub_, GetJob(_, _, _))
        .WillRepeatedly(
            Invoke([this, sha256](grpc::ClientContext*, const v1::GetJobRequest&, v1::Job* job) {
              job->set_id("j-1");
              job->set_state(v1::SUCCEEDED);
              v1::Artifact* artifact = job->add_artifacts();
              artifact->set_name(artifact_name_);
              artifact->set_size_bytes(static_cast<int64_t>(content_.size()));
              artifact->set_sha256(sha256);
              return grpc::Status::OK;
            }));
  }

  // DownloadArtifact serves content_ from the requested offset in 300-byte chunks.
  void ExpectDownloads(int times, std::vector<int64_t>* offsets) {
    EXPECT_CALL(stub_, DownloadArtifactRaw(_, _))
        .Times(times)
        .WillRepeatedly(Invoke(
            [this, offsets](grpc::ClientContext*, const v1::DownloadArtifactRequest& request) {
              EXPECT_EQ(request.job_id(), "j-1");
              EXPECT_EQ(request.name(), artifact_name_);
              offsets->push_back(request.offset());
              std::vector<v1::ArtifactChunk> chunks;
              for (int64_t at = request.offset(); at < static_cast<int64_t>(content_.size());
                   at += 300) {
                v1::ArtifactChunk chunk;
                chunk.set_offset(at);
                chunk.set_data(content_.substr(at, 300));
                chunk.set_total_size(static_cast<int64_t>(content_.size()));
                chunks.push_back(chunk);
              }
              return StreamOf<v1::ArtifactChunk>(chunks);
            }));
  }

  std::string FinalPath() const { return out_dir_ + "/" + artifact_name_; }
  std::string PartialPath() const { return FinalPath() + ".partial"; }
  static std::string Slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  std::string content_;
  std::string out_dir_;
  std::string artifact_name_ = kName;
};

TEST_F(FetchTest, DownloadsVerifiesAndRenamesIntoPlace) {
  ExpectGetJob(Sha256Hex(content_));
  std::vector<int64_t> offsets;
  ExpectDownloads(1, &offsets);
  ASSERT_EQ(Run({"fetch", "j-1", "--out", out_dir_}), kExitOk) << err_.str();
  EXPECT_EQ(offsets, std::vector<int64_t>{0});
  EXPECT_EQ(Slurp(FinalPath()), content_);
  EXPECT_FALSE(fs::exists(PartialPath()));
  EXPECT_EQ(out_.str(), std::string(kName) + ": 1000 B, sha256 ok\n");
}

TEST_F(FetchTest, ResumesFromThePartialFile) {
  fs::create_directories(fs::path(PartialPath()).parent_path());
  std::ofstream(PartialPath(), std::ios::binary) << content_.substr(0, 420);
  ExpectGetJob(Sha256Hex(content_));
  std::vector<int64_t> offsets;
  ExpectDownloads(1, &offsets);
  ASSERT_EQ(Run({"fetch", "j-1", "--out", out_dir_}), kExitOk) << err_.str();
  EXPECT_EQ(offsets, std::vector<int64_t>{420});
  EXPECT_EQ(Slurp(FinalPath()), content_);
  EXPECT_FALSE(fs::exists(PartialPath()));
  EXPECT_THAT(out_.str(), HasSubstr("resumed at byte 420"));
}

TEST_F(FetchTest, ResumesWithinOneRunAfterUnavailable) {
  ExpectGetJob(Sha256Hex(content_));
  std::vector<int64_t> offsets;
  EXPECT_CALL(stub_, DownloadArtifactRaw(_, _))
      .WillOnce(Invoke([&](grpc::ClientContext*, const v1::DownloadArtifactRequest& request) {
        offsets.push_back(request.offset());
        v1::ArtifactChunk chunk;
        chunk.set_data(content_.substr(0, 600));
        return StreamOf<v1::ArtifactChunk>({chunk},
                                           grpc::Status(grpc::StatusCode::UNAVAILABLE, "reset"));
      }))
      .WillOnce(Invoke([&](grpc::ClientContext*, const v1::DownloadArtifactRequest& request) {
        offsets.push_back(request.offset());
        v1::ArtifactChunk chunk;
        chunk.set_offset(600);
        chunk.set_data(content_.substr(600));
        return StreamOf<v1::ArtifactChunk>({chunk});
      }));
  ASSERT_EQ(Run({"fetch", "j-1", "--out", out_dir_}), kExitOk) << err_.str();
  EXPECT_EQ(offsets, (std::vector<int64_t>{0, 600}));
  EXPECT_EQ(Slurp(FinalPath()), content_);
}

TEST_F(FetchTest, Sha256MismatchLeavesNoFile) {
  ExpectGetJob(std::string(64, '0'));
  std::vector<int64_t> offsets;
  ExpectDownloads(1, &offsets);
  EXPECT_EQ(Run({"fetch", "j-1", "--out", out_dir_}), kExitRpcError);
  const std::string error = err_.str();
  EXPECT_THAT(error, AllOf(HasSubstr("compressctl: fetch: DATA_LOSS: "),
                           HasSubstr("sha256 mismatch"), HasSubstr(Sha256Hex(content_))));
  EXPECT_EQ(std::count(error.begin(), error.end(), '\n'), 1);  // one line
  EXPECT_FALSE(fs::exists(FinalPath()));
  EXPECT_FALSE(fs::exists(PartialPath()));
}

TEST_F(FetchTest, ChunkAtTheWrongOffsetIsDataLoss) {
  ExpectGetJob(Sha256Hex(content_));
  EXPECT_CALL(stub_, DownloadArtifactRaw(_, _))
      .WillOnce(Invoke([&](grpc::ClientContext*, const v1::DownloadArtifactRequest&) {
        v1::ArtifactChunk chunk;
        chunk.set_offset(10);
        chunk.set_data("xyz");
        return StreamOf<v1::ArtifactChunk>({chunk});
      }));
  EXPECT_EQ(Run({"fetch", "j-1", "--out", out_dir_}), kExitRpcError);
  EXPECT_THAT(err_.str(), HasSubstr("DATA_LOSS: " + std::string(kName) +
                                    ": the server sent bytes at 10, expected 0"));
  EXPECT_FALSE(fs::exists(FinalPath()));
}

TEST_F(FetchTest, AlreadyFetchedFilesAreNotDownloadedAgain) {
  fs::create_directories(fs::path(FinalPath()).parent_path());
  std::ofstream(FinalPath(), std::ios::binary) << content_;
  ExpectGetJob(Sha256Hex(content_));
  EXPECT_CALL(stub_, DownloadArtifactRaw(_, _)).Times(0);
  ASSERT_EQ(Run({"fetch", "j-1", "--out", out_dir_}), kExitOk);
  EXPECT_THAT(out_.str(), HasSubstr("already fetched"));
}

TEST_F(FetchTest, UnsafeArtifactNamesAreRefused) {
  artifact_name_ = "../escaped.safetensors";
  ExpectGetJob(Sha256Hex(content_));
  EXPECT_CALL(stub_, DownloadArtifactRaw(_, _)).Times(0);
  EXPECT_EQ(Run({"fetch", "j-1", "--out", out_dir_}), kExitRpcError);
  EXPECT_THAT(err_.str(), HasSubstr("PERMISSION_DENIED: artifact name \"../escaped.safetensors\""));
  EXPECT_FALSE(fs::exists(dir_ / "escaped.safetensors"));
  EXPECT_FALSE(fs::exists(dir_ / "escaped.safetensors.partial"));
}

TEST_F(FetchTest, NameSelectsOneArtifact) {
  ExpectGetJob(Sha256Hex(content_));
  EXPECT_CALL(stub_, DownloadArtifactRaw(_, _)).Times(0);
  EXPECT_EQ(Run({"fetch", "j-1", "--out", out_dir_, "--name", "packed/model.safetensors"}),
            kExitRpcError);
  EXPECT_EQ(err_.str(),
            "compressctl: fetch: NOT_FOUND: job j-1 has no artifact "
            "\"packed/model.safetensors\" (artifacts: " +
                std::string(kName) + ")\n");
}

TEST_F(FetchTest, OutIsRequired) {
  EXPECT_CALL(stub_, GetJob(_, _, _)).Times(0);
  EXPECT_EQ(Run({"fetch", "j-1"}), kExitUsage);
  EXPECT_EQ(err_.str(), "compressctl: fetch: --out DIR is required\n");
}

TEST_F(CommandsTest, HelpNeedsNoServer) {
  absl::StatusOr<ParsedArgs> parsed = ParseArgs({"help"});
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(RunCommand(nullptr, *parsed, out_, err_, false), kExitOk);
  EXPECT_THAT(out_.str(), HasSubstr("compressctl fetch"));
}

// ---------------------------------------------------------------- inspect

class InspectTest : public CommandsTest {
 protected:
  // Runs a local verb with no server connection at all.
  int RunLocal(const std::vector<std::string>& args) {
    out_.str("");
    err_.str("");
    absl::StatusOr<ParsedArgs> parsed = ParseArgs(args);
    EXPECT_TRUE(parsed.ok()) << parsed.status();
    if (!parsed.ok()) return -1;
    return RunCommand(nullptr, *parsed, out_, err_, /*is_terminal=*/false);
  }

  // A small llama-like GGUF: a Q8_0 embedding of torch shape [4, 64] and an
  // F32 norm, with a tokenizer of 7 tokens.
  std::string WriteGguf() {
    const std::string path = (dir_ / "tiny.gguf").string();
    absl::StatusOr<GgufWriter> writer = GgufWriter::Open(
        path,
        {{"general.architecture", GgufValue::String("llama")},
         {"llama.context_length", GgufValue::Uint32(2048)},
         {"llama.rope.freq_base", GgufValue::Float32(10000.0f)},
         {"tokenizer.ggml.add_bos_token", GgufValue::Bool(true)},
         {"tokenizer.ggml.tokens",
          GgufValue::Array(std::vector<std::string>{"<unk>", "<s>", "\"q\"\n", "▁the", "日本",
                                                    "🦙", "\x01"})},
         {"tokenizer.ggml.token_type", GgufValue::Array(std::vector<int32_t>{2, 3})},
         {"general.empty", GgufValue::Array(std::vector<uint64_t>{})}},
        {{"token_embd.weight", GgufNeFromTorchShape({4, 64}), GgufType::kQ8_0},
         {"output_norm.weight", {64}, GgufType::kF32}});
    EXPECT_TRUE(writer.ok()) << writer.status();
    EXPECT_TRUE(writer->WriteTensor("token_embd.weight", std::string(8 * 34, '\x11')).ok());
    EXPECT_TRUE(writer->WriteTensor("output_norm.weight", std::string(256, '\0')).ok());
    EXPECT_TRUE(writer->Commit().ok());
    return path;
  }

  std::string WriteSafetensors() {
    const std::string path = (dir_ / "model.safetensors").string();
    absl::StatusOr<SafetensorsHeader> header =
        LayoutSafetensors({{"model.embed_tokens.weight", SafetensorsDtype::kBF16, {4, 64}},
                           {"model.norm.weight", SafetensorsDtype::kF32, {64}}},
                          {{"format", "pt"}});
    EXPECT_TRUE(header.ok()) << header.status();
    absl::StatusOr<std::string> prefix = SerializeSafetensorsHeader(&*header);
    EXPECT_TRUE(prefix.ok()) << prefix.status();
    std::ofstream(path, std::ios::binary) << *prefix << std::string(512 + 256, '\0');
    return path;
  }
};

// The output with the test folder's path replaced by "DIR".
std::string WithoutDir(std::string text, const fs::path& dir) {
  return absl::StrReplaceAll(text, {{dir.string(), "DIR"}});
}

// The JSON output parsed as a google.protobuf.Struct: proves it is valid JSON.
google::protobuf::Struct ParseJsonObject(const std::string& text) {
  google::protobuf::Struct object;
  const auto status = google::protobuf::util::JsonStringToMessage(text, &object);
  EXPECT_TRUE(status.ok()) << status.ToString() << "\n" << text;
  return object;
}

TEST_F(InspectTest, GgufTextShowsMetadataTensorsAndTotals) {
  const std::string path = WriteGguf();
  ASSERT_EQ(RunLocal({"inspect", path}), kExitOk) << err_.str();
  EXPECT_EQ(err_.str(), "");
  EXPECT_EQ(
      WithoutDir(out_.str(), dir_),
      "File:      DIR/tiny.gguf (1.1 KiB)\n"
      "Format:    GGUF version 3, alignment 32, data at byte 544\n"
      "Metadata:  7 keys\n"
      "  general.architecture          STRING         \"llama\"\n"
      "  llama.context_length          UINT32         2048\n"
      "  llama.rope.freq_base          FLOAT32        10000\n"
      "  tokenizer.ggml.add_bos_token  BOOL           true\n"
      "  tokenizer.ggml.tokens         ARRAY[STRING]  [7 items: \"<unk>\", \"<s>\", "
      "\"\\\"q\\\"\\n\", \"▁the\", \"日本\", ...]\n"
      "  tokenizer.ggml.token_type     ARRAY[INT32]   [2 items: 2, 3]\n"
      "  general.empty                 ARRAY[UINT64]  [0 items]\n"
      "Tensors:   2 tensors\n"
      "  NAME                SHAPE    TYPE  BYTES\n"
      "  token_embd.weight   [4, 64]  Q8_0  272\n"
      "  output_norm.weight  [64]     F32   256\n"
      "Total:     2 tensors, 320 weights, 528 bytes (528 B), 13.20 bits per weight\n");
}

TEST_F(InspectTest, GgufTextCutsLongStrings) {
  const std::string path = (dir_ / "long.gguf").string();
  // 70 bytes of two-byte characters: the cut may not split one.
  std::string long_text;
  for (int i = 0; i < 35; ++i) long_text += "é";
  absl::StatusOr<GgufWriter> writer =
      GgufWriter::Open(path, {{"tokenizer.chat_template", GgufValue::String(long_text)}}, {});
  ASSERT_TRUE(writer.ok()) << writer.status();
  ASSERT_TRUE(writer->Commit().ok());
  ASSERT_EQ(RunLocal({"inspect", path}), kExitOk) << err_.str();
  std::string shown;
  for (int i = 0; i < 32; ++i) shown += "é";
  EXPECT_THAT(out_.str(), HasSubstr(absl::StrCat("STRING  \"", shown, "\"... (70 bytes)\n")));
  EXPECT_THAT(out_.str(), HasSubstr("Total:     0 tensors, 0 weights, 0 bytes (0 B), 0.00 bits"));
}

TEST_F(InspectTest, GgufJsonIsOneCompleteObject) {
  const std::string path = WriteGguf();
  ASSERT_EQ(RunLocal({"inspect", path, "--json"}), kExitOk) << err_.str();
  ASSERT_EQ(Lines(out_.str()).size(), 1u) << "one object on one line";
  google::protobuf::Struct json = ParseJsonObject(out_.str());
  const auto& f = json.fields();
  EXPECT_EQ(f.at("file").string_value(), path);
  EXPECT_EQ(f.at("format").string_value(), "gguf");
  EXPECT_EQ(f.at("version").number_value(), 3);
  EXPECT_EQ(f.at("alignment").number_value(), 32);
  EXPECT_EQ(f.at("data_offset").number_value(), 544);
  EXPECT_EQ(f.at("file_bytes").number_value(), fs::file_size(path));
  EXPECT_EQ(f.at("tensor_count").number_value(), 2);
  EXPECT_EQ(f.at("total_elements").number_value(), 320);
  EXPECT_EQ(f.at("total_bytes").number_value(), 528);
  EXPECT_DOUBLE_EQ(f.at("bits_per_weight").number_value(), 13.2);

  const auto& metadata = f.at("metadata").struct_value().fields();
  ASSERT_EQ(metadata.size(), 7u);
  EXPECT_EQ(metadata.at("llama.context_length").struct_value().fields().at("type").string_value(),
            "UINT32");
  EXPECT_EQ(metadata.at("llama.context_length").struct_value().fields().at("value").number_value(),
            2048);
  EXPECT_TRUE(
      metadata.at("tokenizer.ggml.add_bos_token").struct_value().fields().at("value").bool_value());
  const auto& tokens = metadata.at("tokenizer.ggml.tokens").struct_value().fields();
  EXPECT_EQ(tokens.at("type").string_value(), "ARRAY");
  EXPECT_EQ(tokens.at("element_type").string_value(), "STRING");
  const auto& token_list = tokens.at("value").list_value().values();
  ASSERT_EQ(token_list.size(), 7) << "JSON arrays are complete, not summarised";
  EXPECT_EQ(token_list[2].string_value(), "\"q\"\n");
  EXPECT_EQ(token_list[5].string_value(), "🦙");
  EXPECT_EQ(token_list[6].string_value(), "\x01");
  EXPECT_EQ(metadata.at("general.empty").struct_value().fields().at("value").list_value()
                .values_size(),
            0);

  const auto& tensors = f.at("tensors").list_value().values();
  ASSERT_EQ(tensors.size(), 2);
  const auto& embedding = tensors[0].struct_value().fields();
  EXPECT_EQ(embedding.at("name").string_value(), "token_embd.weight");
  EXPECT_EQ(embedding.at("type").string_value(), "Q8_0");
  EXPECT_EQ(embedding.at("shape").list_value().values(0).number_value(), 4);   // [out, in]
  EXPECT_EQ(embedding.at("shape").list_value().values(1).number_value(), 64);
  EXPECT_EQ(embedding.at("ne").list_value().values(0).number_value(), 64);     // ggml order
  EXPECT_EQ(embedding.at("offset").number_value(), 0);
  EXPECT_EQ(embedding.at("bytes").number_value(), 272);
  EXPECT_EQ(tensors[1].struct_value().fields().at("offset").number_value(), 288);  // 272 padded
}

TEST_F(InspectTest, SafetensorsTextAndJson) {
  const std::string path = WriteSafetensors();
  ASSERT_EQ(RunLocal({"inspect", path}), kExitOk) << err_.str();
  EXPECT_EQ(WithoutDir(out_.str(), dir_),
            "File:      DIR/model.safetensors (968 B)\n"
            "Format:    safetensors, 192-byte JSON header\n"
            "Metadata:  1 key\n"
            "  format  \"pt\"\n"
            "Tensors:   2 tensors\n"
            "  NAME                       SHAPE    DTYPE  BYTES\n"
            "  model.embed_tokens.weight  [4, 64]  BF16   512\n"
            "  model.norm.weight          [64]     F32    256\n"
            "Total:     2 tensors, 320 weights, 768 bytes (768 B), 19.20 bits per weight\n");

  ASSERT_EQ(RunLocal({"inspect", path, "--json"}), kExitOk) << err_.str();
  google::protobuf::Struct json = ParseJsonObject(out_.str());
  const auto& f = json.fields();
  EXPECT_EQ(f.at("format").string_value(), "safetensors");
  EXPECT_EQ(f.at("file_bytes").number_value(), fs::file_size(path));
  EXPECT_EQ(f.at("metadata").struct_value().fields().at("format").string_value(), "pt");
  const auto& tensors = f.at("tensors").list_value().values();
  ASSERT_EQ(tensors.size(), 2);
  EXPECT_EQ(tensors[0].struct_value().fields().at("dtype").string_value(), "BF16");
  EXPECT_EQ(tensors[1].struct_value().fields().at("offset").number_value(), 512);
  EXPECT_EQ(f.at("total_bytes").number_value(), 768);
}

TEST_F(InspectTest, BadFilesAreLocalErrorsNamingTheFile) {
  // Missing.
  const std::string missing = (dir_ / "missing.gguf").string();
  EXPECT_EQ(RunLocal({"inspect", missing}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("compressctl: inspect: cannot open " + missing));
  EXPECT_EQ(out_.str(), "");

  // A folder.
  EXPECT_EQ(RunLocal({"inspect", dir_.string()}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr(dir_.string() + " is not a file"));

  // A GGUF cut short: the reader's message, one line.
  const std::string gguf = WriteGguf();
  const std::string cut = (dir_ / "cut.gguf").string();
  std::ofstream(cut, std::ios::binary) << ReadAll(gguf).substr(0, 300);
  EXPECT_EQ(RunLocal({"inspect", cut}), kExitUsage);
  EXPECT_THAT(err_.str(), AllOf(HasSubstr("compressctl: inspect: " + cut), HasSubstr("truncated")));
  EXPECT_EQ(Lines(err_.str()).size(), 1u);

  // A .gguf that is something else.
  const std::string not_gguf = (dir_ / "notes.gguf").string();
  std::ofstream(not_gguf) << "hello there";
  EXPECT_EQ(RunLocal({"inspect", not_gguf}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("not a GGUF file"));

  // Neither format, by content or by name.
  const std::string text = (dir_ / "notes.txt").string();
  std::ofstream(text) << "hello there, this is text";
  EXPECT_EQ(RunLocal({"inspect", text}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr(text + " is neither GGUF (no 'GGUF' magic) nor safetensors"));

  // A broken .safetensors: its own message.
  const std::string st = (dir_ / "broken.safetensors").string();
  std::ofstream(st, std::ios::binary) << ReadAll(WriteSafetensors()).substr(0, 100);
  EXPECT_EQ(RunLocal({"inspect", st}), kExitUsage);
  EXPECT_THAT(err_.str(), AllOf(HasSubstr(st), Not(HasSubstr("neither"))));
}

TEST_F(InspectTest, IsInTheHelpAndTakesOneFile) {
  EXPECT_THAT(HelpText(), HasSubstr("inspect"));
  EXPECT_THAT(HelpText("inspect"), HasSubstr("Usage: compressctl inspect FILE [OPTIONS]"));
  EXPECT_FALSE(ParseArgs({"inspect"}).ok());
  EXPECT_FALSE(ParseArgs({"inspect", "a.gguf", "--limit", "3"}).ok());
}

}  // namespace
}  // namespace compress::client
