#include "worker/engine/tokenizer/split_regex.h"

#include <re2/re2.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "worker/engine/tokenizer/unicode.h"

namespace compress::engine {
namespace {

constexpr std::string_view kWhitespaceLookahead = R"(\s+(?!\S))";

struct Alternative {
  std::string raw;        // as written in the pattern
  std::string rewritten;  // in RE2 syntax with Unicode \s and \d
  bool has_lookaround = false;
};

absl::Status Unsupported(std::string_view pattern, absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("regex '", std::string(pattern), "': ", what, " is not supported"));
}

// Cuts `pattern` at its top-level '|' and rewrites the shorthands whose RE2
// meaning differs from Oniguruma's. A small scanner, not a parser: it tracks
// escapes, character classes and parenthesis depth, which is all that the
// cut and the rewrites depend on; RE2 checks the rest when it compiles.
absl::StatusOr<std::vector<Alternative>> ScanAlternatives(std::string_view pattern) {
  std::vector<Alternative> alternatives(1);
  int depth = 0;
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    Alternative& alt = alternatives.back();
    const char c = pattern[i];
    if (c == '\\') {
      if (i + 1 == pattern.size()) return Unsupported(pattern, "a trailing backslash");
      const char e = pattern[++i];
      alt.raw += pattern.substr(i - 1, 2);
      switch (e) {
        case 's':
          alt.rewritten += in_class ? std::string(kWhitespaceClassBody)
                                    : absl::StrCat("[", kWhitespaceClassBody, "]");
          break;
        case 'S':
          if (in_class) return Unsupported(pattern, "\\S inside a character class");
          alt.rewritten += absl::StrCat("[^", kWhitespaceClassBody, "]");
          break;
        case 'd':
          alt.rewritten += R"(\p{Nd})";
          break;
        case 'w':
        case 'W':
        case 'D':
        case 'b':
        case 'B':
        case 'h':
        case 'H':
        case 'R':
        case 'X':
        case 'K':
        case 'G':
          return Unsupported(pattern, absl::StrCat("\\", std::string(1, e)));
        default:
          if (e >= '1' && e <= '9') return Unsupported(pattern, "a backreference");
          alt.rewritten += pattern.substr(i - 1, 2);
      }
      continue;
    }
    alt.raw += c;
    alt.rewritten += c;
    if (in_class) {
      if (c == '[' && i + 1 < pattern.size() && pattern[i + 1] == ':') {
        // A POSIX class such as [:alpha:]: copy it whole so its ']' does not
        // end the enclosing class.
        const size_t close = pattern.find(":]", i + 2);
        if (close == std::string_view::npos) return Unsupported(pattern, "an unclosed '[:'");
        const std::string_view posix = pattern.substr(i + 1, close + 2 - (i + 1));
        alt.raw += posix;
        alt.rewritten += posix;
        i = close + 1;
      } else if (c == ']') {
        in_class = false;
      }
      continue;
    }
    if (c == '[') {
      in_class = true;
      // A ']' right after '[' or '[^' is a literal, not the end of the class.
      for (int k = 0; k < 2 && i + 1 < pattern.size(); ++k) {
        const char next = pattern[i + 1];
        if ((k == 0 && next == '^') || next == ']') {
          alt.raw += next;
          alt.rewritten += next;
          ++i;
          if (next == ']') break;
        } else {
          break;
        }
      }
    } else if (c == '(') {
      const std::string_view rest = pattern.substr(i + 1);
      if (rest.substr(0, 2) == "?=" || rest.substr(0, 2) == "?!" || rest.substr(0, 3) == "?<=" ||
          rest.substr(0, 3) == "?<!") {
        alt.has_lookaround = true;
      } else if (rest.substr(0, 2) == "?>") {
        return Unsupported(pattern, "an atomic group (?>...)");
      } else if (depth == 0 && rest.substr(0, 1) == "?") {
        // (?i) at the top level would apply to every later alternative,
        // which cutting at '|' would break; (?i:...) is fine.
        size_t k = 1;
        while (k < rest.size() &&
               std::string_view("imsxU-").find(rest[k]) != std::string_view::npos)
          ++k;
        if (k > 1 && k < rest.size() && rest[k] == ')') {
          return Unsupported(pattern, "a top-level flag group such as (?i)");
        }
      }
      ++depth;
    } else if (c == ')') {
      --depth;
    } else if (c == '|' && depth == 0) {
      alt.raw.pop_back();
      alt.rewritten.pop_back();
      alternatives.emplace_back();
    }
  }
  return alternatives;
}

