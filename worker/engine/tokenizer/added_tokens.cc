#include "worker/engine/tokenizer/added_tokens.h"

#include <algorithm>

#include "worker/engine/tokenizer/unicode.h"

namespace compress::engine {
namespace {

// Bytes of whitespace that end `text` (Unicode White_Space, as Rust's
// char::is_whitespace that HF uses for lstrip).
size_t TrailingWhitespace(std::string_view text) {
  size_t end = text.size();
  while (end > 0) {
    size_t length = 0;
    // A character ending at `end` is 1 to 4 bytes long.
    for (size_t k = 1; k <= 4 && k <= end; ++k) {
      const Utf8Char c = DecodeUtf8(text, end - k);
      if (c.valid && static_cast<size_t>(c.length) == k) {
        if (IsUnicodeWhitespace(c.code_point)) length = k;
        break;
      }
    }
    if (length == 0) break;
    end -= length;
  }
  return text.size() - end;
}

size_t LeadingWhitespace(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    const Utf8Char c = DecodeUtf8(text, pos);
    if (!c.valid || !IsUnicodeWhitespace(c.code_point)) break;
    pos += c.length;
  }
  return pos;
}

}  // namespace

AddedTokenMatcher::AddedTokenMatcher(std::vector<AddedToken> tokens) : tokens_(std::move(tokens)) {
  for (size_t i = 0; i < tokens_.size(); ++i) {
    if (tokens_[i].content.empty()) continue;
    by_first_byte_[static_cast<uint8_t>(tokens_[i].content[0])].push_back(static_cast<int>(i));
  }
  for (std::vector<int>& candidates : by_first_byte_) {
    std::stable_sort(candidates.begin(), candidates.end(), [&](int a, int b) {
      return tokens_[a].content.size() > tokens_[b].content.size();
    });
  }
}

void AddedTokenMatcher::Split(std::string_view text, std::vector<Segment>* segments) const {
  size_t plain_start = 0;  // start of the plain text not yet emitted
  size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* match = nullptr;
    for (int index : by_first_byte_[static_cast<uint8_t>(text[pos])]) {
      const AddedToken& token = tokens_[index];
      if (text.compare(pos, token.content.size(), token.content) == 0) {
        match = &token;
        break;
      }
    }
    if (match == nullptr) {
      ++pos;
      continue;
    }
    size_t match_start = pos;
    size_t match_end = pos + match->content.size();
    if (match->lstrip) {
      match_start -= TrailingWhitespace(text.substr(plain_start, match_start - plain_start));
    }
    if (match->rstrip) match_end += LeadingWhitespace(text.substr(match_end));
    if (match_start > plain_start) {
      segments->push_back({text.substr(plain_start, match_start - plain_start), nullptr});
    }
    segments->push_back({text.substr(match_start, match_end - match_start), match});
    plain_start = pos = match_end;
  }
  if (plain_start < text.size()) segments->push_back({text.substr(plain_start), nullptr});
}

}  // namespace compress::engine
