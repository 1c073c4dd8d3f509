#include "common/log.h"

#include <cstdio>
#include <mutex>

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

void Log(LogLevel level, absl::string_view message, std::initializer_list<LogField> fields) {
  std::string line = absl::StrCat(
      "ts=", absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()),
      " level=", LevelName(level));
  std::lock_guard<std::mutex> lock(LogMutex());
  if (!Component().empty()) absl::StrAppend(&line, " component=", Component());
  absl::StrAppend(&line, " msg=", Quote(message));
  for (const LogField& f : fields) absl::StrAppend(&line, " ", f.first, "=", Quote(f.second));
  line.push_back('\n');
  std::fputs(line.c_str(), stderr);
}

}  // namespace compress
