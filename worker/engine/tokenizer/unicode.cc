#include "worker/engine/tokenizer/unicode.h"

#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/stringpiece.h>
#include <unicode/utypes.h>

#include "absl/strings/str_cat.h"

namespace compress::engine {

Utf8Char DecodeUtf8(std::string_view text, size_t pos) {
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(text[i]); };
  const uint8_t lead = byte(pos);
  Utf8Char invalid{0xFFFD, 1, false};
  if (lead < 0x80) return {lead, 1, true};
  int length;
  char32_t code_point;
  char32_t min_code_point;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2, code_point = lead & 0x1F, min_code_point = 0x80;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3, code_point = lead & 0x0F, min_code_point = 0x800;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4, code_point = lead & 0x07, min_code_point = 0x10000;
  } else {
    return invalid;  // a continuation byte, an overlong lead (C0, C1) or F5..FF
  }
  if (pos + length > text.size()) return invalid;
  for (int i = 1; i < length; ++i) {
    const uint8_t next = byte(pos + i);
    if ((next & 0xC0) != 0x80) return invalid;
    code_point = (code_point << 6) | (next & 0x3F);
  }
  if (code_point < min_code_point || code_point > 0x10FFFF ||
      (code_point >= 0xD800 && code_point <= 0xDFFF)) {
    return invalid;
  }
  return {code_point, length, true};
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool IsUnicodeWhitespace(char32_t cp) {
  if (cp <= 0x20) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
  if (cp < 0x85) return false;
  return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
         cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

const ByteLevelAlphabet& ByteLevelAlphabet::Get() {
  static const ByteLevelAlphabet* const alphabet = new ByteLevelAlphabet();
  return *alphabet;
}

ByteLevelAlphabet::ByteLevelAlphabet() {
  inverse_.fill(-1);
  const auto printable = [](int b) {
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  };
  char32_t next_unprintable = 0x100;
  for (int b = 0; b < 256; ++b) {
    const char32_t cp = printable(b) ? static_cast<char32_t>(b) : next_unprintable++;
    code_points_[b] = cp;
    AppendUtf8(cp, &texts_[b]);
    inverse_[cp] = static_cast<int16_t>(b);
  }
}

absl::Status CheckNfcAvailable() {
  UErrorCode status = U_ZERO_ERROR;
  icu::Normalizer2::getNFCInstance(status);
  if (U_FAILURE(status)) {
    return absl::InternalError(
        absl::StrCat("ICU's NFC normalization data is unavailable: ", u_errorName(status)));
  }
  return absl::OkStatus();
}

std::string NormalizeNfc(std::string_view text) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(status);
  if (U_FAILURE(status)) return std::string(text);  // see CheckNfcAvailable
  std::string out;
  out.reserve(text.size());
  // Each run of valid UTF-8 goes to ICU (pure ASCII is already in NFC and
  // is copied); each invalid byte is copied alone. ICU takes int32_t
  // lengths: a longer run is cut before a character that NFC never joins
  // to what precedes it.
  constexpr size_t kMaxRun = size_t{1} << 30;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t start = pos;
    bool ascii = true;
    bool invalid = false;
    while (pos < text.size()) {
      const Utf8Char c = DecodeUtf8(text, pos);
      if (!c.valid) {
        invalid = true;
        break;
      }
      if (pos - start >= kMaxRun && nfc->hasBoundaryBefore(static_cast<UChar32>(c.code_point))) {
        break;
      }
      ascii = ascii && c.code_point < 0x80;
      pos += static_cast<size_t>(c.length);
    }
    const std::string_view run = text.substr(start, pos - start);
    if (ascii) {
      out.append(run);
    } else {
      icu::StringByteSink<std::string> sink(&out);
      status = U_ZERO_ERROR;
      nfc->normalizeUTF8(0, icu::StringPiece(run.data(), static_cast<int32_t>(run.size())), sink,
                         nullptr, status);
      if (U_FAILURE(status)) out.append(run);  // only on allocation failure
    }
    if (invalid) out.push_back(text[pos++]);
  }
  return out;
}

std::string ToValidUtf8(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    const Utf8Char c = DecodeUtf8(text, pos);
    if (c.valid) {
      out.append(text.substr(pos, static_cast<size_t>(c.length)));
    } else {
      AppendUtf8(0xFFFD, &out);
    }
    pos += static_cast<size_t>(c.length);
  }
  return out;
}

}  // namespace compress::engine
