// Calibration: the samples the layer-wise runner feeds a model, and the
// per-linear input statistics it collects on them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/tokenizer/tokenizer.h"

namespace compress::engine {

// A token file: little-endian uint32 ids, named "*.tokens".
inline constexpr char kTokenFileSuffix[] = ".tokens";

struct CalibrationSampleOptions {
  int64_t num_samples = 128;
  int64_t sequence_length = 512;
  int64_t vocab_size = 0;  // ids must be below it (> 0)
  // The largest file read, in bytes.
  int64_t max_file_bytes = int64_t{1} << 30;
};

// Reads calibration samples from `path`: a token file (kTokenFileSuffix), or
// UTF-8 text encoded with `tokenizer` (which may be null for a token file).
// The samples are num_samples windows of sequence_length consecutive tokens
// spread evenly over the whole stream (the first at its start, the last at
// its end); they overlap only when the stream is shorter than
// num_samples * sequence_length. Returns [num_samples, sequence_length] int64
// on the CPU, the same for the same file. NOT_FOUND for a missing file;
// INVALID_ARGUMENT naming the file for fewer tokens than sequence_length, an
// id outside the vocabulary, a token file whose size is not a multiple of 4,
// text without a tokenizer, or counts < 1.
absl::StatusOr<at::Tensor> LoadCalibrationSamples(const std::string& path,
                                                  const Tokenizer* tokenizer,
                                                  const CalibrationSampleOptions& options);

// What calibration learns about the input x of one linear layer, summed over
// every calibration token (the rows of x reshaped to [tokens, in_features]).
struct LinearInputStatistics {
  at::Tensor hessian;     // [in, in] sum of x^T x, in the collector's dtype; undefined if not asked
  at::Tensor sum_square;  // [in] float64: sum of x_j^2 (float32 squares summed in float64)
  at::Tensor sum_abs;     // [in] float64: sum of |x_j| (AWQ's activation magnitudes)
  at::Tensor abs_max;     // [in] float32: max |x_j|
  at::Tensor min;         // [in] float32: activation range per input channel
  at::Tensor max;
  int64_t tokens = 0;
};

// A LinearHook that accumulates LinearInputStatistics for chosen linears of
// the block being run. Linears fed the same tensor (q/k/v_proj; gate/up_proj)
// share one statistics object, computed once per forward pass.
class StatisticsCollector : public LinearHook {
 public:
  // `linears`: names inside the block (kBlockLinears); empty means all of
  // them. `hessian_dtype`: kFloat or kDouble; `with_hessian` false skips the
  // [in, in] products (methods that only need norms and ranges).
  StatisticsCollector(std::set<std::string> linears, bool with_hessian,
                      at::ScalarType hessian_dtype = at::kFloat);

  absl::Status OnLinearInput(int64_t layer, absl::string_view linear,
                             const at::Tensor& input) override;

  // Makes the forward pass stop, with StoppedEarly(), right after `linear`'s
  // input is collected: a pass for statistics needs nothing after the last
  // linear it measures. Empty: never.
  void StopAfter(std::string linear) { stop_after_ = std::move(linear); }
  static bool StoppedEarly(const absl::Status& status);

  // The statistics collected for `linear` since the last Clear(); null if it
  // saw no input.
  const LinearInputStatistics* Find(absl::string_view linear) const;
  // Forgets everything (between blocks).
  void Clear();

 private:
  absl::Status Collect(int64_t layer, absl::string_view linear, const at::Tensor& input);

  std::set<std::string> linears_;
  bool with_hessian_;
  at::ScalarType hessian_dtype_;
  std::map<std::string, std::shared_ptr<LinearInputStatistics>, std::less<>> statistics_;
  std::string stop_after_;
  at::Tensor previous_input_;
  std::shared_ptr<LinearInputStatistics> previous_statistics_;
};

}  // namespace compress::engine
