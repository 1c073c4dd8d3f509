// How compressctl shows jobs and events to a person: summaries, tables, log
// lines and the live progress bar. Pure functions of the messages, so tests
// compare their text.
#pragma once

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/gguf_file.h"
#include "common/safetensors_header.h"
#include "compress/v1/compress.pb.h"

namespace compress::client {

std::string FormatBytes(int64_t bytes);             // "1.5 GiB", "512 B"
std::string FormatShortDuration(absl::Duration d);  // "1h02m", "3m05s", "12s"
// RFC 3339 in UTC ("2024-05-01T12:00:00Z"), "-" when unset.
std::string FormatTimestamp(const google::protobuf::Timestamp& time, bool with_millis = false);
std::string StateName(compress::v1::JobState state);  // "RUNNING"
bool IsTerminalState(compress::v1::JobState state);

// `compressctl get`: one "Field: value" line each, then report and artifacts.
std::string FormatJobSummary(const compress::v1::Job& job);

// `compressctl list`: aligned columns ID, STATE, PROGRESS, CREATED, NAME.
std::string FormatJobTable(const std::vector<compress::v1::Job>& jobs);

// `compressctl logs`: "TIME LEVEL text" for log lines and state changes;
// nullopt for the other kinds of event.
std::optional<std::string> FormatLogLine(const compress::v1::JobEvent& event);

// `compressctl inspect`: a local model file's format, metadata and tensor
// table (shapes in PyTorch order, [out, in]) with totals and bits per
// weight. The text is for people (long strings and arrays summarised as
// "[N items: first, second, ...]"); the JSON is one complete object.
std::string FormatGgufFile(absl::string_view path, const GgufHeader& header);
std::string GgufFileToJson(absl::string_view path, const GgufHeader& header);
std::string FormatSafetensorsFile(absl::string_view path, const SafetensorsHeader& header);
std::string SafetensorsFileToJson(absl::string_view path, const SafetensorsHeader& header);

// `text` as a JSON string literal, quotes included; bytes that are not
// UTF-8 become U+FFFD (GGUF strings from other tools are not checked).
std::string JsonQuote(absl::string_view text);

// Estimates the time left from the rate of progress between the first and
// the latest update (event times, so a replayed history gives the same
// answer as a live one).
class EtaEstimator {
 public:
  void Update(double fraction, absl::Time time);
  std::optional<absl::Duration> Remaining() const;

 private:
  std::optional<std::pair<double, absl::Time>> first_;
  std::optional<std::pair<double, absl::Time>> latest_;
};

// A one-line progress bar redrawn in place ("\r" and erase-line), with other
// lines printed above it.
class ProgressBar {
 public:
  explicit ProgressBar(std::ostream& out) : out_(out) {}
  ~ProgressBar() { Finish(); }

  void Update(const compress::v1::Progress& progress, absl::Time time);
  void PrintLine(const std::string& line);  // above the bar
  void Finish();                            // leaves the last bar on its own line

 private:
  void Draw();
  void Erase();

  std::ostream& out_;
  EtaEstimator eta_;
  double fraction_ = 0;
  std::string message_;
  std::string stage_;
  bool drawn_ = false;
};

}  // namespace compress::client
