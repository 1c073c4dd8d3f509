// A small metrics registry in prometheus-cpp's API shape, rendered in the
// Prometheus text exposition format (version 0.0.4).
//
//   metrics::Registry registry;
//   auto& jobs = metrics::BuildCounter().Name("compress_jobs_submitted_total")
//                    .Help("Jobs accepted by SubmitJob.").Register(registry);
//   jobs.Add({{"tenant", "default"}}).Increment();
//   std::string page = registry.Serialize();
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace compress::metrics {

using Labels = std::map<std::string, std::string>;

class Counter {
 public:
  void Increment(double by = 1.0);  // by < 0 is ignored
  double Value() const;

 private:
  std::atomic<double> value_{0.0};
};

class Gauge {
 public:
  void Set(double v);
  void Increment(double by = 1.0);
  void Decrement(double by = 1.0);
  double Value() const;

 private:
  std::atomic<double> value_{0.0};
};

class Histogram {
 public:
  using BucketBoundaries = std::vector<double>;  // ascending, +Inf implied
  explicit Histogram(BucketBoundaries boundaries);
  void Observe(double v);
  // Cumulative counts per boundary, then +Inf; sum; count.
  std::vector<uint64_t> CumulativeCounts() const;
  double Sum() const;
  uint64_t Count() const;
  const BucketBoundaries& boundaries() const { return boundaries_; }

 private:
  BucketBoundaries boundaries_;
  mutable std::mutex mu_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative; last is +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

// Default latency buckets in seconds, 1 ms .. 60 s.
Histogram::BucketBoundaries DefaultLatencyBuckets();
// Buckets for task, stage and block durations: 10 ms .. 2 h (a 70B GPTQ
// stage runs for hours, a block of the test model for milliseconds).
Histogram::BucketBoundaries LongDurationBuckets();

enum class MetricType { kCounter, kGauge, kHistogram };

class FamilyBase {
 public:
  FamilyBase(std::string name, std::string help, MetricType type)
      : name_(std::move(name)), help_(std::move(help)), type_(type) {}
  virtual ~FamilyBase() = default;
  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  MetricType type() const { return type_; }
  virtual void AppendText(std::string* out) const = 0;

 private:
  std::string name_;
  std::string help_;
  MetricType type_;
};

// One metric name with any number of label sets. Add() returns the same
// object for the same labels; references stay valid for the family's life.
template <typename T>
class Family : public FamilyBase {
 public:
  using FamilyBase::FamilyBase;
  template <typename... Args>
  T& Add(const Labels& labels, Args&&... args);
  // Drops a label set (a finished job's series); references to it die.
  void Remove(const Labels& labels);
  void AppendText(std::string* out) const override;

 private:
  mutable std::mutex mu_;
  std::map<Labels, std::unique_ptr<T>> metrics_;
};

class Registry {
 public:
  // Families are owned by the registry. Registering the same name twice with
  // the same type returns the existing family; with another type aborts (a
  // programming error, caught by any test that builds the metrics struct).
  template <typename T>
  Family<T>& Register(const std::string& name, const std::string& help);
  // Called at the start of every Serialize(), e.g. to refresh gauges from state.
  void AddCollectHook(std::function<void()> hook);
  std::string Serialize() const;

 private:
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<FamilyBase>> families_;
  std::vector<std::function<void()>> hooks_;
};

template <typename T>
class Builder {
 public:
  Builder& Name(std::string name) { name_ = std::move(name); return *this; }
  Builder& Help(std::string help) { help_ = std::move(help); return *this; }
  Family<T>& Register(Registry& registry) { return registry.Register<T>(name_, help_); }

 private:
  std::string name_;
  std::string help_;
};

inline Builder<Counter> BuildCounter() { return {}; }
inline Builder<Gauge> BuildGauge() { return {}; }
inline Builder<Histogram> BuildHistogram() { return {}; }

// Escapes a label value for the text format (backslash, quote, newline).
std::string EscapeLabelValue(const std::string& v);

}  // namespace compress::metrics

#include "common/metrics_inl.h"
