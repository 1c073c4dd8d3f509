#include "common/http_server.h"

#include <gtest/gtest.h>
#include <httplib.h>

#include <string>

#include "common/metrics.h"

namespace compress {
namespace {

class HttpServerTest : public ::testing::Test {
 protected:
  // A started server on a free loopback port, and a client for it.
  httplib::Client& Serve() {
    absl::StatusOr<int> port = server_.Start("127.0.0.1:0");
    EXPECT_TRUE(port.ok()) << port.status();
    EXPECT_GT(port.value_or(0), 0);
    client_ = std::make_unique<httplib::Client>("127.0.0.1", port.value_or(0));
    return *client_;
  }

  metrics::Registry registry_;
  HttpServer server_;
  std::unique_ptr<httplib::Client> client_;
};

TEST_F(HttpServerTest, ServesMetricsWithThePrometheusContentType) {
  auto& jobs = metrics::BuildCounter()
                   .Name("compress_jobs_submitted_total")
                   .Help("Jobs.")
                   .Register(registry_);
  jobs.Add({{"tenant", "default"}}).Increment(7);
  server_.HandleMetrics(registry_);
  httplib::Result result = Serve().Get("/metrics");
  ASSERT_TRUE(result) << httplib::to_string(result.error());
  EXPECT_EQ(result->status, 200);
  EXPECT_EQ(result->get_header_value("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_EQ(result->body, registry_.Serialize());
  EXPECT_NE(result->body.find("compress_jobs_submitted_total{tenant=\"default\"} 7\n"),
            std::string::npos);
}

TEST_F(HttpServerTest, AnswersHealthzAndUnknownPaths) {
  httplib::Client& client = Serve();
  httplib::Result health = client.Get("/healthz");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  EXPECT_EQ(health->body, "ok\n");
  httplib::Result missing = client.Get("/nope");
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
}

TEST_F(HttpServerTest, ServesCustomHandlers) {
  server_.Handle("/v1/state.json", [] {
    HttpResponse response;
    response.status = 503;
    response.content_type = "application/json";
    response.body = "{\"ready\":false}";
    return response;
  });
  httplib::Client& client = Serve();
  httplib::Result result = client.Get("/v1/state.json");
  ASSERT_TRUE(result);
  EXPECT_EQ(result->status, 503);
  EXPECT_EQ(result->get_header_value("Content-Type"), "application/json");
  EXPECT_EQ(result->body, "{\"ready\":false}");
  // The path is matched exactly, not as a regular expression.
  httplib::Result other = client.Get("/v1/stateXjson");
  ASSERT_TRUE(other);
  EXPECT_EQ(other->status, 404);
}

TEST_F(HttpServerTest, StopsPromptlyAndRefusesConnectionsAfterwards) {
  httplib::Client& client = Serve();
  ASSERT_TRUE(client.Get("/healthz"));
  server_.Stop();
  client.set_connection_timeout(1, 0);
  EXPECT_FALSE(client.Get("/healthz"));
  server_.Stop();  // idempotent
}

TEST(HttpServerStartTest, StopRightAfterStartDoesNotHang) {
  for (int i = 0; i < 5; ++i) {
    HttpServer server;
    ASSERT_TRUE(server.Start("127.0.0.1:0").ok());
    server.Stop();
  }
}

TEST(HttpServerStartTest, RejectsBadAddressesAndBusyPorts) {
  HttpServer server;
  EXPECT_EQ(server.Start("no-port").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(server.Start("127.0.0.1:99999").status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<int> port = server.Start("127.0.0.1:0");
  ASSERT_TRUE(port.ok());
  EXPECT_EQ(server.Start("127.0.0.1:0").status().code(), absl::StatusCode::kFailedPrecondition);

  HttpServer second;
  EXPECT_EQ(second.Start("127.0.0.1:" + std::to_string(*port)).status().code(),
            absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace compress
