// Added tokens ("added_tokens" in tokenizer.json: <|begin_of_text|>, <s>,
// ...): found in the raw text before anything else runs, so that the
// normalizer, the pre-tokenizer and BPE never see them.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace compress::engine {

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;  // Decode(..., skip_special=true) drops it
  bool lstrip = false;   // the match also takes the whitespace before it
  bool rstrip = false;   // ... and after it
};

class AddedTokenMatcher {
 public:
  AddedTokenMatcher() = default;
  explicit AddedTokenMatcher(std::vector<AddedToken> tokens);

  struct Segment {
    std::string_view text;              // plain text, or the matched span
    const AddedToken* token = nullptr;  // null for plain text
  };
  // Cuts `text` into plain segments and matches, leftmost first and, at one
  // position, longest first (as HF's Aho-Corasick LeftmostLongest does).
  // Empty plain segments are left out.
  void Split(std::string_view text, std::vector<Segment>* segments) const;

  const std::vector<AddedToken>& tokens() const { return tokens_; }

 private:
  std::vector<AddedToken> tokens_;
  // For each first byte, the indices of the tokens that start with it,
  // longest first.
  std::array<std::vector<int>, 256> by_first_byte_;
};

}  // namespace compress::engine
