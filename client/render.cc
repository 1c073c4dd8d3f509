#include "client/render.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace compress::client {
namespace {

namespace v1 = compress::v1;

constexpr int kBarWidth = 30;
constexpr size_t kMaxBarLineChars = 110;  // stays on one line of a wide terminal
constexpr char kEraseLine[] = "\r\x1b[K";

absl::Time ToAbslTime(const google::protobuf::Timestamp& time) {
  return absl::FromUnixSeconds(time.seconds()) + absl::Nanoseconds(time.nanos());
}

bool IsSet(const google::protobuf::Timestamp& time) {
  return time.seconds() != 0 || time.nanos() != 0;
}

std::string Field(absl::string_view name, absl::string_view value) {
  return absl::StrFormat("%-10s %s\n", absl::StrCat(name, ":"), value);
}

std::string SizeChange(int64_t before, int64_t after) {
  std::string text = absl::StrCat(FormatBytes(before), " -> ", FormatBytes(after));
  if (after > 0) absl::StrAppend(&text, absl::StrFormat(" (%.2fx smaller)", 1.0 * before / after));
  return text;
}

std::string FormatReport(const v1::JobReport& report) {
  std::string text = "Report:\n";
  absl::StrAppend(
      &text, absl::StrFormat("  %-17s %s\n", "Size:",
                             SizeChange(report.size_before_bytes(), report.size_after_bytes())));
  absl::StrAppend(&text,
                  absl::StrFormat("  %-17s %.2f\n", "Bits per weight:", report.bits_per_weight()));
  absl::StrAppend(&text, absl::StrFormat("  %-17s %d (%d quantized)\n", "Parameters:",
                                         report.parameters(), report.quantized_parameters()));
  absl::StrAppend(&text, absl::StrFormat("  %-17s %.1f s\n", "Time:", report.seconds()));
  for (const v1::StageReport& stage : report.stages()) {
    if (stage.method() == "evaluate") {
      absl::StrAppend(&text, absl::StrFormat("  Stage %s (evaluate): %.1f s\n", stage.name(),
                                             stage.seconds()));
      continue;
    }
    absl::StrAppend(
        &text, absl::StrFormat("  Stage %s (%s): %.1f s, %s, mean relative error %.4g",
                               stage.name().empty() ? "-" : stage.name(), stage.method(),
                               stage.seconds(), SizeChange(stage.bytes_in(), stage.bytes_out()),
                               stage.mean_relative_error()));
    if (stage.mean_output_error() > 0) {
      absl::StrAppend(&text, absl::StrFormat(", output error %.4g", stage.mean_output_error()));
    }
    absl::StrAppend(&text, "\n");
  }
  if (report.has_evaluation()) {
    const v1::EvaluationReport& e = report.evaluation();
    absl::StrAppend(&text, absl::StrFormat("Evaluation on %s (%d tokens, windows of %d, stride %d):\n",
                                           e.text_path(), e.before().tokens_scored(),
                                           e.context_length(), e.stride()));
    absl::StrAppend(&text, absl::StrFormat("  %-17s %.3f -> %.3f (%+.2f%%)\n", "Perplexity:",
                                           e.before().perplexity(), e.after().perplexity(),
                                           e.before().perplexity() > 0
                                               ? 100.0 * (e.after().perplexity() /
                                                              e.before().perplexity() -
                                                          1.0)
                                               : 0.0));
    absl::StrAppend(&text, absl::StrFormat("  %-17s mean %.4f, max %.4f nats\n", "KL divergence:",
                                           e.mean_kl_divergence(), e.max_kl_divergence()));
    absl::StrAppend(&text, absl::StrFormat("  %-17s %.2f%%\n", "Top-1 agreement:",
                                           100.0 * e.top1_agreement()));
    if (!e.sample_prompt().empty()) {
      absl::StrAppend(&text, "  Sample before:    ", e.sample_prompt(), e.before().sample(), "\n");
      absl::StrAppend(&text, "  Sample after:     ", e.sample_prompt(), e.after().sample(), "\n");
    }
  }
  return text;
}

}  // namespace

