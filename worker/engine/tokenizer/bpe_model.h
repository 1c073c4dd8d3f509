// The BPE model of a tokenizer.json ("model": {"type": "BPE", ...}): a
// vocabulary, ranked merges, and how one pre-tokenized word becomes ids.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace compress::engine {

// The largest token id a tokenizer may use. Ids index dense tables, so a
// file that gives one token the id 2^31 must be refused, not allocated
// for; the largest vocabularies in use have about 2^18 tokens.
inline constexpr int32_t kMaxTokenId = (1 << 22) - 1;

struct BpeModelSpec {
  std::vector<std::pair<std::string, int32_t>> vocab;
  std::vector<std::pair<std::string, std::string>> merges;  // in rank order
  std::optional<std::string> unk_token;
  bool fuse_unk = false;
  // A character missing from the vocabulary becomes its UTF-8 bytes as
  // <0xNN> tokens (SentencePiece's byte fallback).
  bool byte_fallback = false;
  // A word that is itself in the vocabulary is one token, merges or not
  // (Llama-3 sets this).
  bool ignore_merges = false;
  // Words arrive as raw bytes and start as one symbol per byte, spelled with
  // GPT-2's byte-to-unicode characters (the ByteLevel pre-tokenizer's job,
  // done here so that words can stay views of the input).
  bool byte_level = false;
};

class BpeModel {
 public:
  // INVALID_ARGUMENT (the caller adds the file) for a duplicate id or token,
  // a merge whose parts or result are not in the vocabulary, an unk_token
  // that is not in it.
  static absl::StatusOr<BpeModel> Create(BpeModelSpec spec);

  // Appends the ids of one word. HF tokenizers' algorithm exactly: start
  // from one symbol per character (per byte when byte-level), then apply the
  // lowest-ranked merge available anywhere in the word, leftmost first on a
  // tie, until none applies; a heap keeps each step O(log n).
  void EncodeWord(std::string_view word, std::vector<int32_t>* ids) const;

  std::optional<int32_t> TokenToId(std::string_view token) const;
  // Empty for an id the vocabulary does not have.
  std::string_view IdToToken(int32_t id) const;
  // One more than the largest id.
  int32_t id_limit() const { return static_cast<int32_t>(id_to_token_->size()); }
  bool byte_level() const { return byte_level_; }

 private:
  struct MergeResult {
    int32_t rank;
    int32_t id;
  };
  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  // Initial symbols of a word: one per character or byte, after byte
  // fallback and unknown-token handling.
  void InitialSymbols(std::string_view word, std::vector<int32_t>* symbols) const;
  void MergeSymbols(std::vector<int32_t>* symbols) const;

  // Token texts by id ("" for a hole). Held through a pointer, so that the
  // views in token_to_id_ survive moves of the model.
  std::unique_ptr<const std::vector<std::string>> id_to_token_;
  std::unordered_map<std::string_view, int32_t> token_to_id_;
  std::unordered_map<uint64_t, MergeResult> merges_;
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  bool byte_level_ = false;
  std::array<int32_t, 256> byte_symbol_ = {};  // byte-level: the id of each byte's character, or -1
  std::array<int32_t, 256> fallback_id_ = {};  // byte_fallback: the id of <0xNN>, or -1
};

}  // namespace compress::engine
