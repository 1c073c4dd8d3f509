#include "worker/engine/recipe/calibration.h"

#include <ATen/ATen.h>

#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status_macros.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {

namespace {

absl::StatusOr<std::vector<int32_t>> ReadTokenFile(const std::string& path,
                                                   const std::string& bytes, int64_t vocab_size) {
  if (bytes.size() % 4 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": a token file holds little-endian uint32 ids, but its size ", bytes.size(),
        " is not a multiple of 4"));
  }
  std::vector<int32_t> tokens(bytes.size() / 4);
  for (size_t i = 0; i < tokens.size(); ++i) {
    const auto* p = reinterpret_cast<const unsigned char*>(bytes.data() + 4 * i);
    const uint32_t id = static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
                        static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
    if (id >= static_cast<uint64_t>(vocab_size)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": token ", i, " is id ", id,
                                                     ", outside the vocabulary of ", vocab_size));
    }
    tokens[i] = static_cast<int32_t>(id);
  }
  return tokens;
}

}  // namespace

absl::StatusOr<at::Tensor> LoadCalibrationSamples(const std::string& path,
                                                  const Tokenizer* tokenizer,
                                                  const CalibrationSampleOptions& options) {
  if (options.num_samples < 1 || options.sequence_length < 1 || options.vocab_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "calibration: num_samples (", options.num_samples, "), sequence_length (",
        options.sequence_length, ") and the vocabulary size (", options.vocab_size,
        ") must be at least 1"));
  }
  ASSIGN_OR_RETURN(std::string bytes, ReadFile(path, options.max_file_bytes));
  std::vector<int32_t> tokens;
  if (absl::EndsWith(path, kTokenFileSuffix)) {
    ASSIGN_OR_RETURN(tokens, ReadTokenFile(path, bytes, options.vocab_size));
  } else {
    if (tokenizer == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": a calibration text needs the model's tokenizer.json (or give a ",
          kTokenFileSuffix, " file)"));
    }
    tokens = tokenizer->Encode(bytes);
    for (int32_t id : tokens) {
      if (id < 0 || id >= options.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": the tokenizer produced id ", id,
                                                       ", outside the model's vocabulary of ",
                                                       options.vocab_size));
      }
    }
  }
  const int64_t available = static_cast<int64_t>(tokens.size());
  if (available < options.sequence_length) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", available, " tokens, fewer than one sample of sequence_length ",
                     options.sequence_length));
  }
  // Evenly spread starts: the first at 0, the last at the end of the stream.
  const int64_t last_start = available - options.sequence_length;
  std::vector<int64_t> ids(static_cast<size_t>(options.num_samples * options.sequence_length));
  for (int64_t s = 0; s < options.num_samples; ++s) {
    const int64_t start =
        options.num_samples == 1 ? 0 : s * last_start / (options.num_samples - 1);
    for (int64_t t = 0; t < options.sequence_length; ++t) {
      ids[static_cast<size_t>(s * options.sequence_length + t)] = tokens[static_cast<size_t>(start + t)];
    }
  }
  return CatchTorchErrors("calibration samples", [&]() -> absl::StatusOr<at::Tensor> {
    return at::tensor(ids, at::kLong).view({options.num_samples, options.sequence_length});
  });
}

StatisticsCollector::StatisticsCollector(std::set<std::string> linears, bool with_hessian,
                                         at::ScalarType hessian_dtype)
    : linears_(std::move(linears)), with_hessian_(with_hessian), hessian_dtype_(hessian_dtype) {}

namespace {
constexpr char kStoppedEarlyPayload[] = "compress.engine/statistics-complete";
}  // namespace

bool StatisticsCollector::StoppedEarly(const absl::Status& status) {
  return status.code() == absl::StatusCode::kAborted &&
         status.GetPayload(kStoppedEarlyPayload).has_value();
}

absl::Status StatisticsCollector::OnLinearInput(int64_t layer, absl::string_view linear,
                                                const at::Tensor& input) {
  RETURN_IF_ERROR(Collect(layer, linear, input));
  if (!stop_after_.empty() && linear == stop_after_) {
    absl::Status stop = absl::AbortedError("the statistics of this pass are complete");
    stop.SetPayload(kStoppedEarlyPayload, absl::Cord("1"));
    return stop;
  }
  return absl::OkStatus();
}

absl::Status StatisticsCollector::Collect(int64_t layer, absl::string_view linear,
                                          const at::Tensor& input) {
  if (!linears_.empty() && linears_.count(std::string(linear)) == 0) return absl::OkStatus();
  auto found = statistics_.find(linear);
  if (previous_input_.defined() && input.is_same(previous_input_)) {
    // Same tensor as the previous linear: share its statistics, already
    // updated by this pass.
    if (found == statistics_.end()) statistics_.emplace(std::string(linear), previous_statistics_);
    return absl::OkStatus();
  }
  std::shared_ptr<LinearInputStatistics> stats;
  if (found != statistics_.end()) {
    stats = found->second;
  } else {
    stats = std::make_shared<LinearInputStatistics>();
    statistics_.emplace(std::string(linear), stats);
  }
  previous_input_ = input;
  previous_statistics_ = stats;
  return CatchTorchErrors(
      absl::StrCat("calibration statistics of layer ", layer, " ", linear), [&]() -> absl::Status {
        const int64_t in = input.size(-1);
        const at::Tensor rows = input.reshape({-1, in});
        // Reductions only: no float64 copy of the rows (a pass over
        // down_proj's inputs is the largest tensor of the whole run).
        const at::Tensor rows32 = rows.to(at::kFloat);
        const at::Tensor min = std::get<0>(rows32.min(0));
        const at::Tensor max = std::get<0>(rows32.max(0));
        const at::Tensor abs_max = at::maximum(min.abs(), max.abs());
        const at::Tensor sum_square = at::sum(rows32.square(), {0}, false, at::kDouble);
        const at::Tensor sum_abs = at::sum(rows32.abs(), {0}, false, at::kDouble);
        if (stats->tokens == 0) {
          stats->sum_abs = sum_abs;
          stats->abs_max = abs_max;
          stats->min = min;
          stats->max = max;
          stats->sum_square = sum_square;
          if (with_hessian_) stats->hessian = at::zeros({in, in}, rows.options().dtype(hessian_dtype_));
        } else {
          stats->abs_max = at::maximum(stats->abs_max, abs_max);
          stats->min = at::minimum(stats->min, min);
          stats->max = at::maximum(stats->max, max);
          stats->sum_square.add_(sum_square);
          stats->sum_abs.add_(sum_abs);
        }
        if (with_hessian_) {
          const at::Tensor x = rows.to(hessian_dtype_);
          stats->hessian.addmm_(x.t(), x);
        }
        stats->tokens += rows.size(0);
        return absl::OkStatus();
      });
}

const LinearInputStatistics* StatisticsCollector::Find(absl::string_view linear) const {
  auto found = statistics_.find(linear);
  return found == statistics_.end() ? nullptr : found->second.get();
}

void StatisticsCollector::Clear() {
  statistics_.clear();
  stop_after_.clear();
  previous_input_ = at::Tensor();
  previous_statistics_.reset();
}

}  // namespace compress::engine
