// A model's tokenizer.json as GGUF's tokenizer.ggml.* metadata: byte-level
// BPE (GPT-2, Llama-3 and Qwen2 style) as llama.cpp's "gpt2" model with
// merges and its "gpt-2", "llama-bpe" or "qwen2" pre-tokenizer;
// SentencePiece-style BPE with byte fallback (Llama-2, Mistral) as its
// "llama" model, whose tokenizer merges the adjacent pair whose token has
// the highest score: each token scores minus the rank of the first merge
// that makes it, so the pairs merge in the order tokenizer.json lists them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace compress::engine {

// llama.cpp's llama_token_type values (tokenizer.ggml.token_type).
enum class GgufTokenType : int32_t {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

struct GgufVocabulary {
  std::string model;                // tokenizer.ggml.model: "gpt2" or "llama"
  std::string pre;                  // tokenizer.ggml.pre: "gpt-2", "llama-bpe", "qwen2", "default"
  std::vector<std::string> tokens;  // by id, vocab_size of them
  std::vector<int32_t> token_types;
  std::vector<std::string> merges;  // "a b", in priority order ("gpt2" only)
  std::vector<float> scores;        // "llama" only: one per token
  bool add_space_prefix = false;    // "llama" only: a "▁" before the text
  std::optional<int32_t> bos_id;
  std::optional<int32_t> eos_id;
  std::optional<int32_t> padding_id;
  std::optional<int32_t> unknown_id;
  bool add_bos = false;  // tokenizer.ggml.add_bos_token
  std::string chat_template;  // tokenizer.chat_template; empty: none
};

// Reads `tokenizer_json` (tokenizer_config.json next to it, when present,
// names BOS/EOS/padding, add_bos_token and the chat template). `vocab_size`
// is the model's (config.json): ids the tokenizer lacks below it become
// "[PAD<id>]" unused tokens, as the converter writes them. Added tokens are
// control tokens when marked special or when they look special to the
// converter ("<|...|>"), user-defined otherwise. INVALID_ARGUMENT naming
// the file for a tokenizer GGUF export does not handle (byte-level
// pre-tokenizers other than GPT-2's, Llama-3's and Qwen2's, byte-level ones
// with a normalizer other than NFC, which llama.cpp does not apply: text
// already in NFC tokenizes the same; SentencePiece-style ones with a
// pre-tokenizer or a normalizer other than Prepend/Replace of "▁"), a
// vocabulary larger than vocab_size, or a malformed file.
absl::StatusOr<GgufVocabulary> ReadGgufVocabulary(const std::string& tokenizer_json,
                                                  int64_t vocab_size);

}  // namespace compress::engine
