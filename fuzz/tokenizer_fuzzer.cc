// Fuzzes the tokenizer.json loader (Tokenizer::FromJson) and, when a file
// loads, Encode and Decode. The input is a tokenizer.json, optionally
// followed by a NUL byte and a text to encode besides the fixed ones below.
// Besides "no crash, no sanitizer report", it checks: a refusal is
// INVALID_ARGUMENT; every id Encode gives, and the BOS and EOS ids, are
// below vocab_size(); Decode takes any ids, known or not.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz/fuzz_check.h"
#include "worker/engine/tokenizer/tokenizer.h"

namespace {

// Plain, spaced, special-token, multi-byte, invalid UTF-8 and empty text.
constexpr std::string_view kTexts[] = {
    "Hello world",
    "  In the beginning God created\tthe heaven\n\nand the earth.  ",
    "<|begin_of_text|>Hi<|end_of_text|></s><s> <unk>",
    "caf\xC3\xA9 \xE2\x96\x81na\xC3\xAFve \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80 12345",
    "\xFF\xFE\xC0\x80 \xED\xA0\x80\xF4\x90\x80\x80 tail",
    "",
};

void CheckEncoding(const compress::engine::Tokenizer& tokenizer, std::string_view text,
                   bool add_bos) {
  const std::vector<int32_t> ids = tokenizer.Encode(text, add_bos);
  for (int32_t id : ids) {
    FUZZ_CHECK(
        id >= 0 && id < tokenizer.vocab_size(),
        "id " + std::to_string(id) + " of vocab_size " + std::to_string(tokenizer.vocab_size()));
  }
  static_cast<void>(tokenizer.Decode(ids));
  static_cast<void>(tokenizer.Decode(ids, /*skip_special=*/true));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using compress::engine::Tokenizer;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string_view json = input.substr(0, nul);
  const absl::StatusOr<Tokenizer> tokenizer = Tokenizer::FromJson(json, "fuzz/tokenizer.json");
  if (!tokenizer.ok()) {
    FUZZ_CHECK_REFUSAL(tokenizer.status());
    return 0;
  }
  FUZZ_CHECK(tokenizer->vocab_size() >= 0, "negative vocab_size");
  if (const auto bos = tokenizer->bos_id()) {
    FUZZ_CHECK(*bos >= 0 && *bos < tokenizer->vocab_size(), "bos_id out of range");
  }
  if (const auto eos = tokenizer->eos_id()) {
    FUZZ_CHECK(*eos >= 0 && *eos < tokenizer->vocab_size(), "eos_id out of range");
  }
  for (std::string_view text : kTexts) CheckEncoding(*tokenizer, text, /*add_bos=*/true);
  if (nul != std::string_view::npos) CheckEncoding(*tokenizer, input.substr(nul + 1), false);

  // Ids it does not know are skipped.
  const int32_t n = tokenizer->vocab_size();
  static_cast<void>(tokenizer->Decode({-1, 0, n - 1, n, INT32_MAX, INT32_MIN}));
  static_cast<void>(tokenizer->IdToToken(-1));
  static_cast<void>(tokenizer->IdToToken(n));
  return 0;
}
