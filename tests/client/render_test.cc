#include "client/render.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sstream>

namespace compress::client {
namespace {

using ::testing::HasSubstr;

TEST(RenderTest, FormatBytes) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(1023), "1023 B");
  EXPECT_EQ(FormatBytes(1024), "1.0 KiB");
  EXPECT_EQ(FormatBytes(int64_t{3} << 29), "1.5 GiB");
}

TEST(RenderTest, FormatDuration) {
  EXPECT_EQ(FormatShortDuration(absl::Seconds(7)), "7s");
  EXPECT_EQ(FormatShortDuration(absl::Seconds(185)), "3m05s");
  EXPECT_EQ(FormatShortDuration(absl::Seconds(3720)), "1h02m");
  EXPECT_EQ(FormatShortDuration(-absl::Seconds(3)), "0s");
}

TEST(RenderTest, FormatTimestamp) {
  google::protobuf::Timestamp unset;
  EXPECT_EQ(FormatTimestamp(unset), "-");
  google::protobuf::Timestamp time;
  time.set_seconds(1714564800);
  time.set_nanos(250000000);
  EXPECT_EQ(FormatTimestamp(time), "2024-05-01T12:00:00Z");
  EXPECT_EQ(FormatTimestamp(time, /*with_millis=*/true), "2024-05-01T12:00:00.250Z");
}

TEST(RenderTest, EtaFromTheRateOfProgress) {
  EtaEstimator eta;
  const absl::Time start = absl::FromUnixSeconds(1000);
  EXPECT_FALSE(eta.Remaining().has_value());
  eta.Update(0.1, start);
  EXPECT_FALSE(eta.Remaining().has_value());   // one point gives no rate
  eta.Update(0.4, start + absl::Seconds(30));  // 1% per second
  ASSERT_TRUE(eta.Remaining().has_value());
  EXPECT_EQ(absl::ToInt64Seconds(*eta.Remaining()), 60);
}

TEST(RenderTest, ProgressBarRedrawsInPlaceAndPrintsLinesAboveIt) {
  std::ostringstream out;
  {
    ProgressBar bar(out);
    bar.PrintLine("before");
    compress::v1::Progress progress;
    progress.set_fraction(0.1);
    progress.set_message("loading");
    bar.Update(progress, absl::FromUnixSeconds(0));
    bar.PrintLine("a log line");
  }
  EXPECT_EQ(out.str(),
            "before\n"
            "\r\x1b[K[###...........................]  10.0%  loading"
            "\r\x1b[Ka log line\n"
            "\r\x1b[K[###...........................]  10.0%  loading"
            "\n");
}

TEST(RenderTest, LogLines) {
  compress::v1::JobEvent event;
  event.mutable_time()->set_seconds(1714564800);
  EXPECT_FALSE(FormatLogLine(event).has_value());
  event.mutable_log()->set_level("WARNING");
  event.mutable_log()->set_text("slow");
  EXPECT_EQ(FormatLogLine(event), "2024-05-01T12:00:00.000Z WARNING slow");
  event.mutable_state()->set_state(compress::v1::CANCELLED);
  EXPECT_EQ(FormatLogLine(event), "2024-05-01T12:00:00.000Z INFO state CANCELLED");
  event.mutable_metric()->set_name("stage_seconds");
  EXPECT_FALSE(FormatLogLine(event).has_value());
}

TEST(RenderTest, JobTableAlignsColumns) {
  std::vector<compress::v1::Job> jobs(2);
  jobs[0].set_id("j-long-id");
  jobs[0].set_state(compress::v1::QUEUED);
  jobs[1].set_id("j-2");
  jobs[1].set_state(compress::v1::SUCCEEDED);
  jobs[1].set_progress(1);
  jobs[1].mutable_spec()->set_name("named");
  EXPECT_EQ(FormatJobTable(jobs),
            "ID         STATE      PROGRESS  CREATED  NAME\n"
            "j-long-id  QUEUED     0%        -\n"
            "j-2        SUCCEEDED  100%      -        named\n");
}

}  // namespace
}  // namespace compress::client
