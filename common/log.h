// One structured line per event: `ts=... level=... msg="..." key=value ...`.
#pragma once

#include <initializer_list>
#include <string>
#include <utility>

#include "absl/strings/string_view.h"

namespace compress {

enum class LogLevel { kDebug, kInfo, kWarning, kError };

using LogField = std::pair<absl::string_view, std::string>;

// Thread-safe; writes to stderr.
void Log(LogLevel level, absl::string_view message, std::initializer_list<LogField> fields = {});
void SetLogComponent(absl::string_view component);  // e.g. "server", "worker"

#define LOG_INFO(msg, ...) ::compress::Log(::compress::LogLevel::kInfo, msg, ##__VA_ARGS__)
#define LOG_WARN(msg, ...) ::compress::Log(::compress::LogLevel::kWarning, msg, ##__VA_ARGS__)
#define LOG_ERROR(msg, ...) ::compress::Log(::compress::LogLevel::kError, msg, ##__VA_ARGS__)

}  // namespace compress
