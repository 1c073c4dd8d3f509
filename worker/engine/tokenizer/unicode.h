// The byte- and character-level helpers the tokenizer is built on: a UTF-8
// decoder that never fails (an invalid byte stands alone), Unicode whitespace
// as the HF tokenizers regexes see it, NFC normalization (ICU), and GPT-2's
// byte-to-unicode table.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace compress::engine {

struct Utf8Char {
  char32_t code_point = 0;  // U+FFFD for an invalid byte
  int length = 1;           // bytes taken from the input, 1 to 4
  bool valid = false;
};

// The character starting at text[pos] (pos < text.size()). A byte that does
// not start a well-formed sequence (shortest form, no surrogates, at most
// U+10FFFF) is returned alone as an invalid character of length 1, so that
// any byte string splits into characters that concatenate back to it.
Utf8Char DecodeUtf8(std::string_view text, size_t pos);

void AppendUtf8(char32_t code_point, std::string* out);

// `text` with every invalid byte replaced by U+FFFD: what may go into a
// protobuf string or JSON (a generated sample can end mid-character).
std::string ToValidUtf8(std::string_view text);

// Unicode White_Space (what \s means to Oniguruma, which HF tokenizers uses):
// U+0009-U+000D, U+0020, U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028,
// U+2029, U+202F, U+205F, U+3000.
bool IsUnicodeWhitespace(char32_t code_point);

// The same set as the body of a regex character class (RE2 syntax), for
// rewriting \s, whose RE2 meaning is ASCII only.
inline constexpr char kWhitespaceClassBody[] =
    R"(\t\n\x0B\f\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";

// Unicode Normalization Form C (canonical decomposition, then canonical
// composition: "e" U+0301 becomes U+00E9), what HF tokenizers' NFC
// normalizer does, computed by ICU. Invalid bytes are kept as they are and
// cut the text into runs that are normalized separately (HF only sees valid
// UTF-8), so ASCII and other text already in NFC come back unchanged.
std::string NormalizeNfc(std::string_view text);
// OK when ICU's normalization data loads; INTERNAL naming ICU's error
// otherwise. A tokenizer with an NFC normalizer checks this when it loads,
// so NormalizeNfc, which returns its input unchanged in that case, never
// runs without it.
absl::Status CheckNfcAvailable();

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes ('!'..'~', U+00A1..U+00AC,
// U+00AE..U+00FF) map to themselves, the other 68 bytes, in byte order, to
// U+0100, U+0101, ... so that every byte is a visible character (space is 'Ġ').
class ByteLevelAlphabet {
 public:
  static const ByteLevelAlphabet& Get();

  char32_t CodePoint(uint8_t byte) const { return code_points_[byte]; }
  // The UTF-8 text of CodePoint(byte).
  const std::string& Text(uint8_t byte) const { return texts_[byte]; }
  // The byte whose character is `code_point`, or -1 if none.
  int Byte(char32_t code_point) const {
    return code_point < inverse_.size() ? inverse_[code_point] : -1;
  }

 private:
  ByteLevelAlphabet();

  std::array<char32_t, 256> code_points_{};
  std::array<std::string, 256> texts_;
  std::array<int16_t, 324> inverse_{};  // every mapped code point is below 0x144
};

}  // namespace compress::engine
