// Training a byte-level BPE tokenizer (GPT-2 style) on a text, written out
// as a tokenizer.json that Tokenizer::FromJson and HF tokenizers both load.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace compress::engine {

struct BpeTrainerOptions {
  // The whole vocabulary: special tokens, the 256 byte tokens and one token
  // per merge. Training stops earlier when no pair is frequent enough.
  int vocab_size = 1024;
  // Added as special tokens with the first ids (0, 1, ...), in this order,
  // and cut out of the training text so that they take part in no merge.
  std::vector<std::string> special_tokens;
  // A pair seen fewer times than this (counting word frequencies) is never
  // merged.
  int64_t min_frequency = 2;
};

// HF tokenizers' BpeTrainer with the ByteLevel alphabet, step for step:
// the text is cut with GPT-2's split regex, identical words are counted, and
// the most frequent adjacent pair is merged, again and again. Ties go to the
// pair with the smaller (left id, right id), ids being: special tokens,
// then the 256 byte characters in code point order, then merges in the
// order they were made; so the merges are deterministic and the same as
// HF's. Pair counts are updated incrementally (only the words holding the
// merged pair are visited), with a lazily refreshed max-heap.
// INVALID_ARGUMENT for a vocab_size below 256 + special tokens, or a special
// token that is empty, repeated, not UTF-8 or a byte token's character.
absl::StatusOr<std::string> TrainByteLevelBpe(const std::string& text,
                                              const BpeTrainerOptions& options);

}  // namespace compress::engine
