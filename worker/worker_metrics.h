// Every metric compress-worker exports, declared in one place.
#pragma once

#include <functional>
#include <mutex>
#include <optional>
#include <set>
#include <string>

#include "absl/time/time.h"
#include "common/metrics.h"

namespace compress::worker {

struct WorkerMetrics {
  explicit WorkerMetrics(metrics::Registry& registry);

  // Reads the device memory in use at every scrape (the agent sets it once it
  // knows its device). Safe to call while /metrics is served.
  void SetDeviceMemoryProbe(std::function<int64_t()> probe);

  metrics::Family<metrics::Counter>& tasks;            // {result}
  metrics::Gauge& busy;
  metrics::Counter& weight_bytes_processed;
  metrics::Family<metrics::Histogram>& stage_seconds;  // {method}
  metrics::Family<metrics::Histogram>& block_seconds;  // {method}
  metrics::Gauge& resident_memory_bytes;
  metrics::Counter& cpu_seconds;
  // Calibration tokens run through the decoder blocks per second, in the
  // last task that calibrated.
  metrics::Gauge& calibration_tokens_per_second;
  metrics::Gauge& device_memory_bytes;                 // the limit tasks may use
  metrics::Gauge& device_memory_used_bytes;
  metrics::Family<metrics::Gauge>& info;               // {worker_id, device}
  // Per task this worker ran (a job is one task, or several block ranges and
  // an assembly). The registry cannot drop a label set yet, so a long-lived
  // worker keeps a few series per task it ran.
  metrics::Family<metrics::Gauge>& task_progress;       // {job_id, task_id}
  metrics::Family<metrics::Gauge>& task_stage_seconds;  // {job_id, task_id, stage}

 private:
  std::mutex probe_mu_;
  std::function<int64_t()> device_memory_probe_;
};


// Seconds per decoder block, derived from the engine's per-tensor progress
// messages ("gptq: model.layers.3.mlp.down_proj.weight [...] ..."). A block
// ends at the last progress event that names it; it began where the event
// before its first one left off (the task start for the very first), so the
// time spent capturing calibration inputs and propagating them counts. Each
// block is observed once, labelled by the methods that touched it ("gptq",
// or "awq+rtn" for a mixed recipe).
class BlockTimer {
 public:
  BlockTimer(metrics::Family<metrics::Histogram>* family, absl::Time start);
  void OnProgress(const std::string& message, absl::Time now);
  void Finish();  // observes the block in progress, if any

 private:
  metrics::Family<metrics::Histogram>* family_;
  absl::Time last_event_;
  std::optional<int64_t> block_;
  absl::Time block_start_;
  absl::Time block_last_event_;
  std::set<std::string> methods_;
};

}  // namespace compress::worker