std::string FormatBytes(int64_t bytes) {
  static const char* const kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  double value = static_cast<double>(bytes);
  int unit = -1;
  while (value >= 1024 && unit < 4) {
    value /= 1024;
    ++unit;
  }
  return absl::StrFormat("%.1f %s", value, kUnits[unit]);
}

std::string FormatShortDuration(absl::Duration d) {
  int64_t seconds = absl::ToInt64Seconds(d);
  if (seconds < 0) seconds = 0;
  if (seconds >= 3600) return absl::StrFormat("%dh%02dm", seconds / 3600, seconds % 3600 / 60);
  if (seconds >= 60) return absl::StrFormat("%dm%02ds", seconds / 60, seconds % 60);
  return absl::StrFormat("%ds", seconds);
}

std::string FormatTimestamp(const google::protobuf::Timestamp& time, bool with_millis) {
  if (!IsSet(time)) return "-";
  return absl::FormatTime(with_millis ? "%Y-%m-%dT%H:%M:%E3SZ" : "%Y-%m-%dT%H:%M:%SZ",
                          ToAbslTime(time), absl::UTCTimeZone());
}

std::string StateName(v1::JobState state) {
  if (state == v1::JOB_STATE_UNSPECIFIED) return "UNKNOWN";
  const std::string& name = v1::JobState_Name(state);
  return name.empty() ? absl::StrCat("STATE_", static_cast<int>(state)) : name;
}

bool IsTerminalState(v1::JobState state) {
  return state == v1::SUCCEEDED || state == v1::FAILED || state == v1::CANCELLED;
}

std::string FormatJobSummary(const v1::Job& job) {
  std::string text = Field("Job", job.id());
  if (!job.spec().name().empty()) absl::StrAppend(&text, Field("Name", job.spec().name()));
  absl::StrAppend(&text, Field("State", absl::StrFormat("%s (%.1f%%)", StateName(job.state()),
                                                        job.progress() * 100)));
  if (!job.message().empty()) absl::StrAppend(&text, Field("Message", job.message()));
  absl::StrAppend(
      &text, Field("Model", job.spec().model().path().empty() ? "-" : job.spec().model().path()));
  if (!job.spec().labels().empty()) {
    // protobuf maps have no order; sorted keeps the output stable.
    std::map<std::string, std::string> labels(job.spec().labels().begin(),
                                              job.spec().labels().end());
    absl::StrAppend(&text, Field("Labels", absl::StrJoin(labels, ", ", absl::PairFormatter("="))));
  }
  absl::StrAppend(&text, Field("Worker", job.worker_id().empty() ? "-" : job.worker_id()));
  absl::StrAppend(&text, Field("Attempts", absl::StrCat(job.attempts())));
  absl::StrAppend(&text, Field("Created", FormatTimestamp(job.create_time())));
  absl::StrAppend(&text, Field("Started", FormatTimestamp(job.start_time())));
  absl::StrAppend(&text, Field("Ended", FormatTimestamp(job.end_time())));
  if (job.has_report()) absl::StrAppend(&text, FormatReport(job.report()));
  if (!job.artifacts().empty()) {
    absl::StrAppend(&text, "Artifacts:\n");
    size_t name_width = 0;
    for (const v1::Artifact& artifact : job.artifacts()) {
      name_width = std::max(name_width, artifact.name().size());
    }
    for (const v1::Artifact& artifact : job.artifacts()) {
      absl::StrAppend(&text,
                      absl::StrFormat("  %-*s  %10s  sha256 %s\n", name_width, artifact.name(),
                                      FormatBytes(artifact.size_bytes()), artifact.sha256()));
    }
  }
  return text;
}

