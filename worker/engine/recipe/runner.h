// The engine's entry point: run one JobSpec on one model, on one device.
// No gRPC here: the worker agent and the local mode both call RunJob.
#pragma once

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "compress/v1/compress.pb.h"

namespace compress::engine {

// What RunJob writes under RunOptions::output_dir (artifact names start so).
inline constexpr char kDequantizedOutputDir[] = "dequantized";
inline constexpr char kPackedOutputDir[] = "packed";
inline constexpr char kGgufOutputDir[] = "gguf";
inline constexpr char kReportFileName[] = "report.json";

// Metrics reported through RunCallbacks::on_metric, once per stage, when
// every tensor has passed through the stage.
inline constexpr char kMetricStageSeconds[] = "stage_seconds";                          // "s"
inline constexpr char kMetricStageBytesIn[] = "stage_bytes_in";                         // "bytes"
inline constexpr char kMetricStageBytesOut[] = "stage_bytes_out";                       // "bytes"
inline constexpr char kMetricStageMeanRelativeError[] = "stage_mean_relative_error";  // "ratio"
// With calibration: the mean relative output error on the calibration inputs.
inline constexpr char kMetricStageMeanOutputError[] = "stage_mean_output_error";  // "ratio"
// With calibration, once per run: calibration tokens through the decoder
// blocks per second (tokens x blocks run / seconds of the layer-wise pass).
inline constexpr char kMetricCalibrationTokensPerSecond[] = "calibration_tokens_per_second";

struct RunOptions {
  std::string model_path;        // HF directory or a single .safetensors file
  std::string output_dir;        // artifacts are written under here
  std::string device = "cpu";    // "cpu", "cuda:N"
  // Resolved paths of the spec's calibration data and of its evaluate
  // stage's text (the worker does not resolve spec paths itself).
  std::string calibration_path;
  std::string evaluation_path;

  // Which part of the job to run (the planner's tasks). A job whose stages
  // calibrate can run as block ranges on several workers, each writing one
  // checkpoint per finished block (BlockCheckpointName) under output_dir,
  // then one assemble run that writes every output from the checkpoints,
  // byte for byte what kWhole writes.
  enum class Part { kWhole, kBlocks, kAssemble };
  Part part = Part::kWhole;
  int64_t first_layer = 0;   // kBlocks: decoder blocks [first_layer, end_layer)
  int64_t end_layer = -1;    // -1: to the last
  // kBlocks: layers already checkpointed by an earlier attempt, skipped (in
  // sequential propagation their checkpoints must be under checkpoint_dir).
  std::set<int64_t> finished_layers;
  // Where BlockCheckpointName(layer) files are read from (kAssemble: every
  // layer's; kBlocks: the finished ones).
  std::string checkpoint_dir;
};

struct ProducedArtifact {
  std::string name;          // path relative to output_dir, e.g. "packed/model.safetensors"
  compress::v1::OutputFormat format = compress::v1::OUTPUT_FORMAT_UNSPECIFIED;
  int64_t size_bytes = 0;
  std::string sha256;
};

// Callbacks the engine calls while it runs; any may be empty.
struct RunCallbacks {
  // fraction of this run (the part asked for) in [0, 1], nondecreasing.
  std::function<void(double fraction, const std::string& stage, const std::string& message)>
      on_progress;
  std::function<void(const std::string& stage, const std::string& name, double value,
                     const std::string& unit)>
      on_metric;
  std::function<void(const std::string& level, const std::string& text)> on_log;
  // Polled between tensors; true stops the run with CANCELLED.
  std::function<bool()> is_cancelled;
  // kBlocks: a block's checkpoint was committed (name relative to
  // output_dir); an error stops the run with it.
  std::function<absl::Status(const ProducedArtifact& checkpoint)> on_checkpoint;
};

struct RunResult {
  // kBlocks: empty (the checkpoints carry the block's reports).
  compress::v1::JobReport report;
  // Every file written, report.json included (kBlocks: the checkpoints).
  std::vector<ProducedArtifact> artifacts;
};

// Sets how many CPU threads LibTorch uses inside one operation; 0 means one
// per core. LibTorch's own default here can be a single thread.
void SetCpuThreads(int threads);

// Runs the stages in order and writes the requested outputs. Every file is
// written atomically.
//
// Tensors stream through the job one at a time (the layer-wise runner's
// order): each is read from the mmapped checkpoint, passed through every
// stage that targets it in stage order, written to each output and dropped.
// Outputs are assembled in a hidden staging folder under output_dir and moved
// into place only when the job succeeds, so a failed or cancelled job leaves
// no finished-looking file behind. Errors: INVALID_ARGUMENT for a bad spec or a malformed
// model (the message names the file and tensor), CANCELLED, INTERNAL for a
// LibTorch failure (caught here, never thrown past this boundary).
absl::StatusOr<RunResult> RunJob(const compress::v1::JobSpec& spec, const RunOptions& options,
                                 const RunCallbacks& callbacks);

}  // namespace compress::engine
