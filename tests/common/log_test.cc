#include "common/log.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

namespace compress {
namespace {

using ::testing::ContainsRegex;
using ::testing::EndsWith;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

std::string Captured(const std::function<void()>& log) {
  ::testing::internal::CaptureStderr();
  log();
  return ::testing::internal::GetCapturedStderr();
}

TEST(LogTest, OneStructuredLinePerCall) {
  std::string line = Captured([] { LOG_INFO("job queued", {{"job", "j-1"}, {"tenant", "a b"}}); });
  EXPECT_THAT(line, StartsWith("ts="));
  EXPECT_THAT(line, ContainsRegex("^ts=[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z level=info "));
  EXPECT_THAT(line, HasSubstr(" msg=\"job queued\" job=j-1 tenant=\"a b\"\n"));
  EXPECT_THAT(line, EndsWith("\n"));
  EXPECT_EQ(std::count(line.begin(), line.end(), '\n'), 1);
}

TEST(LogTest, QuotesAndEscapesValuesThatNeedIt) {
  std::string line = Captured([] {
    LOG_ERROR(
        "say \"hi\"",
        {{"path", "C:\\x"}, {"text", "two\nlines"}, {"empty", ""}, {"eq", "a=b"}, {"tab", "a\tb"}});
  });
  EXPECT_THAT(line, HasSubstr("level=error"));
  EXPECT_THAT(line, HasSubstr("msg=\"say \\\"hi\\\"\""));
  EXPECT_THAT(line, HasSubstr("path=\"C:\\\\x\""));
  EXPECT_THAT(line, HasSubstr("text=\"two\\nlines\""));
  EXPECT_THAT(line, HasSubstr("empty=\"\""));
  EXPECT_THAT(line, HasSubstr("eq=\"a=b\""));
  EXPECT_THAT(line, HasSubstr("tab=\"a\\tb\""));
  EXPECT_EQ(std::count(line.begin(), line.end(), '\n'), 1);
}

TEST(LogTest, ComponentAppearsOnceSet) {
  SetLogComponent("worker");
  std::string line = Captured([] { LOG_WARN("slow"); });
  SetLogComponent("");
  EXPECT_THAT(line, HasSubstr("level=warning component=worker msg=slow\n"));
  EXPECT_THAT(Captured([] { LOG_WARN("slow"); }), Not(HasSubstr("component=")));
}

TEST(LogTest, JsonLinesAreOneObjectEachWithProcessAndCallFields) {
  SetLogFormat(LogFormat::kJson);
  SetLogComponent("worker");
  SetLogProcessField("worker", "gpu-7");
  const std::string line = Captured([] {
    LOG_ERROR("say \"hi\"\nagain", {{"job", "job-1"}, {"task", "job-1-t2-a1"}, {"bad", "\xff\xfe ok"}});
  });
  SetLogProcessField("worker", "");
  SetLogComponent("");
  const std::string plain = Captured([] { LOG_INFO("plain"); });
  SetLogFormat(LogFormat::kText);
  ASSERT_EQ(std::count(line.begin(), line.end(), '\n'), 1);
  const nlohmann::json object = nlohmann::json::parse(line);
  EXPECT_EQ(object["level"], "error");
  EXPECT_EQ(object["component"], "worker");
  EXPECT_EQ(object["msg"], "say \"hi\"\nagain");
  EXPECT_EQ(object["worker"], "gpu-7");
  EXPECT_EQ(object["job"], "job-1");
  EXPECT_EQ(object["task"], "job-1-t2-a1");
  EXPECT_EQ(object["bad"], "\xef\xbf\xbd\xef\xbf\xbd ok") << "invalid UTF-8 is replaced";
  EXPECT_THAT(object["ts"].get<std::string>(), ContainsRegex("^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z$"));
  // A removed process field and component are gone.
  const nlohmann::json second = nlohmann::json::parse(plain);
  EXPECT_FALSE(second.contains("worker"));
  EXPECT_FALSE(second.contains("component"));
}

TEST(LogTest, FormatsByName) {
  EXPECT_EQ(*ParseLogFormat("json"), LogFormat::kJson);
  EXPECT_EQ(*ParseLogFormat("text"), LogFormat::kText);
  EXPECT_TRUE(ParseLogFormat("auto").ok());
  EXPECT_EQ(ParseLogFormat("xml").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(LogTest, ConcurrentCallsDoNotInterleave) {
  std::string output = Captured([] {
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([t] {
        for (int i = 0; i < 100; ++i) LOG_INFO("tick", {{"thread", std::to_string(t)}});
      });
    }
    for (std::thread& thread : threads) thread.join();
  });
  int lines = 0;
  size_t start = 0;
  for (size_t end; (end = output.find('\n', start)) != std::string::npos; start = end + 1) {
    EXPECT_THAT(output.substr(start, end - start), ContainsRegex("^ts=.* msg=tick thread=[0-3]$"));
    ++lines;
  }
  EXPECT_EQ(lines, 400);
}

}  // namespace
}  // namespace compress
