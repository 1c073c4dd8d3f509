// Debian's real Prometheus scrapes a real compress-server and two real
// compress-workers on loopback while jobs run (some succeed, one fails, some
// queue). Then every panel query of every dashboard under
// deploy/grafana/dashboards goes to Prometheus's HTTP API, as Grafana would
// send it, and must return data; the dashboards' variables must list values;
// the alert rules must load and evaluate; and promtool's lint must pass on
// both kinds of /metrics page.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "common/recipe.h"
#include "compress/v1/compress.grpc.pb.h"
#include "tests/deploy/deploy_paths.h"
#include "tests/testing/job_calls.h"
#include "tests/testing/subprocess.h"
#include "tests/testing/temp_dir.h"

namespace compress {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::Subprocess;

// Scrapes every second; rate windows of ten seconds hold several samples
// even when the 2-core machine is loaded.
constexpr char kRateInterval[] = "10s";

std::string FindOnPath(const std::string& tool) {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path != nullptr ? path : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    fs::path candidate = fs::path(dir) / tool;
    if (!dir.empty() && access(candidate.c_str(), X_OK) == 0) return candidate.string();
  }
  return "";
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Seconds since the epoch as the API takes them (StrCat would print %g).
std::string Timestamp(double seconds) { return absl::StrFormat("%.3f", seconds); }

double UnixNow() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// A panel query as Grafana sends it: its variables replaced.
std::string Expand(std::string expr, const std::map<std::string, std::string>& values) {
  // Longest names first, so $__rate_interval is not read as $__rate...
  std::vector<std::pair<std::string, std::string>> replacements;
  for (const auto& [name, value] : values) {
    replacements.push_back({"${" + name + "}", value});
    replacements.push_back({"$" + name, value});
  }
  std::sort(replacements.begin(), replacements.end(),
            [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  for (const auto& [from, to] : replacements) expr = absl::StrReplaceAll(expr, {{from, to}});
  return expr;
}

bool IsFinite(const json& sample_value) {
  const std::string text = sample_value.get<std::string>();
  const double v = std::strtod(text.c_str(), nullptr);
  return text != "NaN" && std::isfinite(v);
}

// Series in a query result, and whether any sample in them is a number.
struct QueryResult {
  bool ok = false;
  std::string error;
  size_t series = 0;
  bool any_finite = false;
};

class PrometheusTest : public ::testing::Test {
 protected:
  void SetUp() override {
    prometheus_bin_ = FindOnPath("prometheus");
    promtool_bin_ = FindOnPath("promtool");
    if (prometheus_bin_.empty() || promtool_bin_.empty()) {
      GTEST_SKIP() << "Debian's prometheus package (prometheus, promtool) is not installed; "
                      "bash scripts/setup.sh installs it";
    }
  }

  void MakeModels() {
    std::string output;
    for (const char* name : {"llama", "broken"}) {
      ASSERT_EQ(testing::RunCommand({COMPRESS_WORKER_BIN, "make-random-model", "--out",
                                     dir_.Sub(std::string("models/") + name), "--layers", "2",
                                     "--hidden", "256", "--intermediate", "512", "--heads", "4",
                                     "--kv-heads", "2", "--vocab", "1024", "--dtype", "f32"},
                                    &output),
                0)
          << output;
    }
    // The trained fixture's tokenizer (1024 tokens) lets a job write GGUF.
    std::filesystem::copy_file(std::string(SOURCE_DIR) + "/tests/fixtures/kjv-llama/tokenizer.json",
                               dir_.Sub("models/llama/tokenizer.json"));
    // "broken": a valid header over weights that are all NaN (0xFF bytes), so
    // the job passes the server's checks and fails on a worker.
    const std::string file = dir_.Sub("models/broken/model.safetensors");
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    ASSERT_TRUE(f) << file;
    uint64_t header_size = 0;
    f.read(reinterpret_cast<char*>(&header_size), sizeof(header_size));
    const uint64_t file_size = fs::file_size(file);
    ASSERT_LT(8 + header_size, file_size);
    f.seekp(static_cast<std::streamoff>(8 + header_size));
    const std::string nan_bytes(file_size - 8 - header_size, '\xff');
    f.write(nan_bytes.data(), static_cast<std::streamsize>(nan_bytes.size()));
  }

  void StartService() {
    const int port = testing::PickFreePort();
    server_ = std::make_unique<Subprocess>(
        std::vector<std::string>{COMPRESS_SERVER_BIN, "--listen", absl::StrCat("127.0.0.1:", port),
                                 "--metrics-listen", "127.0.0.1:0", "--data-dir", dir_.Sub("data"),
                                 "--model-root", dir_.Sub("models"), "--lease-seconds", "3"},
        dir_.Sub("server.log"));
    ASSERT_GT(server_->WaitForNumber("grpc_port"), 0) << server_->Log();
    server_metrics_port_ = server_->WaitForNumber("metrics_port");
    ASSERT_GT(server_metrics_port_, 0) << server_->Log();
    jobs_ = v1::JobService::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
    for (const char* id : {"worker-a", "worker-b"}) {
      workers_.push_back(std::make_unique<Subprocess>(
          std::vector<std::string>{
              COMPRESS_WORKER_BIN, "--server", absl::StrCat("127.0.0.1:", port), "--worker-id", id,
              "--work-dir", dir_.Sub(std::string("work-") + id), "--poll-millis", "500",
              "--metrics-listen", "127.0.0.1:0", "--threads", "1"},
          dir_.Sub(std::string(id) + ".log")));
      const int metrics_port = workers_.back()->WaitForNumber("metrics_port");
      ASSERT_GT(metrics_port, 0) << workers_.back()->Log();
      worker_metrics_ports_.push_back(metrics_port);
    }
  }

  void StartPrometheus() {
    prometheus_port_ = testing::PickFreePort();
    std::ofstream config(dir_.Sub("prometheus.yml"));
    config << "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
           << "rule_files: ['" << testing::kDeployDir << "/prometheus/rules/compress-alerts.yml']\n"
           << "scrape_configs:\n"
           << "  - job_name: compress-server\n"
           << "    static_configs: [{targets: ['127.0.0.1:" << server_metrics_port_ << "']}]\n"
           << "  - job_name: compress-worker\n"
           << "    static_configs: [{targets: ['127.0.0.1:" << worker_metrics_ports_[0]
           << "', '127.0.0.1:" << worker_metrics_ports_[1] << "']}]\n";
    config.close();
    prometheus_ = std::make_unique<Subprocess>(
        std::vector<std::string>{prometheus_bin_, "--config.file=" + dir_.Sub("prometheus.yml"),
                                 "--storage.tsdb.path=" + dir_.Sub("tsdb"),
                                 absl::StrCat("--web.listen-address=127.0.0.1:", prometheus_port_),
                                 "--log.level=warn"},
        dir_.Sub("prometheus.log"));
    // Ready, then scraping all three (its discovery hands targets over only
    // every 5 s, so the first scrapes come a while after it is ready).
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < deadline) {
      ASSERT_TRUE(prometheus_->Running()) << prometheus_->Log();
      httplib::Client http("127.0.0.1", prometheus_port_);
      auto ready = http.Get("/-/ready");
      if (ready && ready->status == 200) {
        json up = Api("/api/v1/query", {{"query", "count(up == 1)"}}, /*post=*/true);
        if (up.value("status", "") == "success" && !up["data"]["result"].empty() &&
            up["data"]["result"][0]["value"][1] == "3") {
          return;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    FAIL() << "prometheus did not scrape the three processes\n" << prometheus_->Log();
  }

  std::string Submit(const std::string& recipe) {
    return testing::SubmitRecipe(jobs_.get(), recipe);
  }

  v1::Job WaitForEnd(const std::string& id) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    v1::Job job;
    while (std::chrono::steady_clock::now() < deadline) {
      grpc::ClientContext context;
      v1::GetJobRequest request;
      request.set_job_id(id);
      if (jobs_->GetJob(&context, request, &job).ok() && job.state() >= v1::SUCCEEDED) return job;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    ADD_FAILURE() << "job " << id << " did not end\n" << server_->Log();
    return job;
  }

  // Queries go as POST forms (long expressions), the rest as GET.
  json Api(const std::string& path, const httplib::Params& params, bool post = false) {
    httplib::Client http("127.0.0.1", prometheus_port_);
    http.set_read_timeout(30, 0);
    auto response = post ? http.Post(path.c_str(), params) : http.Get(path.c_str(), params, {});
    if (!response) return json{{"status", "error"}, {"error", "no answer from prometheus"}};
    try {
      return json::parse(response->body);
    } catch (const json::exception& e) {
      return json{{"status", "error"}, {"error", response->body}};
    }
  }

  QueryResult Query(const std::string& expr, bool instant) {
    json answer = instant ? Api("/api/v1/query", {{"query", expr}, {"time", Timestamp(end_)}},
                                /*post=*/true)
                          : Api("/api/v1/query_range",
                                {{"query", expr},
                                 {"start", Timestamp(start_)},
                                 {"end", Timestamp(end_)},
                                 {"step", "1"}},
                                /*post=*/true);
    QueryResult result;
    result.ok = answer.value("status", "") == "success";
    if (!result.ok) {
      result.error = answer.dump();
      return result;
    }
    const json& data = answer.at("data");
    const std::string type = data.at("resultType");
    if (type == "scalar") {
      result.series = 1;
      result.any_finite = IsFinite(data.at("result").at(1));
      return result;
    }
    for (const json& series : data.at("result")) {
      ++result.series;
      if (series.contains("value")) result.any_finite |= IsFinite(series.at("value").at(1));
      for (const json& point : series.value("values", json::array())) {
        result.any_finite |= IsFinite(point.at(1));
      }
    }
    return result;
  }

  std::string MetricsPage(int port) {
    httplib::Client http("127.0.0.1", port);
    auto page = http.Get("/metrics");
    return page && page->status == 200 ? page->body : "";
  }

  testing::TempDir dir_{"prometheus"};
  std::string prometheus_bin_, promtool_bin_;
  std::unique_ptr<Subprocess> server_;
  std::vector<std::unique_ptr<Subprocess>> workers_;
  std::unique_ptr<Subprocess> prometheus_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
  int server_metrics_port_ = 0;
  std::vector<int> worker_metrics_ports_;
  int prometheus_port_ = 0;
  double start_ = 0, end_ = 0;
};

bool UsesPendingMetric(const std::string& expr) {
  for (const std::string& name : testing::kMetricsNotYetExported) {
    if (std::regex_search(expr, std::regex("\\b" + name + "\\b"))) return true;
  }
  return false;
}

TEST_F(PrometheusTest, EveryDashboardPanelReturnsDataWhileJobsRun) {
  ASSERT_NO_FATAL_FAILURE(MakeModels());
  ASSERT_NO_FATAL_FAILURE(StartService());
  ASSERT_NO_FATAL_FAILURE(StartPrometheus());
  start_ = UnixNow();

  // Six jobs for two workers: some wait in the queue, two write artifacts,
  // one fails (NaN weights) after its retries.
  std::vector<std::string> ids;
  const std::string rtn =
      "model: {path: llama}\nstages: [{rtn: {bits: 4, group_size: 128}}]\n"
      "outputs: [dequantized_safetensors, packed_safetensors]\n";
  const std::string sleep = "model: {path: llama}\nstages: [{sleep: {millis_per_tensor: 120}}]\n";
  const std::string rtn_gguf =
      "model: {path: llama}\nstages: [{rtn: {bits: 4, group_size: 128}}]\n"
      "outputs: [gguf]\ngguf: [{preset: Q8_0}]\n";
  for (const std::string& recipe : {sleep, sleep, rtn, sleep, rtn_gguf}) {
    ids.push_back(Submit(recipe));
  }
  const std::string broken = Submit("model: {path: broken}\nstages: [{rtn: {bits: 4}}]\n");
  std::string succeeded_rtn;
  for (const std::string& id : ids) {
    v1::Job job = WaitForEnd(id);
    EXPECT_EQ(job.state(), v1::SUCCEEDED) << id << ": " << job.message();
    if (job.spec().stages(0).has_rtn() && succeeded_rtn.empty()) succeeded_rtn = id;
  }
  v1::Job failed = WaitForEnd(broken);
  EXPECT_EQ(failed.state(), v1::FAILED) << failed.message();
  ASSERT_FALSE(succeeded_rtn.empty());
  // A few more scrapes and rule evaluations after the last job ended.
  std::this_thread::sleep_for(std::chrono::seconds(4));
  end_ = UnixNow();

  // Prometheus scraped all three processes.
  json targets = Api("/api/v1/targets", {});
  ASSERT_EQ(targets.value("status", ""), "success") << targets.dump();
  int up = 0;
  for (const json& target : targets.at("data").at("activeTargets")) {
    EXPECT_EQ(target.at("health"), "up") << target.dump();
    up += target.at("health") == "up";
  }
  ASSERT_EQ(up, 3) << targets.dump();

  const std::map<std::string, std::string> variables = {
      {"__rate_interval", kRateInterval},
      {"__interval", "1s"},
      {"__range", absl::StrCat(static_cast<int>(end_ - start_) + 10, "s")},
      {"instance", ".*"},
      {"job_id", succeeded_rtn},
  };

  int checked = 0, pending = 0;
  for (const auto& entry : fs::directory_iterator(testing::kDeployDir + "/grafana/dashboards")) {
    const json dashboard = json::parse(ReadText(entry.path().string()));
    const std::string uid = dashboard.at("uid");
    // Variables: label_values(metric, label) must offer values (and the job).
    for (const json& variable : dashboard.at("templating").at("list")) {
      if (variable.at("type") != "query") continue;
      std::smatch m;
      const std::string query = variable.at("query").at("query");
      ASSERT_TRUE(std::regex_match(query, m,
                                   std::regex(R"(label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\))")))
          << query;
      json answer =
          Api("/api/v1/label/" + m[2].str() + "/values",
              {{"match[]", m[1].str()}, {"start", Timestamp(start_)}, {"end", Timestamp(end_)}});
      ASSERT_EQ(answer.value("status", ""), "success") << answer.dump();
      std::set<std::string> values = answer.at("data").get<std::set<std::string>>();
      EXPECT_FALSE(values.empty()) << uid << ": variable " << variable.at("name");
      if (variable.at("name") == "job_id") EXPECT_EQ(values.count(succeeded_rtn), 1u);
    }
    for (const json& panel : dashboard.at("panels")) {
      if (panel.at("type") == "row") continue;
      for (const json& target : panel.at("targets")) {
        const std::string raw = target.at("expr");
        const std::string expr = Expand(raw, variables);
        SCOPED_TRACE(absl::StrCat(uid, " / ", panel.at("title").get<std::string>(), " [",
                                  target.at("refId").get<std::string>(), "]: ", expr));
        const QueryResult result = Query(expr, target.value("instant", false));
        ASSERT_TRUE(result.ok) << result.error;
        if (UsesPendingMetric(raw)) {
          ++pending;
          EXPECT_EQ(result.series, 0u)
              << "this panel's metric is exported now: remove it from kMetricsNotYetExported "
                 "(tests/deploy/deploy_paths.h) so the panel is checked";
          continue;
        }
        ++checked;
        EXPECT_GT(result.series, 0u) << "no series";
        EXPECT_TRUE(result.any_finite) << result.series << " series, but no sample is a number";
      }
    }
  }
  EXPECT_GE(checked, 30);
  EXPECT_EQ(pending, static_cast<int>(testing::kMetricsNotYetExported.size()));

  // Stage durations carry what the stage did and how.
  for (const std::string stage : {"quantize\",method=\"rtn", "export\",method=\"gguf"}) {
    const QueryResult result =
        Query("compress_worker_stage_seconds_count{stage=\"" + stage + "\"}", /*instant=*/true);
    ASSERT_TRUE(result.ok) << result.error;
    EXPECT_GT(result.series, 0u) << stage;
  }

  // The alert rules loaded and were evaluated without errors; with two
  // workers connected, CompressNoWorkersConnected is quiet.
  json rules = Api("/api/v1/rules", {});
  ASSERT_EQ(rules.value("status", ""), "success") << rules.dump();
  int evaluated = 0;
  for (const json& group : rules.at("data").at("groups")) {
    for (const json& rule : group.at("rules")) {
      SCOPED_TRACE(rule.at("name").get<std::string>());
      EXPECT_EQ(rule.at("health"), "ok") << rule.dump();
      if (rule.at("name") == "CompressNoWorkersConnected") EXPECT_EQ(rule.at("state"), "inactive");
      ++evaluated;
    }
  }
  EXPECT_EQ(evaluated, 6);

  // promtool's lint on the server's and a worker's /metrics pages.
  for (const auto& [who, port] : std::vector<std::pair<std::string, int>>{
           {"server", server_metrics_port_}, {"worker", worker_metrics_ports_[0]}}) {
    const std::string page = MetricsPage(port);
    ASSERT_FALSE(page.empty()) << who;
    const std::string path = dir_.Sub(who + ".metrics");
    std::ofstream(path) << page;
    std::string output;
    EXPECT_EQ(
        testing::RunCommand({"/bin/sh", "-c", promtool_bin_ + " check metrics < " + path}, &output),
        0)
        << who << ": " << output << "\n"
        << page;
  }
}

}  // namespace
}  // namespace compress
