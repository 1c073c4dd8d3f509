#include "worker/engine/recipe/layerwise.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/engine/model/tensor_dtype.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {

namespace {

constexpr char kEmbedTokens[] = "model.embed_tokens.weight";

// Runs `block` over every sample of `hidden` in passes of samples_per_pass,
// writing the outputs into `output` (which may be `hidden` itself: samples
// are independent) or dropping them (null: a pass for statistics only).
absl::Status RunBlock(const LlamaConfig& config, const DecoderBlockWeights& block,
                      const at::Tensor& hidden, const RotaryCache& rope,
                      const LayerwiseOptions& options, LinearHook* hook, at::Tensor* output) {
  const int64_t samples = hidden.size(0);
  const int64_t step = std::max<int64_t>(options.samples_per_pass, 1);
  for (int64_t begin = 0; begin < samples; begin += step) {
    if (options.is_cancelled && options.is_cancelled()) return absl::CancelledError("job cancelled");
    const int64_t count = std::min(step, samples - begin);
    absl::StatusOr<at::Tensor> out =
        DecoderBlockForward(config, block, hidden.narrow(0, begin, count), rope, nullptr, hook);
    if (output == nullptr && StatisticsCollector::StoppedEarly(out.status())) continue;
    RETURN_IF_ERROR(out.status());
    if (output == nullptr) continue;
    RETURN_IF_ERROR(CatchTorchErrors(absl::StrCat("layer ", block.layer, " propagation"),
                                     [&]() -> absl::Status {
                                       output->narrow(0, begin, count).copy_(*out);
                                       return absl::OkStatus();
                                     }));
  }
  return absl::OkStatus();
}

// The block's outputs on `inputs`, in passes of samples_per_pass.
absl::StatusOr<at::Tensor> BlockOutputs(const LlamaConfig& config, const DecoderBlockWeights& block,
                                        const at::Tensor& inputs, const RotaryCache& rope,
                                        const LayerwiseOptions& options) {
  at::Tensor outputs;
  RETURN_IF_ERROR(CatchTorchErrors("block probe", [&]() -> absl::Status {
    outputs = at::empty_like(inputs);
    return absl::OkStatus();
  }));
  RETURN_IF_ERROR(RunBlock(config, block, inputs, rope, options, nullptr, &outputs));
  return outputs;
}

// At most `count` of the samples, spread evenly over them, as a copy.
absl::StatusOr<at::Tensor> ProbeInputs(const at::Tensor& hidden, int64_t count) {
  return CatchTorchErrors("block probe", [&]() -> absl::StatusOr<at::Tensor> {
    const int64_t samples = hidden.size(0);
    const int64_t step = std::max<int64_t>(1, samples / std::max<int64_t>(count, 1));
    return hidden.slice(0, 0, samples, step).narrow(0, 0, std::min(count, (samples + step - 1) / step)).contiguous();
  });
}

}  // namespace

