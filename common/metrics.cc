#include "common/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace compress::metrics {
namespace {

// std::atomic<double>::fetch_add is C++20; a compare-exchange loop does the same.
void AtomicAdd(std::atomic<double>& value, double by) {
  double current = value.load(std::memory_order_relaxed);
  while (!value.compare_exchange_weak(current, current + by, std::memory_order_relaxed)) {
  }
}

bool IsNameStart(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// Metric names: [a-zA-Z_:][a-zA-Z0-9_:]*. Label names: [a-zA-Z_][a-zA-Z0-9_]*.
bool IsValidName(const std::string& name, bool allow_colon) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    char c = name[i];
    bool ok = IsNameStart(c) || (allow_colon && c == ':') || (i > 0 && IsDigit(c));
    if (!ok) return false;
  }
  return true;
}

// Sample values and `le` bounds the way Prometheus clients print them:
// integers without a fraction, otherwise the shortest text that reads back
// as the same double.
std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == 0) return "0";  // also -0
  if (v == std::floor(v) && std::fabs(v) < 1e15) return absl::StrFormat("%.0f", v);
  for (int precision = 1; precision < 17; ++precision) {
    std::string text = absl::StrFormat("%.*g", precision, v);
    if (std::strtod(text.c_str(), nullptr) == v) return text;
  }
  return absl::StrFormat("%.17g", v);
}

std::string EscapeHelp(const std::string& help) {
  std::string out;
  out.reserve(help.size());
  for (char c : help) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

const char* TypeName(MetricType type) {
  switch (type) {
    case MetricType::kCounter: return "counter";
    case MetricType::kGauge: return "gauge";
    case MetricType::kHistogram: return "histogram";
  }
  return "untyped";
}

// `name{a="1",b="2"} value` with an optional extra label last (histogram `le`).
void AppendSample(const std::string& name, const Labels& labels, const char* extra_label,
                  const std::string& extra_value, const std::string& value, std::string* out) {
  absl::StrAppend(out, name);
  if (!labels.empty() || extra_label != nullptr) {
    out->push_back('{');
    bool first = true;
    for (const auto& [key, label_value] : labels) {
      absl::StrAppend(out, first ? "" : ",", key, "=\"", EscapeLabelValue(label_value), "\"");
      first = false;
    }
    if (extra_label != nullptr) {
      absl::StrAppend(out, first ? "" : ",", extra_label, "=\"", EscapeLabelValue(extra_value),
                      "\"");
    }
    out->push_back('}');
  }
  absl::StrAppend(out, " ", value, "\n");
}

}  // namespace

// ---------------------------------------------------------------- values

void Counter::Increment(double by) {
  if (!(by >= 0)) return;  // counters only go up; also drops NaN
  AtomicAdd(value_, by);
}

double Counter::Value() const { return value_.load(std::memory_order_relaxed); }

void Gauge::Set(double v) { value_.store(v, std::memory_order_relaxed); }
void Gauge::Increment(double by) { AtomicAdd(value_, by); }
void Gauge::Decrement(double by) { AtomicAdd(value_, -by); }
double Gauge::Value() const { return value_.load(std::memory_order_relaxed); }

Histogram::Histogram(BucketBoundaries boundaries) : boundaries_(std::move(boundaries)) {
  // +Inf is implied, so an explicit one (or NaN) would make a duplicate bucket.
  boundaries_.erase(std::remove_if(boundaries_.begin(), boundaries_.end(),
                                   [](double b) { return std::isnan(b) || std::isinf(b); }),
                    boundaries_.end());
  std::sort(boundaries_.begin(), boundaries_.end());
  boundaries_.erase(std::unique(boundaries_.begin(), boundaries_.end()), boundaries_.end());
  counts_.assign(boundaries_.size() + 1, 0);
}

void Histogram::Observe(double v) {
  // Bucket i counts v <= boundaries_[i] ("le"); NaN and values above every
  // boundary land in +Inf, as in the Go client.
  size_t bucket = boundaries_.size();
  if (!std::isnan(v)) {
    bucket = static_cast<size_t>(std::lower_bound(boundaries_.begin(), boundaries_.end(), v) -
                                 boundaries_.begin());
  }
  std::lock_guard<std::mutex> lock(mu_);
  ++counts_[bucket];
  sum_ += v;
  ++count_;
}