absl::StatusOr<std::shared_ptr<const re2::RE2>> CompileAlternatives(
    std::string_view pattern, const std::vector<std::string>& alternatives) {
  if (alternatives.empty()) return std::shared_ptr<const re2::RE2>();
  re2::RE2::Options options;
  options.set_log_errors(false);
  auto re = std::make_shared<const re2::RE2>(absl::StrJoin(alternatives, "|"), options);
  if (!re->ok()) {
    return absl::InvalidArgumentError(absl::StrCat("regex '", std::string(pattern),
                                                   "' is not supported: RE2 says: ", re->error()));
  }
  return re;
}

// The hand-made `\s+(?!\S)`: the longest whitespace run at `pos` that is
// not followed by a non-space character. Backtracking gives exactly this: a
// run that ends the text matches whole; a longer run followed by a non-space
// matches all but its last character; a single space before a non-space
// does not match (and the next alternative, `\s+` or ` ?\p{L}+`, takes it).
int MatchWhitespaceNotBeforeNonSpace(std::string_view text, size_t pos) {
  size_t end = pos;
  size_t last_start = pos;
  while (end < text.size()) {
    const Utf8Char c = DecodeUtf8(text, end);
    if (!c.valid || !IsUnicodeWhitespace(c.code_point)) break;
    last_start = end;
    end += c.length;
  }
  if (end == pos) return -1;
  if (end == text.size()) return static_cast<int>(end - pos);
  return last_start > pos ? static_cast<int>(last_start - pos) : -1;
}

}  // namespace

absl::StatusOr<SplitRegex> SplitRegex::Compile(std::string_view pattern) {
  absl::StatusOr<std::vector<Alternative>> alternatives = ScanAlternatives(pattern);
  if (!alternatives.ok()) return alternatives.status();
  SplitRegex split;
  split.pattern_ = std::string(pattern);
  std::vector<std::string> before, after;
  for (const Alternative& alt : *alternatives) {
    if (alt.raw == kWhitespaceLookahead && !split.whitespace_lookahead_) {
      split.whitespace_lookahead_ = true;
      continue;
    }
    if (alt.has_lookaround) {
      return Unsupported(pattern, absl::StrCat("the lookaround in '", alt.raw,
                                               "' (only the alternative \\s+(?!\\S) is)"));
    }
    (split.whitespace_lookahead_ ? after : before).push_back(alt.rewritten);
  }
  absl::StatusOr<std::shared_ptr<const re2::RE2>> re = CompileAlternatives(pattern, before);
  if (!re.ok()) return re.status();
  split.before_ = *std::move(re);
  re = CompileAlternatives(pattern, after);
  if (!re.ok()) return re.status();
  split.after_ = *std::move(re);
  return split;
}

int SplitRegex::MatchAt(std::string_view text, size_t pos) const {
  const re2::StringPiece input(text.data(), text.size());
  re2::StringPiece match;
  if (before_ != nullptr &&
      before_->Match(input, pos, text.size(), re2::RE2::ANCHOR_START, &match, 1)) {
    return static_cast<int>(match.size());
  }
  if (whitespace_lookahead_) {
    const int length = MatchWhitespaceNotBeforeNonSpace(text, pos);
    if (length > 0) return length;
  }
  if (after_ != nullptr &&
      after_->Match(input, pos, text.size(), re2::RE2::ANCHOR_START, &match, 1)) {
    return static_cast<int>(match.size());
  }
  return -1;
}

void SplitRegex::Split(std::string_view text, std::vector<std::string_view>* pieces) const {
  size_t pos = 0;
  size_t gap_start = std::string_view::npos;
  const auto flush_gap = [&] {
    if (gap_start != std::string_view::npos) {
      pieces->push_back(text.substr(gap_start, pos - gap_start));
      gap_start = std::string_view::npos;
    }
  };
  while (pos < text.size()) {
    const int length = MatchAt(text, pos);
    if (length > 0) {
      flush_gap();
      pieces->push_back(text.substr(pos, length));
      pos += length;
    } else {
      // No match here, or an empty one: the character belongs to no match,
      // as when a regex search moves on by one character.
      if (gap_start == std::string_view::npos) gap_start = pos;
      pos += DecodeUtf8(text, pos).length;
    }
  }
  flush_gap();
}

}  // namespace compress::engine
