// The regex of a pre-tokenizer Split (and of ByteLevel with use_regex): finds
// the pieces a text is cut into before BPE sees it.
//
// Supported subset. The pattern is cut at its top-level '|' into alternatives,
// tried in order at each position (Perl/Oniguruma leftmost-first semantics,
// which is what HF tokenizers implements with Oniguruma):
//   - every alternative but one is handed to RE2 (so RE2 syntax: \p{L},
//     \p{N}, \p{Lu}..., classes, (?i:...), {m,n}, non-capturing groups);
//   - the one alternative `\s+(?!\S)` (the only lookaround RE2 lacks that
//     GPT-2, Llama-3, Qwen2 and GPT-4-style patterns use) is done by hand: a
//     whitespace run that is followed by a non-space gives up its last
//     character, which then starts the next piece (" b" in "a   b").
// Rewrites, because RE2's shorthands are ASCII-only where Oniguruma's are
// Unicode: \s -> Unicode White_Space, \S -> its complement (outside a class
// only), \d -> \p{Nd}.
// Rejected (INVALID_ARGUMENT naming the construct): any other lookaround
// ((?=, (?!, (?<=, (?<!), atomic groups (?>, \w \W \D \b \B \h \H \R \X \K
// \G, backreferences, a top-level flag group like (?i) that would apply
// across alternatives, \S inside [...], and whatever RE2 refuses to compile
// (possessive quantifiers, for one).
//
// Text that no alternative matches (there is none for the patterns above,
// short of invalid UTF-8, which no RE2 class matches) becomes pieces of its
// own, so the pieces always concatenate back to the text.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace re2 {
class RE2;
}

namespace compress::engine {

// GPT-2's pattern, which the ByteLevel pre-tokenizer uses when use_regex is true.
inline constexpr char kGpt2SplitPattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class SplitRegex {
 public:
  // INVALID_ARGUMENT with a message that quotes the pattern and names what is
  // unsupported (the caller adds the file and field).
  static absl::StatusOr<SplitRegex> Compile(std::string_view pattern);

  // Appends the pieces of `text` (each match, and each run of unmatched
  // text) in order; they concatenate back to `text`.
  void Split(std::string_view text, std::vector<std::string_view>* pieces) const;

  const std::string& pattern() const { return pattern_; }

 private:
  // Length of the match anchored at `pos`, or -1. An empty match counts as a
  // match (as in Perl: the character at `pos` then belongs to no match).
  int MatchAt(std::string_view text, size_t pos) const;

  std::string pattern_;
  std::shared_ptr<const re2::RE2> before_;  // alternatives before \s+(?!\S); may be null
  bool whitespace_lookahead_ = false;       // the pattern has the \s+(?!\S) alternative
  std::shared_ptr<const re2::RE2> after_;   // alternatives after it; may be null
};

}  // namespace compress::engine