std::vector<uint64_t> Histogram::CumulativeCounts() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<uint64_t> cumulative(counts_.size());
  uint64_t running = 0;
  for (size_t i = 0; i < counts_.size(); ++i) {
    running += counts_[i];
    cumulative[i] = running;
  }
  return cumulative;
}

double Histogram::Sum() const {
  std::lock_guard<std::mutex> lock(mu_);
  return sum_;
}

uint64_t Histogram::Count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return count_;
}

Histogram::BucketBoundaries DefaultLatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

Histogram::BucketBoundaries LongDurationBuckets() {
  return {0.01, 0.025, 0.05, 0.1, 0.25, 0.5,  1,    2.5,  5,   10,
          30,   60,    120,  300, 600,  1200, 1800, 3600, 7200};
}

std::string EscapeLabelValue(const std::string& v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '"': out += "\\\""; break;
      case '\n': out += "\\n"; break;
      default: out += c;
    }
  }
  return out;
}

// ---------------------------------------------------------------- text format

namespace internal {

void DieOnMisuse(const std::string& message) {
  std::fprintf(stderr, "metrics: %s\n", message.c_str());
  std::abort();
}

void CheckMetricName(const std::string& name) {
  if (!IsValidName(name, /*allow_colon=*/true)) {
    DieOnMisuse("invalid metric name \"" + name + "\" (want [a-zA-Z_:][a-zA-Z0-9_:]*)");
  }
}

void CheckLabelNames(const std::string& metric_name, MetricType type, const Labels& labels) {
  for (const auto& [key, value] : labels) {
    if (!IsValidName(key, /*allow_colon=*/false) || key.rfind("__", 0) == 0) {
      DieOnMisuse("metric \"" + metric_name + "\": invalid label name \"" + key + "\"");
    }
    if (type == MetricType::kHistogram && key == "le") {
      DieOnMisuse("histogram \"" + metric_name + "\": label \"le\" is reserved for buckets");
    }
  }
}

void AppendFamilyHeader(const FamilyBase& family, std::string* out) {
  absl::StrAppend(out, "# HELP ", family.name(), " ", EscapeHelp(family.help()), "\n");
  absl::StrAppend(out, "# TYPE ", family.name(), " ", TypeName(family.type()), "\n");
}

void AppendSamples(const std::string& name, const Labels& labels, const Counter& counter,
                   std::string* out) {
  AppendSample(name, labels, nullptr, "", FormatValue(counter.Value()), out);
}

void AppendSamples(const std::string& name, const Labels& labels, const Gauge& gauge,
                   std::string* out) {
  AppendSample(name, labels, nullptr, "", FormatValue(gauge.Value()), out);
}

void AppendSamples(const std::string& name, const Labels& labels, const Histogram& histogram,
                   std::string* out) {
  std::vector<uint64_t> cumulative = histogram.CumulativeCounts();
  const Histogram::BucketBoundaries& boundaries = histogram.boundaries();
  const std::string bucket_name = name + "_bucket";
  for (size_t i = 0; i < cumulative.size(); ++i) {
    std::string le = i < boundaries.size() ? FormatValue(boundaries[i]) : "+Inf";
    AppendSample(bucket_name, labels, "le", le, absl::StrCat(cumulative[i]), out);
  }
  AppendSample(name + "_sum", labels, nullptr, "", FormatValue(histogram.Sum()), out);
  // The +Inf bucket is the count by definition; taking it from the same
  // snapshot keeps _count equal to it under concurrent Observe().
  AppendSample(name + "_count", labels, nullptr, "", absl::StrCat(cumulative.back()), out);
}

}  // namespace internal

// ---------------------------------------------------------------- registry

void Registry::AddCollectHook(std::function<void()> hook) {
  std::lock_guard<std::mutex> lock(mu_);
  hooks_.push_back(std::move(hook));
}

std::string Registry::Serialize() const {
  std::vector<std::function<void()>> hooks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    hooks = hooks_;
  }
  // Outside the lock: a hook may register or update metrics.
  for (const std::function<void()>& hook : hooks) hook();

  std::vector<const FamilyBase*> families;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const std::unique_ptr<FamilyBase>& family : families_) families.push_back(family.get());
  }
  // Sorted by name, so the page does not depend on which code path happened
  // to register first. Families are never removed, so the pointers stay valid.
  std::sort(families.begin(), families.end(),
            [](const FamilyBase* a, const FamilyBase* b) { return a->name() < b->name(); });
  std::string out;
  for (const FamilyBase* family : families) family->AppendText(&out);
  return out;
}

}  // namespace compress::metrics
