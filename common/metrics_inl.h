// Template definitions for common/metrics.h. Include metrics.h, not this file.
#pragma once

#include <string>
#include <utility>

namespace compress::metrics {
namespace internal {

template <typename T>
struct MetricTypeOf;
template <>
struct MetricTypeOf<Counter> {
  static constexpr MetricType kValue = MetricType::kCounter;
};
template <>
struct MetricTypeOf<Gauge> {
  static constexpr MetricType kValue = MetricType::kGauge;
};
template <>
struct MetricTypeOf<Histogram> {
  static constexpr MetricType kValue = MetricType::kHistogram;
};

// Misuse (a bad name, one name with two types) is a programming error that any
// test building the metrics struct catches, so it aborts with a message.
[[noreturn]] void DieOnMisuse(const std::string& message);
void CheckMetricName(const std::string& name);
void CheckLabelNames(const std::string& metric_name, MetricType type, const Labels& labels);

// "# HELP" and "# TYPE" lines, then the samples of one label set.
void AppendFamilyHeader(const FamilyBase& family, std::string* out);
void AppendSamples(const std::string& name, const Labels& labels, const Counter& counter,
                   std::string* out);
void AppendSamples(const std::string& name, const Labels& labels, const Gauge& gauge,
                   std::string* out);
void AppendSamples(const std::string& name, const Labels& labels, const Histogram& histogram,
                   std::string* out);

}  // namespace internal

template <typename T>
template <typename... Args>
T& Family<T>::Add(const Labels& labels, Args&&... args) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = metrics_.find(labels);
  if (it != metrics_.end()) return *it->second;
  internal::CheckLabelNames(name(), type(), labels);
  auto metric = std::make_unique<T>(std::forward<Args>(args)...);
  T& added = *metric;
  metrics_.emplace(labels, std::move(metric));
  return added;
}

template <typename T>
void Family<T>::Remove(const Labels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  metrics_.erase(labels);
}

template <typename T>
void Family<T>::AppendText(std::string* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  // A family with no label set yet has no samples; Prometheus clients leave
  // such families out of the page.
  if (metrics_.empty()) return;
  internal::AppendFamilyHeader(*this, out);
  for (const auto& [labels, metric] : metrics_)
    internal::AppendSamples(name(), labels, *metric, out);
}

template <typename T>
Family<T>& Registry::Register(const std::string& name, const std::string& help) {
  constexpr MetricType kType = internal::MetricTypeOf<T>::kValue;
  internal::CheckMetricName(name);
  std::lock_guard<std::mutex> lock(mu_);
  for (const std::unique_ptr<FamilyBase>& family : families_) {
    if (family->name() != name) continue;
    if (family->type() != kType) {
      internal::DieOnMisuse("metric \"" + name + "\" registered twice with different types");
    }
    return static_cast<Family<T>&>(*family);
  }
  auto family = std::make_unique<Family<T>>(name, help, kType);
  Family<T>& registered = *family;
  families_.push_back(std::move(family));
  return registered;
}

}  // namespace compress::metrics