absl::Status RunLayerwise(const SafetensorsCheckpoint& checkpoint, const LlamaConfig& config,
                          const LayerwiseOptions& options, const LayerwiseCallbacks& callbacks) {
  if (!callbacks.transform || !callbacks.finished) {
    return absl::InvalidArgumentError("layer-wise runner: transform and finished are required");
  }
  RETURN_IF_ERROR(ValidateLlamaCheckpoint(config, checkpoint));
  const int64_t layers = config.num_hidden_layers;
  const int64_t end = options.end_layer < 0 ? layers : options.end_layer;
  if (options.first_layer < 0 || options.first_layer > end || end > layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer range [", options.first_layer, ", ", end,
                                                   ") is not within [0, ", layers, "]"));
  }
  const bool calibrating = options.calibration_ids.defined();

  at::Tensor hidden;
  RotaryCache rope;
  if (calibrating) {
    if (options.calibration_ids.dim() != 2 || options.calibration_ids.size(0) < 1 ||
        options.calibration_ids.size(1) < 1) {
      return absl::InvalidArgumentError(
          "calibration ids must be [samples, sequence] with both at least 1");
    }
    {
      // Only the samples' rows are read from the mapping, not the whole table.
      ASSIGN_OR_RETURN(const at::Tensor embed_tokens, checkpoint.View(kEmbedTokens));
      ASSIGN_OR_RETURN(const at::Tensor rows, Embed(embed_tokens, options.calibration_ids));
      ASSIGN_OR_RETURN(hidden, CatchTorchErrors("calibration embeddings", [&]() -> absl::StatusOr<at::Tensor> {
                         return rows.to(options.device, options.compute_dtype, false, /*copy=*/true);
                       }));
    }
    checkpoint.ReleasePages(kEmbedTokens);
    ASSIGN_OR_RETURN(rope, MakeRotaryCache(config, 0, hidden.size(1), options.device,
                                           options.compute_dtype));
  }

  at::ScalarType weights_dtype = options.compute_dtype;
  if (options.weights_dtype) {
    weights_dtype = *options.weights_dtype;
  } else if (const CheckpointTensor* q = checkpoint.Find(BlockTensorName(0, "self_attn.q_proj.weight"))) {
    weights_dtype = ToScalarType(q->info.dtype).value_or(options.compute_dtype);
  }
  StatisticsCollector statistics(options.statistics_for, options.with_hessian,
                                 options.hessian_dtype);
  StatisticsCollector prepare_statistics(options.prepare_statistics_for, /*with_hessian=*/true,
                                         options.hessian_dtype);
  for (int64_t layer = 0; layer < end; ++layer) {
    if (options.is_cancelled && options.is_cancelled()) return absl::CancelledError("job cancelled");
    ASSIGN_OR_RETURN(DecoderBlockWeights block,
                     LoadDecoderBlock(checkpoint, config, layer, options.device, weights_dtype));
    if (layer < options.first_layer) {
      // Only bringing the activations to the first block of the range.
      if (calibrating) {
        RETURN_IF_ERROR(RunBlock(config, block, hidden, rope, options, nullptr, &hidden));
      }
      continue;
    }
    const bool parallel = calibrating && options.propagation == PropagationMode::kParallel;
    if (callbacks.checkpointed && callbacks.checkpointed(layer)) {
      if (calibrating && !parallel) {
        if (!callbacks.restore) {
          return absl::InvalidArgumentError("layer-wise runner: checkpointed needs restore");
        }
        RETURN_IF_ERROR(callbacks.restore(block));
        RETURN_IF_ERROR(ValidateBlockWeights(config, block));
      }
      if (calibrating) RETURN_IF_ERROR(RunBlock(config, block, hidden, rope, options, nullptr, &hidden));
      continue;
    }
    // Parallel: the original block's outputs, from the block's first pass,
    // kept apart until the block is done when later passes still need the
    // block's inputs (else written over them).
    const bool single_pass = !callbacks.prepare && !options.sequential_linears;
    at::Tensor original_outputs;
    bool first_pass = true;
    // A pass that only measures stops after `last`, the last linear it needs.
    auto statistics_pass = [&](StatisticsCollector& collector, const std::string& last) {
      const bool keep_outputs = parallel && first_pass;
      first_pass = false;
      at::Tensor* outputs = nullptr;
      if (keep_outputs && single_pass) {
        outputs = &hidden;
      } else if (keep_outputs) {
        absl::Status allocated = CatchTorchErrors("calibration activations", [&]() -> absl::Status {
          original_outputs = at::empty_like(hidden);
          return absl::OkStatus();
        });
        if (!allocated.ok()) return allocated;
        outputs = &original_outputs;
      } else {
        collector.StopAfter(last);
      }
      return RunBlock(config, block, hidden, rope, options, &collector, outputs);
    };
    if (calibrating && callbacks.prepare) {
      prepare_statistics.Clear();
      RETURN_IF_ERROR(statistics_pass(prepare_statistics, kBlockLinears.back().name));
      ASSIGN_OR_RETURN(const at::Tensor probe_inputs, ProbeInputs(hidden, options.probe_samples));
      ASSIGN_OR_RETURN(const at::Tensor reference,
                       BlockOutputs(config, block, probe_inputs, rope, options));
      const BlockProbe probe = [&](const DecoderBlockWeights& candidate) -> absl::StatusOr<double> {
        ASSIGN_OR_RETURN(const at::Tensor outputs,
                         BlockOutputs(config, candidate, probe_inputs, rope, options));
        return CatchTorchErrors("block probe", [&]() -> absl::StatusOr<double> {
          return (outputs.to(at::kDouble) - reference.to(at::kDouble)).square().sum().item<double>();
        });
      };
      RETURN_IF_ERROR(callbacks.prepare(block, prepare_statistics, probe));
      prepare_statistics.Clear();
    }
    if (!calibrating || !options.sequential_linears) {
      std::vector<std::string> all;
      for (const BlockLinear& linear : kBlockLinears) all.push_back(linear.name);
      statistics.Clear();
      if (calibrating) RETURN_IF_ERROR(statistics_pass(statistics, all.back()));
      RETURN_IF_ERROR(callbacks.transform(block, statistics, all));
    } else {
      for (const std::vector<std::string>& step : SequentialLinearSteps()) {
        statistics.Clear();
        RETURN_IF_ERROR(statistics_pass(statistics, step.back()));
        RETURN_IF_ERROR(callbacks.transform(block, statistics, step));
      }
    }
    if (original_outputs.defined()) hidden = original_outputs;
    RETURN_IF_ERROR(ValidateBlockWeights(config, block));
    statistics.Clear();  // the Hessians can be large: gone before propagating
    if (calibrating && options.propagation == PropagationMode::kSequential) {
      RETURN_IF_ERROR(RunBlock(config, block, hidden, rope, options, nullptr, &hidden));
    }
    RETURN_IF_ERROR(callbacks.finished(block));
  }
  return absl::OkStatus();
}

}  // namespace compress::engine
