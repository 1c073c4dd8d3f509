#include "worker/worker_metrics.h"

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"

namespace compress::worker {

WorkerMetrics::WorkerMetrics(metrics::Registry& registry)
    : tasks(metrics::BuildCounter()
                .Name("compress_worker_tasks_total")
                .Help("Tasks this worker finished, by result (succeeded, failed, cancelled, lost).")
                .Register(registry)),
      busy(metrics::BuildGauge()
               .Name("compress_worker_busy")
               .Help("1 while the worker runs a task.")
               .Register(registry)
               .Add({})),
      weight_bytes_processed(metrics::BuildCounter()
                                 .Name("compress_worker_weight_processed_bytes_total")
                                 .Help("Bytes of weights read by compression stages.")
                                 .Register(registry)
                                 .Add({})),
      stage_seconds(metrics::BuildHistogram()
                        .Name("compress_worker_stage_seconds")
                        .Help("Duration of each stage of a task (quantize, prune, export, evaluate), by method.")
                        .Register(registry)),
      block_seconds(metrics::BuildHistogram()
                        .Name("compress_worker_block_seconds")
                        .Help("Time to compress one decoder block (calibration capture and "
                              "propagation included), by method.")
                        .Register(registry)),
      resident_memory_bytes(metrics::BuildGauge()
                                .Name("compress_worker_resident_memory_bytes")
                                .Help("Resident memory of the worker process.")
                                .Register(registry)
                                .Add({})),
      cpu_seconds(metrics::BuildCounter()
                      .Name("compress_worker_cpu_seconds_total")
                      .Help("CPU time used by the worker process (user + system).")
                      .Register(registry)
                      .Add({})),
      calibration_tokens_per_second(
          metrics::BuildGauge()
              .Name("compress_worker_calibration_tokens_per_second")
              .Help("Calibration tokens run through the decoder blocks per second, last task.")
              .Register(registry)
              .Add({})),
      device_memory_bytes(metrics::BuildGauge()
                              .Name("compress_worker_device_memory_bytes")
                              .Help("Memory of the worker's device that tasks may use.")
                              .Register(registry)
                              .Add({})),
      device_memory_used_bytes(
          metrics::BuildGauge()
              .Name("compress_worker_device_memory_used_bytes")
              .Help(
                  "Memory of the worker's device in use (for cpu: the process's resident memory).")
              .Register(registry)
              .Add({})),
      info(metrics::BuildGauge()
               .Name("compress_worker_info")
               .Help(
                   "1, labelled with the worker id the server knows this worker by and its device.")
               .Register(registry)),
      task_progress(metrics::BuildGauge()
                        .Name("compress_worker_task_progress_ratio")
                        .Help("Fraction of each task (of a job) this worker has done, 0..1.")
                        .Register(registry)),
      task_stage_seconds(metrics::BuildGauge()
                             .Name("compress_worker_task_stage_seconds")
                             .Help("Seconds each finished stage of a task took on this worker.")
                             .Register(registry)) {
  registry.AddCollectHook([this] {
    std::function<int64_t()> probe;
    {
      std::lock_guard<std::mutex> lock(probe_mu_);
      probe = device_memory_probe_;
    }
    if (probe) device_memory_used_bytes.Set(static_cast<double>(probe()));
  });
}

void WorkerMetrics::SetDeviceMemoryProbe(std::function<int64_t()> probe) {
  std::lock_guard<std::mutex> lock(probe_mu_);
  device_memory_probe_ = std::move(probe);
}

namespace {

// "gptq: model.layers.3.mlp.up_proj.weight [...]" -> ("gptq", 3).
struct BlockEvent {
  std::string method;
  int64_t block = -1;
};

std::optional<BlockEvent> ParseBlockEvent(absl::string_view message) {
  const size_t colon = message.find(": ");
  if (colon == absl::string_view::npos || colon == 0) return std::nullopt;
  absl::string_view rest = message.substr(colon + 2);
  constexpr absl::string_view kPrefix = "model.layers.";
  if (!absl::StartsWith(rest, kPrefix)) return std::nullopt;
  rest.remove_prefix(kPrefix.size());
  BlockEvent event;
  if (!absl::SimpleAtoi(rest.substr(0, rest.find('.')), &event.block)) return std::nullopt;
  event.method = std::string(message.substr(0, colon));
  return event;
}

}  // namespace

BlockTimer::BlockTimer(metrics::Family<metrics::Histogram>* family, absl::Time start)
    : family_(family), last_event_(start) {}

void BlockTimer::OnProgress(const std::string& message, absl::Time now) {
  std::optional<BlockEvent> event = ParseBlockEvent(message);
  if (event.has_value()) {
    if (block_ != event->block) {
      Finish();
      block_ = event->block;
      block_start_ = last_event_;
    }
    methods_.insert(event->method);
    block_last_event_ = now;
  }
  last_event_ = now;
}

void BlockTimer::Finish() {
  if (!block_.has_value()) return;
  family_->Add({{"method", absl::StrJoin(methods_, "+")}}, metrics::LongDurationBuckets())
      .Observe(absl::ToDoubleSeconds(block_last_event_ - block_start_));
  block_.reset();
  methods_.clear();
}

}  // namespace compress::worker
