#include "client/render.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <type_traits>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
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

// Rows of cells as left-aligned columns two spaces apart, each line
// starting with `indent`.
std::string AlignedColumns(const std::vector<std::vector<std::string>>& rows,
                           absl::string_view indent = "") {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    widths.resize(std::max(widths.size(), row.size()), 0);
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  std::string text;
  for (const auto& row : rows) {
    std::string line(indent);
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
    if (stage.kind() == "export") {
      absl::StrAppend(&text, absl::StrFormat("  Export %s: %.1f s, %s written\n", stage.method(),
                                             stage.seconds(), FormatBytes(stage.bytes_out())));
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
  for (const v1::GgufFileReport& gguf : report.gguf()) {
    std::vector<std::string> types;
    for (const auto& [type, count] : gguf.tensor_types()) types.push_back(absl::StrCat(type, " ", count));
    std::sort(types.begin(), types.end());
    absl::StrAppend(&text, absl::StrFormat("  GGUF %s%s: %s, %s, %.2f bits per weight (%s)\n",
                                           gguf.preset(), gguf.importance() ? " (imatrix)" : "",
                                           gguf.file(), FormatBytes(gguf.size_bytes()),
                                           gguf.bits_per_weight(), absl::StrJoin(types, ", ")));
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

// The planner's tasks, one line each: what, state, progress, worker, memory.
std::string FormatTasks(const v1::Job& job) {
  std::string text = "Tasks:\n";
  for (const v1::JobTask& task : job.tasks()) {
    std::string what = "whole job";
    if (task.kind() == v1::TASK_BLOCKS) {
      what = absl::StrFormat("blocks %d-%d", task.first_layer(), task.end_layer() - 1);
    } else if (task.kind() == v1::TASK_ASSEMBLE) {
      what = "assemble";
    }
    absl::string_view state = v1::TaskState_Name(task.state());
    absl::ConsumePrefix(&state, "TASK_");
    absl::StrAppend(&text, absl::StrFormat("  %-2d %-14s %-8s %5.1f%%  %-20s  ~%s", task.index(),
                                           what, absl::AsciiStrToLower(std::string(state)),
                                           task.progress() * 100,
                                           task.worker_id().empty() ? "-" : task.worker_id(),
                                           FormatBytes(task.memory_bytes())));
    if (task.attempts() > 1) absl::StrAppend(&text, absl::StrFormat("  attempts %d", task.attempts()));
    if (!task.message().empty()) absl::StrAppend(&text, "  ", task.message());
    absl::StrAppend(&text, "\n");
  }
  return text;
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
  if (job.tasks_size() > 1) absl::StrAppend(&text, FormatTasks(job));
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
  return AlignedColumns(rows);
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

// ---------------------------------------------------------------- inspect

namespace {

// In text output: this many array items, and strings up to this many bytes.
constexpr size_t kArrayItemsShown = 5;
constexpr size_t kStringBytesShown = 64;

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Bytes of the UTF-8 sequence starting with `lead` (0: not a valid lead byte).
size_t Utf8SequenceLength(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 0;
}

// The code point of the valid sequence at text[i], or -1 (and *length 1).
int32_t DecodeUtf8At(absl::string_view text, size_t i, size_t* length) {
  const auto lead = static_cast<unsigned char>(text[i]);
  const size_t n = Utf8SequenceLength(lead);
  *length = 1;
  if (n == 0 || text.size() - i < n) return -1;
  if (n == 1) return lead;
  int32_t cp = lead & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) {
    const auto next = static_cast<unsigned char>(text[i + k]);
    if ((next & 0xC0) != 0x80) return -1;
    cp = (cp << 6) | (next & 0x3F);
  }
  static constexpr int32_t kMinOfLength[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMinOfLength[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return -1;
  *length = n;
  return cp;
}

// A string for a terminal: quoted, control characters escaped, cut after
// kStringBytesShown bytes (on a character boundary) with its full size.
std::string QuotedForText(absl::string_view s) {
  size_t cut = 0;
  while (cut < s.size() && cut < kStringBytesShown) {
    size_t length = 1;
    DecodeUtf8At(s, cut, &length);
    if (cut + length > kStringBytesShown) break;
    cut += length;
  }
  std::string text = absl::StrCat("\"", absl::Utf8SafeCEscape(s.substr(0, cut)), "\"");
  if (cut < s.size()) absl::StrAppend(&text, "... (", s.size(), " bytes)");
  return text;
}

// A number as JSON: integers exact, floats with enough digits to read back,
// NaN and infinities (which JSON lacks) as null.
template <typename T>
std::string JsonNumber(T v) {
  if constexpr (std::is_same_v<T, bool>) {
    return v ? "true" : "false";
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!std::isfinite(v)) return "null";
    return absl::StrFormat(std::is_same_v<T, float> ? "%.9g" : "%.17g", static_cast<double>(v));
  } else {
    return absl::StrCat(static_cast<std::conditional_t<std::is_signed_v<T>, int64_t, uint64_t>>(v));
  }
}

template <typename T>
std::string ElementText(const T& v) {
  if constexpr (std::is_same_v<T, std::string>) {
    return QuotedForText(v);
  } else if constexpr (std::is_same_v<T, bool>) {
    return v ? "true" : "false";
  } else if constexpr (std::is_floating_point_v<T>) {
    return absl::StrCat(v);
  } else {
    return JsonNumber(v);
  }
}

template <typename T>
std::string ElementJson(const T& v) {
  if constexpr (std::is_same_v<T, std::string>) {
    return JsonQuote(v);
  } else {
    return JsonNumber(v);
  }
}

std::string GgufTypeText(const GgufValue& value) {
  if (!value.is_array()) return GgufValueTypeName(value.type());
  return absl::StrCat("ARRAY[", GgufValueTypeName(value.element_type()), "]");
}

// "[N items: first, second, ...]" for arrays; the value itself otherwise.
std::string GgufValueText(const GgufValue& value) {
  return value.Visit([](const auto& v) -> std::string {
    using T = std::decay_t<decltype(v)>;
    if constexpr (std::is_same_v<T, GgufArray>) {
      return std::visit(
          [](const auto& elements) -> std::string {
            if (elements.empty()) return "[0 items]";
            std::vector<std::string> shown;
            for (size_t i = 0; i < elements.size() && i < kArrayItemsShown; ++i) {
              shown.push_back(ElementText(static_cast<typename std::decay_t<
                                              decltype(elements)>::value_type>(elements[i])));
            }
            return absl::StrCat("[", elements.size(), elements.size() == 1 ? " item: " : " items: ",
                                absl::StrJoin(shown, ", "),
                                elements.size() > kArrayItemsShown ? ", ...]" : "]");
          },
          v);
    } else {
      return ElementText(v);
    }
  });
}

std::string GgufValueJson(const GgufValue& value) {
  return value.Visit([](const auto& v) -> std::string {
    using T = std::decay_t<decltype(v)>;
    if constexpr (std::is_same_v<T, GgufArray>) {
      return std::visit(
          [](const auto& elements) -> std::string {
            using E = typename std::decay_t<decltype(elements)>::value_type;
            std::string json = "[";
            for (size_t i = 0; i < elements.size(); ++i) {
              absl::StrAppend(&json, i == 0 ? "" : ",", ElementJson(static_cast<E>(elements[i])));
            }
            return json + "]";
          },
          v);
    } else {
      return ElementJson(v);
    }
  });
}

// Totals over a file's tensors, for the last line of the text and the JSON.
struct TensorTotals {
  int64_t tensors = 0;
  int64_t elements = 0;
  uint64_t bytes = 0;

  double BitsPerWeight() const {
    return elements == 0 ? 0.0 : 8.0 * static_cast<double>(bytes) / static_cast<double>(elements);
  }
  std::string Text() const {
    return absl::StrFormat("%d tensors, %d weights, %d bytes (%s), %.2f bits per weight", tensors,
                           elements, bytes, FormatBytes(static_cast<int64_t>(bytes)),
                           BitsPerWeight());
  }
  std::string JsonFields() const {
    return absl::StrCat("\"tensor_count\":", tensors, ",\"total_elements\":", elements,
                        ",\"total_bytes\":", bytes,
                        ",\"bits_per_weight\":", absl::StrFormat("%.4f", BitsPerWeight()));
  }
};

std::string CountOf(size_t n, absl::string_view singular, absl::string_view plural) {
  return absl::StrCat(n, " ", n == 1 ? singular : plural);
}

}  // namespace

std::string JsonQuote(absl::string_view text) {
  std::string out = "\"";
  for (size_t i = 0; i < text.size();) {
    size_t length = 1;
    const int32_t cp = DecodeUtf8At(text, i, &length);
    if (cp < 0) {
      out += "\\ufffd";
    } else if (cp == '"') {
      out += "\\\"";
    } else if (cp == '\\') {
      out += "\\\\";
    } else if (cp == '\n') {
      out += "\\n";
    } else if (cp == '\t') {
      out += "\\t";
    } else if (cp == '\r') {
      out += "\\r";
    } else if (cp < 0x20) {
      out += absl::StrFormat("\\u%04x", cp);
    } else {
      out.append(text.data() + i, length);
    }
    i += length;
  }
  return out + "\"";
}

std::string FormatGgufFile(absl::string_view path, const GgufHeader& header) {
  const uint64_t file_bytes = header.data_offset + header.DataSectionBytes();
  std::string text = Field("File", absl::StrCat(path, " (", FormatBytes(file_bytes), ")"));
  absl::StrAppend(&text, Field("Format", absl::StrFormat("GGUF version %d, alignment %d, data "
                                                         "at byte %d",
                                                         header.version, header.alignment,
                                                         header.data_offset)));
  absl::StrAppend(&text, Field("Metadata", CountOf(header.metadata.size(), "key", "keys")));
  std::vector<std::vector<std::string>> metadata_rows;
  for (const GgufKeyValue& kv : header.metadata) {
    metadata_rows.push_back({kv.key, GgufTypeText(kv.value), GgufValueText(kv.value)});
  }
  absl::StrAppend(&text, AlignedColumns(metadata_rows, "  "));

  TensorTotals totals;
  std::vector<std::vector<std::string>> tensor_rows = {{"NAME", "SHAPE", "TYPE", "BYTES"}};
  for (const GgufTensorInfo& t : header.tensors) {
    tensor_rows.push_back({t.name, ShapeText(t.TorchShape()), GgufTypeOf(t.type).name,
                           absl::StrCat(t.bytes)});
    ++totals.tensors;
    totals.elements += t.NumElements();
    totals.bytes += t.bytes;
  }
  absl::StrAppend(&text, Field("Tensors", CountOf(header.tensors.size(), "tensor", "tensors")));
  if (!header.tensors.empty()) absl::StrAppend(&text, AlignedColumns(tensor_rows, "  "));
  absl::StrAppend(&text, Field("Total", totals.Text()));
  return text;
}

std::string GgufFileToJson(absl::string_view path, const GgufHeader& header) {
  std::string json = absl::StrCat(
      "{\"file\":", JsonQuote(path), ",\"format\":\"gguf\",\"version\":", header.version,
      ",\"alignment\":", header.alignment, ",\"data_offset\":", header.data_offset,
      ",\"file_bytes\":", header.data_offset + header.DataSectionBytes(), ",\"metadata\":{");
  for (size_t i = 0; i < header.metadata.size(); ++i) {
    const GgufKeyValue& kv = header.metadata[i];
    absl::StrAppend(&json, i == 0 ? "" : ",", JsonQuote(kv.key), ":{\"type\":\"",
                    GgufValueTypeName(kv.value.type()), "\"");
    if (kv.value.is_array()) {
      absl::StrAppend(&json, ",\"element_type\":\"", GgufValueTypeName(kv.value.element_type()),
                      "\"");
    }
    absl::StrAppend(&json, ",\"value\":", GgufValueJson(kv.value), "}");
  }
  absl::StrAppend(&json, "},\"tensors\":[");
  TensorTotals totals;
  for (size_t i = 0; i < header.tensors.size(); ++i) {
    const GgufTensorInfo& t = header.tensors[i];
    absl::StrAppend(&json, i == 0 ? "" : ",", "{\"name\":", JsonQuote(t.name), ",\"shape\":",
                    ShapeText(t.TorchShape()), ",\"ne\":", ShapeText(t.ne), ",\"type\":\"",
                    GgufTypeOf(t.type).name, "\",\"offset\":", t.offset, ",\"bytes\":", t.bytes,
                    "}");
    ++totals.tensors;
    totals.elements += t.NumElements();
    totals.bytes += t.bytes;
  }
  absl::StrAppend(&json, "],", totals.JsonFields(), "}");
  return json;
}

std::string FormatSafetensorsFile(absl::string_view path, const SafetensorsHeader& header) {
  const uint64_t file_bytes = header.DataSectionOffset() + header.DataSectionBytes();
  std::string text = Field("File", absl::StrCat(path, " (", FormatBytes(file_bytes), ")"));
  absl::StrAppend(&text, Field("Format", absl::StrFormat("safetensors, %d-byte JSON header",
                                                         header.json_bytes)));
  absl::StrAppend(&text, Field("Metadata", CountOf(header.metadata.size(), "key", "keys")));
  std::vector<std::vector<std::string>> metadata_rows;
  for (const auto& [key, value] : header.metadata) {
    metadata_rows.push_back({key, QuotedForText(value)});
  }
  absl::StrAppend(&text, AlignedColumns(metadata_rows, "  "));

  TensorTotals totals;
  std::vector<std::vector<std::string>> tensor_rows = {{"NAME", "SHAPE", "DTYPE", "BYTES"}};
  for (const SafetensorsTensorInfo& t : header.tensors) {
    tensor_rows.push_back(
        {t.name, ShapeText(t.shape), DtypeName(t.dtype), absl::StrCat(t.NumBytes())});
    ++totals.tensors;
    totals.elements += t.NumElements();
    totals.bytes += t.NumBytes();
  }
  absl::StrAppend(&text, Field("Tensors", CountOf(header.tensors.size(), "tensor", "tensors")));
  if (!header.tensors.empty()) absl::StrAppend(&text, AlignedColumns(tensor_rows, "  "));
  absl::StrAppend(&text, Field("Total", totals.Text()));
  return text;
}

std::string SafetensorsFileToJson(absl::string_view path, const SafetensorsHeader& header) {
  std::string json = absl::StrCat(
      "{\"file\":", JsonQuote(path), ",\"format\":\"safetensors\",\"header_bytes\":",
      header.json_bytes, ",\"file_bytes\":", header.DataSectionOffset() + header.DataSectionBytes(),
      ",\"metadata\":{");
  bool first = true;
  for (const auto& [key, value] : header.metadata) {
    absl::StrAppend(&json, first ? "" : ",", JsonQuote(key), ":", JsonQuote(value));
    first = false;
  }
  absl::StrAppend(&json, "},\"tensors\":[");
  TensorTotals totals;
  for (size_t i = 0; i < header.tensors.size(); ++i) {
    const SafetensorsTensorInfo& t = header.tensors[i];
    absl::StrAppend(&json, i == 0 ? "" : ",", "{\"name\":", JsonQuote(t.name), ",\"dtype\":\"",
                    DtypeName(t.dtype), "\",\"shape\":", ShapeText(t.shape),
                    ",\"offset\":", t.data_begin, ",\"bytes\":", t.NumBytes(), "}");
    ++totals.tensors;
    totals.elements += t.NumElements();
    totals.bytes += t.NumBytes();
  }
  absl::StrAppend(&json, "],", totals.JsonFields(), "}");
  return json;
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
