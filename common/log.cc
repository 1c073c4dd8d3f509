#include "common/log.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <nlohmann/json.hpp>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace compress {
namespace {

std::mutex& LogMutex() {
  static std::mutex m;
  return m;
}

std::string& Component() {
  static std::string c;
  return c;
}

std::vector<std::pair<std::string, std::string>>& ProcessFields() {
  static auto* fields = new std::vector<std::pair<std::string, std::string>>();
  return *fields;
}

LogFormat& Format() {
  static LogFormat format = LogFormat::kText;
  return format;
}

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
  }
  return "info";
}

std::string Quote(absl::string_view v) {
  bool plain = !v.empty();
  for (char c : v) {
    // Any whitespace or control character would split or garble the key=value line.
    if (static_cast<unsigned char>(c) <= ' ' || c == 0x7f || c == '"' || c == '=' || c == '\\') {
      plain = false;
    }
  }
  if (plain) return std::string(v);
  return absl::StrCat("\"",
                      absl::StrReplaceAll(v, {{"\\", "\\\\"},
                                              {"\"", "\\\""},
                                              {"\n", "\\n"},
                                              {"\r", "\\r"},
                                              {"\t", "\\t"}}),
                      "\"");
}

}  // namespace

void SetLogComponent(absl::string_view component) {
  std::lock_guard<std::mutex> lock(LogMutex());
  Component() = std::string(component);
}

void SetLogProcessField(absl::string_view key, absl::string_view value) {
  std::lock_guard<std::mutex> lock(LogMutex());
  auto& fields = ProcessFields();
  fields.erase(std::remove_if(fields.begin(), fields.end(),
                              [&](const auto& f) { return f.first == key; }),
               fields.end());
  if (!value.empty()) fields.emplace_back(std::string(key), std::string(value));
}

void SetLogFormat(LogFormat format) {
  std::lock_guard<std::mutex> lock(LogMutex());
  Format() = format;
}

absl::StatusOr<LogFormat> ParseLogFormat(absl::string_view name) {
  if (name == "text") return LogFormat::kText;
  if (name == "json") return LogFormat::kJson;
  if (name == "auto") return ::isatty(STDERR_FILENO) ? LogFormat::kText : LogFormat::kJson;
  return absl::InvalidArgumentError(
      absl::StrCat("log format '", name, "': expected text, json or auto"));
}

void Log(LogLevel level, absl::string_view message, std::initializer_list<LogField> fields) {
  const std::string time =
      absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone());
  std::string line;
  std::lock_guard<std::mutex> lock(LogMutex());
  if (Format() == LogFormat::kJson) {
    nlohmann::ordered_json object;
    object["ts"] = time;
    object["level"] = LevelName(level);
    if (!Component().empty()) object["component"] = Component();
    object["msg"] = std::string(message);
    for (const auto& [key, value] : ProcessFields()) object[key] = value;
    for (const LogField& f : fields) object[std::string(f.first)] = f.second;
    // Invalid UTF-8 becomes U+FFFD: the line stays one valid JSON object.
    line = object.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  } else {
    line = absl::StrCat("ts=", time, " level=", LevelName(level));
    if (!Component().empty()) absl::StrAppend(&line, " component=", Component());
    absl::StrAppend(&line, " msg=", Quote(message));
    for (const auto& [key, value] : ProcessFields()) absl::StrAppend(&line, " ", key, "=", Quote(value));
    for (const LogField& f : fields) absl::StrAppend(&line, " ", f.first, "=", Quote(f.second));
  }
  line.push_back('\n');
  std::fputs(line.c_str(), stderr);
}

}  // namespace compress
