#include "common/metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "tests/testing/temp_dir.h"

namespace compress::metrics {
namespace {

using ::testing::HasSubstr;

TEST(MetricsTest, SerializesASmallRegistryExactly) {
  Registry registry;
  auto& requests =
      BuildCounter().Name("compress_requests_total").Help("Requests by method.").Register(registry);
  requests.Add({{"method", "SubmitJob"}}).Increment();
  requests.Add({{"method", "GetJob"}}).Increment(2);
  auto& queued = BuildGauge().Name("compress_jobs_queued").Help("Jobs waiting.").Register(registry);
  queued.Add({}).Set(3);
  auto& latency =
      BuildHistogram().Name("compress_rpc_seconds").Help("RPC latency.").Register(registry);
  Histogram& get_latency =
      latency.Add({{"method", "GetJob"}, {"code", "OK"}}, Histogram::BucketBoundaries{0.25, 1});
  get_latency.Observe(0.25);  // le is inclusive: this lands in the 0.25 bucket
  get_latency.Observe(0.5);
  get_latency.Observe(4);

  // Families sorted by name, label sets sorted, buckets cumulative with +Inf.
  EXPECT_EQ(registry.Serialize(),
            "# HELP compress_jobs_queued Jobs waiting.\n"
            "# TYPE compress_jobs_queued gauge\n"
            "compress_jobs_queued 3\n"
            "# HELP compress_requests_total Requests by method.\n"
            "# TYPE compress_requests_total counter\n"
            "compress_requests_total{method=\"GetJob\"} 2\n"
            "compress_requests_total{method=\"SubmitJob\"} 1\n"
            "# HELP compress_rpc_seconds RPC latency.\n"
            "# TYPE compress_rpc_seconds histogram\n"
            "compress_rpc_seconds_bucket{code=\"OK\",method=\"GetJob\",le=\"0.25\"} 1\n"
            "compress_rpc_seconds_bucket{code=\"OK\",method=\"GetJob\",le=\"1\"} 2\n"
            "compress_rpc_seconds_bucket{code=\"OK\",method=\"GetJob\",le=\"+Inf\"} 3\n"
            "compress_rpc_seconds_sum{code=\"OK\",method=\"GetJob\"} 4.75\n"
            "compress_rpc_seconds_count{code=\"OK\",method=\"GetJob\"} 3\n");
}

TEST(MetricsTest, EscapesLabelValuesAndHelp) {
  EXPECT_EQ(EscapeLabelValue("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
  Registry registry;
  auto& family = BuildGauge()
                     .Name("compress_escaped")
                     .Help("Help with \\ backslash,\nnewline and \"quotes\".")
                     .Register(registry);
  family.Add({{"path", "C:\\models\\\"x\"\n"}}).Set(1);
  EXPECT_EQ(registry.Serialize(),
            "# HELP compress_escaped Help with \\\\ backslash,\\nnewline and \"quotes\".\n"
            "# TYPE compress_escaped gauge\n"
            "compress_escaped{path=\"C:\\\\models\\\\\\\"x\\\"\\n\"} 1\n");
}

TEST(MetricsTest, FormatsValuesTheWayPrometheusReadsThem) {
  Registry registry;
  auto& family = BuildGauge().Name("v").Help("Values.").Register(registry);
  family.Add({{"k", "a_tenth"}}).Set(0.1);
  family.Add({{"k", "big"}}).Set(1e20);
  family.Add({{"k", "int"}}).Set(-42);
  family.Add({{"k", "nan"}}).Set(std::numeric_limits<double>::quiet_NaN());
  family.Add({{"k", "ninf"}}).Set(-std::numeric_limits<double>::infinity());
  family.Add({{"k", "third"}}).Set(1.0 / 3);
  EXPECT_EQ(registry.Serialize(),
            "# HELP v Values.\n"
            "# TYPE v gauge\n"
            "v{k=\"a_tenth\"} 0.1\n"
            "v{k=\"big\"} 1e+20\n"
            "v{k=\"int\"} -42\n"
            "v{k=\"nan\"} NaN\n"
            "v{k=\"ninf\"} -Inf\n"
            "v{k=\"third\"} 0.3333333333333333\n");
}

TEST(MetricsTest, HistogramBucketsAreCumulative) {
  Histogram histogram({1, 2, 4});
  for (double v : {0.5, 1.0, 1.5, 3.0, 3.5, 100.0}) histogram.Observe(v);
  EXPECT_EQ(histogram.CumulativeCounts(), (std::vector<uint64_t>{2, 3, 5, 6}));
  EXPECT_EQ(histogram.Count(), 6u);
  EXPECT_DOUBLE_EQ(histogram.Sum(), 109.5);
}

TEST(MetricsTest, HistogramSortsBoundariesAndDropsAnExplicitInf) {
  Histogram histogram({2, 1, 2, std::numeric_limits<double>::infinity()});
  EXPECT_EQ(histogram.boundaries(), (Histogram::BucketBoundaries{1, 2}));
  EXPECT_EQ(histogram.CumulativeCounts().size(), 3u);
}

TEST(MetricsTest, DefaultLatencyBucketsAscendFromAMillisecondToAMinute) {
  Histogram::BucketBoundaries buckets = DefaultLatencyBuckets();
  ASSERT_FALSE(buckets.empty());
  EXPECT_DOUBLE_EQ(buckets.front(), 0.001);
  EXPECT_DOUBLE_EQ(buckets.back(), 60);
  EXPECT_TRUE(std::is_sorted(buckets.begin(), buckets.end()));
}

TEST(MetricsTest, CounterIgnoresNegativeIncrementsAndGaugeMovesBothWays) {
  Counter counter;
  counter.Increment(2);
  counter.Increment(-5);
  EXPECT_DOUBLE_EQ(counter.Value(), 2);
  Gauge gauge;
  gauge.Set(10);
  gauge.Increment(2.5);
  gauge.Decrement(4);
  EXPECT_DOUBLE_EQ(gauge.Value(), 8.5);
}

TEST(MetricsTest, AddReturnsTheSameMetricForTheSameLabels) {
  Registry registry;
  auto& family = BuildCounter().Name("c_total").Help("C.").Register(registry);
  Counter& first = family.Add({{"a", "1"}, {"b", "2"}});
  Counter& again = family.Add({{"b", "2"}, {"a", "1"}});
  EXPECT_EQ(&first, &again);
  EXPECT_NE(&first, &family.Add({{"a", "1"}}));
}

TEST(MetricsTest, RegisteringANameTwiceReturnsTheSameFamily) {
  Registry registry;
  auto& first = BuildCounter().Name("c_total").Help("C.").Register(registry);
  auto& again = BuildCounter().Name("c_total").Help("Other help.").Register(registry);
  EXPECT_EQ(&first, &again);
}

TEST(MetricsDeathTest, RegisteringANameWithAnotherTypeAborts) {
  Registry registry;
  BuildCounter().Name("x_total").Help("X.").Register(registry);
  EXPECT_DEATH(BuildGauge().Name("x_total").Help("X.").Register(registry),
               "registered twice with different types");
}

TEST(MetricsDeathTest, InvalidNamesAbort) {
  Registry registry;
  EXPECT_DEATH(BuildCounter().Name("bad-name").Help("X.").Register(registry),
               "invalid metric name");
  auto& family = BuildCounter().Name("ok_total").Help("X.").Register(registry);
  EXPECT_DEATH(family.Add({{"bad label", "v"}}), "invalid label name");
  auto& histogram = BuildHistogram().Name("h_seconds").Help("H.").Register(registry);
  EXPECT_DEATH(histogram.Add({{"le", "1"}}, DefaultLatencyBuckets()), "reserved");
}

TEST(MetricsTest, FamiliesWithoutLabelSetsAreLeftOut) {
  Registry registry;
  BuildCounter().Name("unused_total").Help("Never added.").Register(registry);
  EXPECT_EQ(registry.Serialize(), "");
}

TEST(MetricsTest, CollectHooksRunBeforeEverySerialize) {
  Registry registry;
  Gauge& workers = BuildGauge().Name("workers").Help("Workers.").Register(registry).Add({});
  int calls = 0;
  registry.AddCollectHook([&] { workers.Set(++calls * 10); });
  EXPECT_THAT(registry.Serialize(), HasSubstr("workers 10\n"));
  EXPECT_THAT(registry.Serialize(), HasSubstr("workers 20\n"));
}

TEST(MetricsTest, ConcurrentUpdatesAreNotLost) {
  Registry registry;
  auto& counters = BuildCounter().Name("hits_total").Help("Hits.").Register(registry);
  auto& histograms = BuildHistogram().Name("lat_seconds").Help("Lat.").Register(registry);
  constexpr int kThreads = 4;
  constexpr int kPerThread = 5000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kPerThread; ++i) {
        counters.Add({{"shard", std::to_string(i % 3)}}).Increment();
        histograms.Add({}, DefaultLatencyBuckets()).Observe(0.01);
        if (i % 1000 == 0) registry.Serialize();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  double total = 0;
  for (int shard = 0; shard < 3; ++shard) {
    total += counters.Add({{"shard", std::to_string(shard)}}).Value();
  }
  EXPECT_DOUBLE_EQ(total, kThreads * kPerThread);
  EXPECT_EQ(histograms.Add({}, DefaultLatencyBuckets()).Count(),
            static_cast<uint64_t>(kThreads * kPerThread));
}

// promtool (Debian package "prometheus") is the reference parser and linter.
TEST(MetricsTest, PromtoolAcceptsTheOutput) {
  const char* kPromtool = "/usr/bin/promtool";
  if (!std::filesystem::exists(kPromtool)) {
    GTEST_SKIP() << kPromtool << " is not installed (apt-get install prometheus)";
  }
  Registry registry;
  auto& jobs = BuildCounter()
                   .Name("compress_jobs_submitted_total")
                   .Help("Jobs accepted by SubmitJob.")
                   .Register(registry);
  jobs.Add({{"tenant", "default"}}).Increment(3);
  jobs.Add({{"tenant", "we\"ird\\\nname"}}).Increment();
  BuildGauge()
      .Name("compress_workers")
      .Help("Connected workers.")
      .Register(registry)
      .Add({})
      .Set(2);
  auto& latency = BuildHistogram()
                      .Name("compress_rpc_duration_seconds")
                      .Help("RPC latency in seconds.")
                      .Register(registry);
  Histogram& submit = latency.Add({{"method", "SubmitJob"}}, DefaultLatencyBuckets());
  for (double v : {0.0005, 0.02, 0.3, 7.0, 120.0}) submit.Observe(v);

  compress::testing::TempDir dir("promtool");
  const std::string path = dir.Sub("metrics.txt");
  std::ofstream(path) << registry.Serialize();
  const std::string command = std::string(kPromtool) + " check metrics < " + path + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buffer[512];
  while (size_t n = std::fread(buffer, 1, sizeof(buffer), pipe)) output.append(buffer, n);
  int status = ::pclose(pipe);
  EXPECT_EQ(status, 0) << output;
}

}  // namespace
}  // namespace compress::metrics
