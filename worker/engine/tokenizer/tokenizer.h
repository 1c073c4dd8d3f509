// A tokenizer loaded from a Hugging Face tokenizer.json: byte-level BPE
// (GPT-2, Llama-3, Qwen2) and SentencePiece-style BPE with byte fallback
// (Llama-2, Mistral). Encode gives the ids HF tokenizers gives for the same
// file.
//
// Supported subset of tokenizer.json; anything else is INVALID_ARGUMENT
// naming the file, the field and the type, never a silent wrong answer:
//   model          BPE: vocab, merges ("a b" strings or [a, b] pairs),
//                  unk_token, fuse_unk, byte_fallback, ignore_merges; dropout
//                  null or 0; no continuing_subword_prefix/end_of_word_suffix.
//   added_tokens   id, content, special, lstrip, rstrip (single_word: false
//                  only); matched in the raw text, before normalization, even
//                  those marked normalized (same result unless the
//                  normalizer would change the token's own text).
//   normalizer     null, NFC (Qwen2; by ICU, see NormalizeNfc in unicode.h),
//                  Prepend, Replace (String pattern), Sequence of them.
//   pre_tokenizer  null; Split (Regex or String pattern, behavior Isolated,
//                  invert false; the regex subset is in split_regex.h);
//                  ByteLevel (use_regex: GPT-2's pattern; add_prefix_space
//                  only when it is the only pre-tokenizer); Metaspace
//                  (replacement, prepend_scheme or add_prefix_space, split)
//                  alone; Sequence of Splits optionally ending in ByteLevel.
//   decoder        null (tokens joined by spaces, as HF), ByteLevel,
//                  Metaspace, Sequence of Replace (String), ByteFallback,
//                  Fuse, Strip, ByteLevel, Metaspace.
//   post_processor read only to find the BOS token (TemplateProcessing's
//                  leading special token); Encode adds nothing but the BOS
//                  asked for. truncation and padding are ignored.
//
// Decode differs from HF tokenizers in two deliberate ways. The Metaspace
// decoder strips one leading space, the one its pre-tokenizer prepends (HF
// drops every '▁' of the first token, so "  x" loses both spaces). And
// byte-fallback and byte-level bytes that do not form valid UTF-8 are
// returned as they are, not as U+FFFD, so Decode(Encode(s)) == s for any
// bytes s (byte-level: every byte has a token; SentencePiece: byte
// fallback; invalid UTF-8 in the input counts as one character per byte).
// Exceptions inherent to the format, as in HF: ByteLevel with
// add_prefix_space (the added space stays); Metaspace on text that starts
// with a space (no '▁' is prepended, yet one space is stripped); and for
// SentencePiece, text holding '▁' itself or an added token (the text after
// it gets its own prepended '▁'); and an NFC normalizer on text that is not
// in NFC (it decodes composed: "e" U+0301 comes back as U+00E9).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace compress::engine {

class Tokenizer {
 public:
  // NOT_FOUND if the file is missing; INVALID_ARGUMENT naming the file for
  // malformed or unsupported contents. A tokenizer_config.json next to the
  // file, when there is one, sets the BOS and EOS tokens (bos_token,
  // eos_token; null means none), as transformers' AutoTokenizer does.
  static absl::StatusOr<Tokenizer> FromFile(const std::string& path);
  // `source_name` names the text in error messages.
  static absl::StatusOr<Tokenizer> FromJson(std::string_view json_text,
                                            std::string_view source_name);

  // Never fails: every byte string has an encoding. Thread-safe; words seen
  // before come from a cache shared by the copies of this tokenizer.
  std::vector<int32_t> Encode(std::string_view text, bool add_bos = false) const;
  // Ids the tokenizer does not know are skipped, as in HF tokenizers.
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  // One more than the largest id, model vocabulary and added tokens together.
  int32_t vocab_size() const;
  // From tokenizer_config.json (FromFile), else the post-processor's
  // template, else the first known name (<|begin_of_text|>, <s>, <bos>,
  // <|startoftext|>, <|endoftext|>; for EOS <|end_of_text|>, </s>, <eos>,
  // <|endoftext|>, <|im_end|>).
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  // Added tokens first, then the model's vocabulary.
  std::optional<int32_t> TokenToId(std::string_view token) const;
  // The token's text as the vocabulary spells it ("Ġthe", "▁the", "<0x0A>");
  // empty for an unknown id.
  std::string IdToToken(int32_t id) const;

  struct Impl;  // in tokenizer.cc; public only for the loader's helpers there

 private:
  explicit Tokenizer(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

  std::shared_ptr<Impl> impl_;
};

}  // namespace compress::engine