std::string FormatJobTable(const std::vector<v1::Job>& jobs) {
  std::vector<std::vector<std::string>> rows = {{"ID", "STATE", "PROGRESS", "CREATED", "NAME"}};
  for (const v1::Job& job : jobs) {
    rows.push_back({job.id(), StateName(job.state()),
                    absl::StrFormat("%.0f%%", job.progress() * 100),
                    FormatTimestamp(job.create_time()), job.spec().name()});
  }
  std::vector<size_t> widths(rows[0].size(), 0);
  for (const auto& row : rows) {
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  std::string text;
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      if (i + 1 == row.size()) {
        absl::StrAppend(&line, row[i]);  // no padding after the last column
      } else {
        absl::StrAppend(&line, absl::StrFormat("%-*s  ", widths[i], row[i]));
      }
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    absl::StrAppend(&text, line, "\n");
  }
  return text;
}

std::optional<std::string> FormatLogLine(const v1::JobEvent& event) {
  const std::string time = FormatTimestamp(event.time(), /*with_millis=*/true);
  if (event.has_log()) {
    const std::string& level = event.log().level().empty() ? "INFO" : event.log().level();
    return absl::StrCat(time, " ", level, " ", event.log().text());
  }
  if (event.has_state()) {
    const v1::StateChange& change = event.state();
    const char* level = change.state() == v1::FAILED ? "ERROR" : "INFO";
    std::string text = absl::StrCat(time, " ", level, " state ", StateName(change.state()));
    if (!change.reason().empty()) absl::StrAppend(&text, ": ", change.reason());
    return text;
  }
  return std::nullopt;
}

// ---------------------------------------------------------------- progress

void EtaEstimator::Update(double fraction, absl::Time time) {
  if (!first_) first_ = {fraction, time};
  latest_ = {fraction, time};
}

std::optional<absl::Duration> EtaEstimator::Remaining() const {
  if (!first_ || !latest_) return std::nullopt;
  const double done = latest_->first - first_->first;
  const absl::Duration elapsed = latest_->second - first_->second;
  if (done <= 0 || elapsed <= absl::ZeroDuration()) return std::nullopt;
  const double left = std::max(0.0, 1.0 - latest_->first);
  return elapsed * (left / done);
}

void ProgressBar::Update(const v1::Progress& progress, absl::Time time) {
  fraction_ = std::clamp(progress.fraction(), 0.0, 1.0);
  message_ = progress.message();
  stage_ = progress.stage();
  eta_.Update(fraction_, time);
  Draw();
}

void ProgressBar::PrintLine(const std::string& line) {
  Erase();
  out_ << line << "\n";
  if (drawn_) Draw();
  out_.flush();
}

void ProgressBar::Finish() {
  if (!drawn_) return;
  out_ << "\n";
  out_.flush();
  drawn_ = false;
}

void ProgressBar::Erase() {
  if (drawn_) out_ << kEraseLine;
}

void ProgressBar::Draw() {
  const int filled = static_cast<int>(std::lround(fraction_ * kBarWidth));
  std::string line =
      absl::StrCat("[", std::string(filled, '#'), std::string(kBarWidth - filled, '.'), "] ",
                   absl::StrFormat("%5.1f%%", fraction_ * 100));
  if (std::optional<absl::Duration> remaining = eta_.Remaining(); remaining && fraction_ < 1) {
    absl::StrAppend(&line, "  ETA ", FormatShortDuration(*remaining));
  }
  if (!stage_.empty()) absl::StrAppend(&line, "  ", stage_, ":");
  if (!message_.empty()) absl::StrAppend(&line, stage_.empty() ? "  " : " ", message_);
  if (line.size() > kMaxBarLineChars) line = line.substr(0, kMaxBarLineChars - 3) + "...";
  out_ << kEraseLine << line;
  out_.flush();
  drawn_ = true;
}

}  // namespace compress::client
