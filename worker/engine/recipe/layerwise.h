// The layer-wise runner (../../../../shared/ARCHITECTURE.md): one decoder
// block resident at a time. For each block: load it from the mmapped
// checkpoint, run the calibration activations through it collecting
// per-linear input statistics, let the methods change its weights, propagate
// the activations to the next block, hand the finished block on and drop it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "worker/engine/model/llama_config.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/model/safetensors_reader.h"
#include "worker/engine/recipe/calibration.h"

namespace compress::engine {

enum class PropagationMode {
  // Through the compressed block: each block is calibrated on what the
  // compressed model really feeds it.
  kSequential,
  // Through the original block: every block sees the original model's
  // activations, so blocks do not depend on each other's compression.
  kParallel,
};

struct LayerwiseOptions {
  at::Device device = at::kCPU;
  // Blocks run in this dtype (the activations' and statistics' precision).
  at::ScalarType compute_dtype = at::kFloat;
  // Blocks are held in this dtype; each weight is converted to compute_dtype
  // as it is used. Unset: the dtype the checkpoint stores (a BF16 block then
  // takes half the memory of its float32 copy).
  std::optional<at::ScalarType> weights_dtype;
  // [samples, sequence] token ids; undefined: no calibration (statistics
  // are not collected and nothing is propagated).
  at::Tensor calibration_ids;
  PropagationMode propagation = PropagationMode::kSequential;
  // Linears (names inside a block, kBlockLinears) whose input statistics are
  // collected; with_hessian adds X^T X in hessian_dtype.
  std::set<std::string> statistics_for;
  // With calibration and LayerwiseCallbacks::prepare: the linears whose
  // input statistics (with X^T X) prepare receives, from one pass over the
  // block as loaded, before any step.
  std::set<std::string> prepare_statistics_for;
  // Calibration samples (spread evenly over all of them) that prepare's
  // BlockProbe runs a candidate block on.
  int64_t probe_samples = 32;
  bool with_hessian = true;
  at::ScalarType hessian_dtype = at::kFloat;
  // With calibration: the linears are changed in four steps (q/k/v_proj,
  // o_proj, gate/up_proj, down_proj), each step's statistics collected with
  // the earlier steps' linears already changed, so that each linear is fitted
  // to the inputs the compressed block will really give it. false: one step,
  // every statistic from the original block.
  bool sequential_linears = true;
  // Calibration samples per forward pass (bounds the attention's memory).
  int64_t samples_per_pass = 8;
  // Blocks [first_layer, end_layer) are run; end_layer < 0: to the last.
  // The calibration activations are still computed through the blocks
  // before first_layer (original weights).
  int64_t first_layer = 0;
  int64_t end_layer = -1;
  std::function<bool()> is_cancelled;
};

// The finished statistics of one block, by linear name.
using BlockStatistics = StatisticsCollector;

// The steps of sequential_linears, in forward order.
inline const std::vector<std::vector<std::string>>& SequentialLinearSteps() {
  static const auto* steps = new std::vector<std::vector<std::string>>{
      {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"},
      {"self_attn.o_proj"},
      {"mlp.gate_proj", "mlp.up_proj"},
      {"mlp.down_proj"}};
  return *steps;
}

// The squared difference (summed in float64) between a candidate block's
// outputs and the block's as loaded, on probe_samples calibration samples.
using BlockProbe = std::function<absl::StatusOr<double>(const DecoderBlockWeights& candidate)>;

struct LayerwiseCallbacks {
  // Optional, with calibration: changes the block before its steps (for
  // example rescaling it without changing its function), given the input
  // statistics of prepare_statistics_for on the block as loaded and a probe
  // that measures candidate blocks. The steps' statistics are then taken on
  // the prepared block.
  std::function<absl::Status(DecoderBlockWeights& block, const BlockStatistics& statistics,
                             const BlockProbe& probe)>
      prepare;
  // Changes the weights of `linears` (names inside the block) in place
  // (replace or edit the tensors; keep shapes, dtype and device), using the
  // statistics of their inputs. Called once per step and block; without
  // calibration or with sequential_linears off, once per block with all
  // seven linears. Required.
  std::function<absl::Status(DecoderBlockWeights& block, const BlockStatistics& statistics,
                             const std::vector<std::string>& linears)>
      transform;
  // Receives the finished block (the weights the next block's activations
  // were propagated through, in sequential mode). Required.
  std::function<absl::Status(const DecoderBlockWeights& block)> finished;
  // Optional: whether a layer of the range is already done (a checkpoint
  // from an earlier attempt). Such a layer gets no statistics, no transform
  // and no `finished`; its activations still reach the next block: in
  // parallel mode through the block as loaded, in sequential mode through
  // the block as `restore` leaves it (required then: it puts the finished
  // weights into the block).
  std::function<bool(int64_t layer)> checkpointed;
  std::function<absl::Status(DecoderBlockWeights& block)> restore;
};

// Runs the blocks of the checkpoint in order. `config` must describe the
// checkpoint (ValidateLlamaCheckpoint is applied first). The embeddings are
// loaded only to embed the calibration samples, then dropped; resident
// memory is one block, its statistics and the calibration activations
// ([samples, sequence, hidden], updated in place: samples are independent;
// twice that in parallel mode with sequential_linears). Each block runs once
// per step for the statistics (four steps with sequential_linears, else
// one), plus once more in sequential mode to propagate through the changed
// weights. CANCELLED when
// is_cancelled says so (polled between passes); INVALID_ARGUMENT for ids
// outside the vocabulary or a bad layer range; what the callbacks return.
absl::Status RunLayerwise(const SafetensorsCheckpoint& checkpoint, const LlamaConfig& config,
                          const LayerwiseOptions& options, const LayerwiseCallbacks& callbacks);

}  // namespace compress::engine
