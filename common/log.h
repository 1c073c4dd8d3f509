// One structured line per event, as logfmt text (`ts=... level=...
// msg="..." key=value ...`) or as one JSON object per line for a log
// system. Fields carry job, task and worker ids so one job can be followed
// across processes.
#pragma once

#include <initializer_list>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace compress {

enum class LogLevel { kDebug, kInfo, kWarning, kError };

using LogField = std::pair<absl::string_view, std::string>;

// Thread-safe; writes to stderr.
void Log(LogLevel level, absl::string_view message, std::initializer_list<LogField> fields = {});
void SetLogComponent(absl::string_view component);  // e.g. "server", "worker"
// A field every later line carries (e.g. the worker's id); an empty value removes it.
void SetLogProcessField(absl::string_view key, absl::string_view value);

enum class LogFormat { kText, kJson };
void SetLogFormat(LogFormat format);  // text unless set
// "text", "json", or "auto": text when stderr is a terminal, else JSON.
absl::StatusOr<LogFormat> ParseLogFormat(absl::string_view name);

#define LOG_INFO(msg, ...) ::compress::Log(::compress::LogLevel::kInfo, msg, ##__VA_ARGS__)
#define LOG_WARN(msg, ...) ::compress::Log(::compress::LogLevel::kWarning, msg, ##__VA_ARGS__)
#define LOG_ERROR(msg, ...) ::compress::Log(::compress::LogLevel::kError, msg, ##__VA_ARGS__)

}  // namespace compress
