// A Llama-family checkpoint as a GGUF file llama.cpp loads without a
// conversion step: Llama and Mistral as its "llama" architecture (q/k rows
// reordered for its rope), Qwen2 as its "qwen2" architecture (q/k/v biases,
// rows as they are); the <arch>.* hyper-parameters, the tokenizer,
// llama.cpp's tensor names, each matrix in its preset's type. A tied
// checkpoint (no lm_head.weight) has no output.weight: llama.cpp then uses
// token_embd for the output too. Tensors stream through: declared up
// front, written one at a time.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/gguf_file.h"
#include "common/gguf_types.h"
#include "worker/engine/gguf/gguf_vocabulary.h"
#include "worker/engine/model/llama_config.h"

namespace compress::engine {

struct GgufExportOptions {
  GgufPreset preset = kGgufPresets[10];  // Q4_K_M
  std::string model_name;                // general.name
};

// A checkpoint tensor, in the order the writer will be given them.
struct GgufSourceTensor {
  std::string name;  // Hugging Face name
  std::vector<int64_t> shape;
};

class GgufModelWriter {
 public:
  // llama3 rope scaling is written as llama.cpp's rope_freqs tensor (first).
  // BOS/EOS ids the vocabulary lacks are taken from the config. INVALID_ARGUMENT
  // for a model the architecture cannot describe (Qwen2 with
  // num_attention_heads * head_dim != hidden_size, or llama3 rope scaling),
  // a tensor it has no name for that is not a rotary buffer, or anything
  // GgufWriter::Open refuses.
  static absl::StatusOr<GgufModelWriter> Open(const std::string& path, const LlamaConfig& config,
                                              const GgufVocabulary& vocabulary,
                                              const std::vector<GgufSourceTensor>& tensors,
                                              const GgufExportOptions& options);
  GgufModelWriter(GgufModelWriter&&) = default;

  // Whether the file holds `hf_name` (rotary caches are left out).
  bool Includes(const std::string& hf_name) const;
  // The next tensor's final values (any float dtype, the checkpoint's
  // shape). `importance`: undefined, or one non-negative weight per input
  // column for the quantizers' error search.
  absl::Status Write(const std::string& hf_name, const at::Tensor& values,
                     const at::Tensor& importance);
  absl::Status Commit();

  const GgufHeader& header() const { return writer_.header(); }
  // The written file's sha256; set by Commit.
  const std::string& sha256() const { return writer_.sha256(); }
  // The type each tensor got, by GGUF name, in file order.
  const std::vector<GgufTensorSpec>& tensors() const { return specs_; }

 private:
  GgufModelWriter(GgufWriter writer, std::vector<GgufTensorSpec> specs, const LlamaConfig& config)
      : writer_(std::move(writer)), specs_(std::move(specs)), config_(config) {}
  GgufWriter writer_;
  std::vector<GgufTensorSpec> specs_;
  LlamaConfig config_;
  size_t next_ = 0;
};

// The checkpoint an exported GGUF file holds, back in Hugging Face names,
// shapes and row order, as float32 CPU tensors (what llama.cpp computes
// with). For measuring an export with the project's own runtime.
// INVALID_ARGUMENT when the file's general.architecture is not the one
// `config`'s family is written as.
absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> ReadGgufAsLlamaTensors(
    const std::string& path, const LlamaConfig& config);

}  // namespace compress::engine
