// The tokenizer (tokenizer.json loading, byte-level and SentencePiece-style
// BPE, the split regex) and the byte-level BPE trainer.
//
// The fixtures under fixtures/tokenizer/ are tiny tokenizer.json files whose
// merges were picked by hand, so that the expected ids below can be worked
// out on paper (the reasoning is in the comments). The same ids came out of
// Hugging Face tokenizers 0.22 for the same files and strings.
#include "worker/engine/tokenizer/tokenizer.h"

#include <gtest/gtest.h>
#include <stdio.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tests/engine/test_util.h"
#include "worker/engine/tokenizer/bpe_trainer.h"
#include "worker/engine/tokenizer/split_regex.h"
#include "worker/engine/tokenizer/unicode.h"

namespace compress::engine {
namespace {

using ::compress::engine::testing::ExpectInvalidArgument;
using ::compress::engine::testing::TempDir;
using ::compress::engine::testing::WriteBytes;
using Ids = std::vector<int32_t>;

std::string FixturePath(const std::string& name) {
  return (std::filesystem::path(__FILE__).parent_path() / "fixtures" / "tokenizer" / name).string();
}

std::string ReadFixture(const std::string& name) {
  return ::compress::engine::testing::ReadBytes(FixturePath(name));
}

// Declares `const Tokenizer& var` loaded from a fixture, or fails the test.
#define LOAD_FIXTURE(var, name)                                                      \
  const absl::StatusOr<Tokenizer> var##_or = Tokenizer::FromFile(FixturePath(name)); \
  ASSERT_TRUE(var##_or.ok()) << var##_or.status();                                   \
  const Tokenizer& var = *var##_or

// A fixture with one change made to its JSON, loaded from memory.
absl::StatusOr<Tokenizer> LoadEdited(const std::string& name,
                                     const std::function<void(nlohmann::json&)>& edit) {
  nlohmann::json json = nlohmann::json::parse(ReadFixture(name));
  edit(json);
  return Tokenizer::FromJson(json.dump(), "edited.json");
}

// ---- Random text ---------------------------------------------------------

// Valid UTF-8 drawn from ASCII (controls included), Latin, Unicode spaces,
// CJK, emoji and the whole code space; never '<' (no special token can
// appear by chance) nor U+2581 '▁' (SentencePiece spells spaces with it).
std::string RandomUtf8(std::mt19937& rng, int max_chars) {
  std::string text;
  const int n = std::uniform_int_distribution<int>(0, max_chars)(rng);
  for (int i = 0; i < n; ++i) {
    uint32_t cp;
    switch (std::uniform_int_distribution<int>(0, 6)(rng)) {
      case 0:
      case 1:
        cp = std::uniform_int_distribution<uint32_t>(0x00, 0x7F)(rng);
        break;
      case 2:
        cp = std::uniform_int_distribution<uint32_t>(0x80, 0x24F)(rng);
        break;
      case 3: {
        static constexpr uint32_t kSpaces[] = {' ', '\t', '\n', 0x85, 0xA0, 0x2028, 0x3000};
        cp = kSpaces[std::uniform_int_distribution<int>(0, 6)(rng)];
        break;
      }
      case 4:
        cp = std::uniform_int_distribution<uint32_t>(0x4E00, 0x9FFF)(rng);
        break;
      case 5:
        cp = std::uniform_int_distribution<uint32_t>(0x1F300, 0x1FAFF)(rng);
        break;
      default:
        cp = std::uniform_int_distribution<uint32_t>(0, 0x10FFFF)(rng);
        break;
    }
    if (cp == '<' || cp == 0x2581 || (cp >= 0xD800 && cp <= 0xDFFF)) continue;
    AppendUtf8(cp, &text);
  }
  return text;
}

// Arbitrary bytes, mostly not UTF-8 (same exclusions as above).
std::string RandomBytes(std::mt19937& rng, int max_bytes) {
  std::string bytes;
  const int n = std::uniform_int_distribution<int>(0, max_bytes)(rng);
  for (int i = 0; i < n; ++i) {
    bytes.push_back(static_cast<char>(std::uniform_int_distribution<int>(0, 255)(rng)));
    if (bytes.back() == '<') bytes.pop_back();
  }
  while (bytes.find("\xE2\x96\x81") != std::string::npos)
    bytes.erase(bytes.find("\xE2\x96\x81"), 1);
  return bytes;
}

void ExpectRoundTrips(const Tokenizer& tokenizer, const std::string& text) {
  const Ids ids = tokenizer.Encode(text);
  EXPECT_EQ(tokenizer.Decode(ids), text) << "ids: " << ::testing::PrintToString(ids);
}

// ---- Byte-level BPE (GPT-2 / Llama-3 style) ------------------------------
//
// byte_level_tiny.json: the 256 byte characters with GPT-2's ids (sorted by
// code point: '!'..'~' are 0..93, so a printable ASCII c is c - 33; the
// unprintable bytes 0..32 are U+0100.. = ids 188..220, so ' ' = 'Ġ' = 220
// and '\n' = 'Ċ' = 198), then twelve merges, each making ids 256..267:
//   0 h e -> he 256        4 hell o -> hello 260    8 Ġworl d -> Ġworld 264
//   1 l l -> ll 257        5 o r -> or 261          9 Ġ Ġ -> ĠĠ 265
//   2 Ġ w -> Ġw 258        6 Ġw or -> Ġwor 262     10 ' t -> 't 266
//   3 he ll -> hell 259    7 Ġwor l -> Ġworl 263   11 l o -> lo 267
// and the special tokens <|begin_of_text|> 268 and <|end_of_text|> 269. The
// pre-tokenizer is Llama-3's form: Split(GPT-2 regex) then ByteLevel.

TEST(Utf8, InvalidBytesBecomeReplacementCharactersAndValidTextIsKept) {
  EXPECT_EQ(ToValidUtf8("plain \xC3\xA9t\xC3\xA9 \xE2\x82\xAC"), "plain \xC3\xA9t\xC3\xA9 \xE2\x82\xAC");
  // A sequence cut short, a stray continuation byte, an overlong form.
  EXPECT_EQ(ToValidUtf8("a\xE2\x82"), "a\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(ToValidUtf8("\x80" "b"), "\xEF\xBF\xBD" "b");
  EXPECT_EQ(ToValidUtf8("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(TokenizerByteLevel, LoadsVocabularySpecialsAndBos) {
  LOAD_FIXTURE(tokenizer, "byte_level_tiny.json");
  EXPECT_EQ(tokenizer.vocab_size(), 270);
  EXPECT_EQ(tokenizer.bos_id(), 268);  // by name: <|begin_of_text|>
  EXPECT_EQ(tokenizer.eos_id(), 269);  // <|end_of_text|>
  EXPECT_EQ(tokenizer.TokenToId("Ġworld"), 264);
  EXPECT_EQ(tokenizer.TokenToId("<|end_of_text|>"), 269);
  EXPECT_EQ(tokenizer.TokenToId("world"), std::nullopt);
  EXPECT_EQ(tokenizer.IdToToken(220), "Ġ");
  EXPECT_EQ(tokenizer.IdToToken(268), "<|begin_of_text|>");
  EXPECT_EQ(tokenizer.IdToToken(5000), "");
}

TEST(TokenizerByteLevel, EncodesHandWorkedWords) {
  LOAD_FIXTURE(tokenizer, "byte_level_tiny.json");
  // "hello world" splits into "hello" and " world".
  //   h e l l o: the lowest-ranked pairs go first, wherever they are:
  //   (h,e)#0 -> he l l o; (l,l)#1 -> he ll o; (he,ll)#3 -> hell o;
  //   (hell,o)#4 -> hello = 260.
  //   Ġ w o r l d: (Ġ,w)#2, (o,r)#5, (Ġw,or)#6, (Ġwor,l)#7, (Ġworl,d)#8 -> 264.
  EXPECT_EQ(tokenizer.Encode("hello world"), (Ids{260, 264}));
  // H e l l o: no merge starts with H, so (l,l)#1 beats (l,o)#11 and then
  // nothing applies: H=39 e=68 ll=257 o=78.
  EXPECT_EQ(tokenizer.Encode("Hello"), (Ids{39, 68, 257, 78}));
  // o l l o: (l,l)#1 outranks (l,o)#11 and takes the l that (l,o) needed:
  // o ll o, and no merge joins (ll,o).
  EXPECT_EQ(tokenizer.Encode("ollo"), (Ids{78, 257, 78}));
  // The contraction is its own piece: "don" + "'t"; (',t)#10 -> 't = 266.
  EXPECT_EQ(tokenizer.Encode("don't"), (Ids{67, 78, 77, 266}));
  // Digits in one piece, the punctuation in another: 2=17 0=15 4=19, !=0.
  EXPECT_EQ(tokenizer.Encode("2024!"), (Ids{17, 15, 17, 19, 0}));
  // é is C3 A9: 'Ã' (U+00C3) = 106 + (0xC3 - 0xAE) = 127, '©' (U+00A9) =
  // 94 + (0xA9 - 0xA1) = 102.
  EXPECT_EQ(tokenizer.Encode("é"), (Ids{127, 102}));
  EXPECT_EQ(tokenizer.Encode("\n"), (Ids{198}));
  EXPECT_EQ(tokenizer.Encode(""), Ids{});
}

TEST(TokenizerByteLevel, WhitespaceRunsGiveTheirLastSpaceToTheNextWord) {
  LOAD_FIXTURE(tokenizer, "byte_level_tiny.json");
  // "a   b" -> "a", "  ", " b" (\s+(?!\S) stops one short of "b"):
  // a=64, ĠĠ=265 by merge #9, Ġ=220 b=65 (no merge Ġ b).
  EXPECT_EQ(tokenizer.Encode("a   b"), (Ids{64, 265, 220, 65}));
  // Trailing spaces are followed by no non-space: they stay together.
  EXPECT_EQ(tokenizer.Encode("a  "), (Ids{64, 265}));
  // Two tabs before "b": the first is the lookahead match; the second, a
  // lone space before a letter, fails it and is taken by \s+ alone ('\t' is
  // not the ' ' that " ?\p{L}+" allows). '\t' = byte 9 = id 188 + 9 = 197.
  EXPECT_EQ(tokenizer.Encode("a\t\tb"), (Ids{64, 197, 197, 65}));
}

TEST(TokenizerByteLevel, MatchesSpecialTokensInsideText) {
  LOAD_FIXTURE(tokenizer, "byte_level_tiny.json");
  const Ids ids = tokenizer.Encode("<|begin_of_text|>hello<|end_of_text|>");
  EXPECT_EQ(ids, (Ids{268, 260, 269}));
  EXPECT_EQ(tokenizer.Decode(ids), "<|begin_of_text|>hello<|end_of_text|>");
  EXPECT_EQ(tokenizer.Decode(ids, /*skip_special=*/true), "hello");
  // A special token's text split over pieces is still matched first.
  EXPECT_EQ(tokenizer.Encode("hello<|end_of_text|> world"), (Ids{260, 269, 264}));
  // Something that only looks like one is plain text: < | e n d | >.
  EXPECT_EQ(tokenizer.Encode("<|end|>").size(), 7u);
  EXPECT_EQ(tokenizer.Encode("hello", /*add_bos=*/true), (Ids{268, 260}));
}

TEST(TokenizerByteLevel, DecodeSkipsUnknownIds) {
  LOAD_FIXTURE(tokenizer, "byte_level_tiny.json");
  EXPECT_EQ(tokenizer.Decode({260, -1, 9999, 264}), "hello world");
}

TEST(TokenizerByteLevel, RoundTripsRandomUtf8AndInvalidBytes) {
  LOAD_FIXTURE(tokenizer, "byte_level_tiny.json");
  std::mt19937 rng(1234);
  for (int i = 0; i < 300; ++i) ExpectRoundTrips(tokenizer, RandomUtf8(rng, 40));
  for (int i = 0; i < 300; ++i) ExpectRoundTrips(tokenizer, RandomBytes(rng, 40));
  std::string every_byte;
  for (int b = 0; b < 256; ++b) every_byte.push_back(static_cast<char>(b));
  ExpectRoundTrips(tokenizer, every_byte);
}

TEST(TokenizerByteLevel, EncodesFromManyThreadsThroughTheSharedCache) {
  LOAD_FIXTURE(tokenizer, "byte_level_tiny.json");
  std::mt19937 rng(99);
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) texts.push_back(RandomUtf8(rng, 30) + " hello world");
  std::vector<Ids> expected;
  for (const std::string& text : texts) expected.push_back(tokenizer.Encode(text));
  const Tokenizer copy = tokenizer;  // copies share the cache
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) {
          mismatches[t] += (t % 2 == 0 ? tokenizer : copy).Encode(texts[i]) != expected[i];
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

TEST(TokenizerByteLevel, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  // Llama-3 sets ignore_merges: a word that is a token is that token, even
  // when the merges would not build it. Add "Ġhello" with no merge for it.
  absl::StatusOr<Tokenizer> tokenizer = LoadEdited("byte_level_tiny.json", [](nlohmann::json& j) {
    j["model"]["vocab"]["Ġhello"] = 270;
    j["model"]["ignore_merges"] = true;
  });
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ(tokenizer->Encode(" hello"), (Ids{270}));
  // Without it, merges alone: Ġ + hello.
  LOAD_FIXTURE(plain, "byte_level_tiny.json");
  EXPECT_EQ(plain.Encode(" hello"), (Ids{220, 260}));
}

// ---- SentencePiece-style BPE (Llama-2 / Mistral) -------------------------
//
// sentencepiece_tiny.json: <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..258
// (so byte b is 3 + b), then ▁ 259, h 260, e 261, l 262, o 263, w 264, r 265,
// d 266, and eleven merges making ids 267..277:
//   0 ▁ h -> ▁h 267       4 ▁hell o -> ▁hello 271  8 l d -> ld 275
//   1 l l -> ll 268       5 ▁ w -> ▁w 272          9 ▁wor ld -> ▁world 276
//   2 e ll -> ell 269     6 o r -> or 273         10 ▁ ▁ -> ▁▁ 277
//   3 ▁h ell -> ▁hell 270 7 ▁w or -> ▁wor 274
// Normalizer Prepend("▁") + Replace(" ", "▁"); byte_fallback, fuse_unk;
// decoder Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0); the
// post-processor template starts with <s>.

TEST(TokenizerSentencePiece, LoadsBosFromTheTemplate) {
  LOAD_FIXTURE(tokenizer, "sentencepiece_tiny.json");
  EXPECT_EQ(tokenizer.vocab_size(), 278);
  EXPECT_EQ(tokenizer.bos_id(), 1);
  EXPECT_EQ(tokenizer.eos_id(), 2);
  EXPECT_EQ(tokenizer.TokenToId("<0x0A>"), 13);
  EXPECT_EQ(tokenizer.IdToToken(276), "▁world");
}

TEST(TokenizerSentencePiece, EncodesHandWorkedWords) {
  LOAD_FIXTURE(tokenizer, "sentencepiece_tiny.json");
  // "hello world" -> "▁hello▁world".
  //   ▁ h e l l o: (▁,h)#0, (l,l)#1, (e,ll)#2, (▁h,ell)#3, (▁hell,o)#4 -> 271.
  //   ▁ w o r l d: (▁,w)#5, (o,r)#6, (▁w,or)#7, (l,d)#8, (▁wor,ld)#9 -> 276.
  EXPECT_EQ(tokenizer.Encode("hello world"), (Ids{271, 276}));
  EXPECT_EQ(tokenizer.Encode("hello world", /*add_bos=*/true), (Ids{1, 271, 276}));
  // Two spaces: "▁hello▁▁world". In ▁ ▁ w o r l d the pair (▁,▁)#10 is
  // there from the start, but (▁,w)#5 ranks first and takes the second ▁;
  // the first is left alone: 271, ▁ 259, ▁world 276.
  EXPECT_EQ(tokenizer.Encode("hello  world"), (Ids{271, 259, 276}));
  // Byte fallback: é (C3 A9) and the emoji 😀 (F0 9F 98 80) are not in the
  // vocabulary, so they become <0xNN> = 3 + byte: 198 172, 243 162 155 131.
  EXPECT_EQ(tokenizer.Encode("hé😀"), (Ids{267, 198, 172, 243, 162, 155, 131}));
  // A byte that is not UTF-8 at all falls back the same way: 0xFF -> 258.
  EXPECT_EQ(tokenizer.Encode("\xFF"), (Ids{259, 258}));
  EXPECT_EQ(tokenizer.Encode("\n"), (Ids{259, 13}));
  // Each segment between special tokens gets its own "▁", as in HF.
  EXPECT_EQ(tokenizer.Encode("<s>hello</s>"), (Ids{1, 271, 2}));
}

TEST(TokenizerSentencePiece, DecodesSpacesAndBytesAndStripsThePrependedSpace) {
  LOAD_FIXTURE(tokenizer, "sentencepiece_tiny.json");
  EXPECT_EQ(tokenizer.Decode({271, 259, 276}), "hello  world");
  EXPECT_EQ(tokenizer.Decode({267, 198, 172, 243, 162, 155, 131}), "hé😀");
  EXPECT_EQ(tokenizer.Decode({1, 271, 276}, /*skip_special=*/true), "hello world");
  // Bytes that are not UTF-8 come back as they were (HF would give U+FFFD).
  EXPECT_EQ(tokenizer.Decode({259, 258}), "\xFF");
}

TEST(TokenizerSentencePiece, RoundTripsRandomUtf8AndInvalidBytes) {
  LOAD_FIXTURE(tokenizer, "sentencepiece_tiny.json");
  std::mt19937 rng(5678);
  for (int i = 0; i < 300; ++i) ExpectRoundTrips(tokenizer, RandomUtf8(rng, 40));
  for (int i = 0; i < 300; ++i) ExpectRoundTrips(tokenizer, RandomBytes(rng, 40));
  ExpectRoundTrips(tokenizer, "  leading and trailing  ");
}

TEST(TokenizerSentencePiece, MetaspacePreTokenizerEncodesLikeTheNormalizerForm) {
  // Newer Llama/Mistral files spell the same thing as a Metaspace
  // pre-tokenizer (prepend only at the start of the text, no split).
  absl::StatusOr<Tokenizer> metaspace =
      LoadEdited("sentencepiece_tiny.json", [](nlohmann::json& j) {
        j["normalizer"] = nullptr;
        j["pre_tokenizer"] = {{"type", "Metaspace"},
                              {"replacement", "▁"},
                              {"prepend_scheme", "first"},
                              {"split", false}};
      });
  ASSERT_TRUE(metaspace.ok()) << metaspace.status();
  LOAD_FIXTURE(normalizer, "sentencepiece_tiny.json");
  for (const char* text : {"hello world", "hello  world", "hé😀 hello", "a\nb  c"}) {
    EXPECT_EQ(metaspace->Encode(text), normalizer.Encode(text)) << text;
  }
  // The difference: a text that starts with a space gets no second "▁".
  EXPECT_EQ(metaspace->Encode(" hello"), (Ids{271}));
  EXPECT_EQ(normalizer.Encode(" hello"), (Ids{259, 271}));
}

TEST(TokenizerSentencePiece, NoWordCutWhereATokenSpansTheSpaceMarker) {
  // Long SentencePiece inputs are cut before each "▁" that follows another
  // character, which is exact only while no token holds "x▁". Add "o▁"
  // (merge #11): "o d" -> "▁o▁d" must now merge (o,▁) across that point:
  // ▁ 259, o▁ 278, d 266 (cut, it would be ▁ o ▁ d).
  absl::StatusOr<Tokenizer> tokenizer =
      LoadEdited("sentencepiece_tiny.json", [](nlohmann::json& j) {
        j["model"]["vocab"]["o▁"] = 278;
        j["model"]["merges"].push_back("o ▁");
      });
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ(tokenizer->Encode("o d"), (Ids{259, 278, 266}));
  LOAD_FIXTURE(plain, "sentencepiece_tiny.json");
  EXPECT_EQ(plain.Encode("o d"), (Ids{259, 263, 259, 266}));
}

TEST(TokenizerSentencePiece, UnknownCharactersWithoutByteFallbackFuseIntoOneUnk) {
  absl::StatusOr<Tokenizer> tokenizer = LoadEdited(
      "sentencepiece_tiny.json", [](nlohmann::json& j) { j["model"]["byte_fallback"] = false; });
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  // ▁h, then é and 😀 are both unknown: one <unk> (fuse_unk).
  EXPECT_EQ(tokenizer->Encode("hé😀"), (Ids{267, 0}));
}

// ---- Qwen2 (byte-level BPE, an NFC normalizer, its own split) -------------
//
// qwen2_tiny/tokenizer.json: the 256 byte characters with GPT-2's ids (as in
// byte_level_tiny.json: a printable ASCII c is c - 33, ' ' = 'Ġ' = 220,
// '\n' = 'Ċ' = 198), then nine merges making ids 256..264:
//   0 Ã © -> Ã© (é) 256     3 caf Ã© -> café 259   6 Ġcaf Ã© -> Ġcafé 262
//   1 c a -> ca 257         4 2 0 -> 20 260        7 ' s -> 's 263
//   2 ca f -> caf 258       5 Ġ caf -> Ġcaf 261    8 Ċ Ċ -> ĊĊ 264
// and the special <|endoftext|> 265, <|im_start|> 266, <|im_end|> 267. As in
// Qwen2's file: normalizer NFC; pre-tokenizer Split on Qwen2's pattern
// (Llama-3's with one digit per piece), then ByteLevel. Its
// tokenizer_config.json is Qwen2-Instruct's: bos_token null, eos_token
// <|im_end|>, pad_token <|endoftext|>.

constexpr char kQwen2Fixture[] = "qwen2_tiny/tokenizer.json";

// The fixture without its normalizer.
absl::StatusOr<Tokenizer> LoadQwen2WithoutNfc() {
  return LoadEdited(kQwen2Fixture, [](nlohmann::json& j) { j["normalizer"] = nullptr; });
}

TEST(Utf8, NfcComposesAsUnicodeSays) {
  EXPECT_EQ(NormalizeNfc("cafe\u0301"), "caf\u00e9");
  // A singleton (Angstrom sign -> A with ring) and Hangul jamo -> a syllable.
  EXPECT_EQ(NormalizeNfc("\u212b"), "\u00c5");
  EXPECT_EQ(NormalizeNfc("\u1100\u1161"), "\uac00");
  // Combining marks are put in canonical order first: both orders of dot
  // below (class 220) and circumflex (230) compose to U+1EAD.
  EXPECT_EQ(NormalizeNfc("a\u0323\u0302"), "\u1ead");
  EXPECT_EQ(NormalizeNfc("a\u0302\u0323"), "\u1ead");
  // A composition exclusion stays decomposed: U+0958 -> U+0915 U+093C.
  EXPECT_EQ(NormalizeNfc("\u0958"), "\u0915\u093c");
  // Text already in NFC is unchanged, ASCII above all.
  for (const char* text : {"", "plain ASCII\t\n~", "caf\u00e9 \u4e2d\u6587 \U0001F600"}) {
    EXPECT_EQ(NormalizeNfc(text), text);
  }
  // An invalid byte stays, and cuts the text: the mark after it has no base.
  EXPECT_EQ(NormalizeNfc("e\xFF\u0301"), "e\xFF\u0301");
  EXPECT_EQ(NormalizeNfc("\xC3\xFF" "e\u0301"), "\xC3\xFF\u00e9");
}

TEST(TokenizerQwen2, LoadsItsSpecialTokensAndConfig) {
  LOAD_FIXTURE(tokenizer, kQwen2Fixture);
  EXPECT_EQ(tokenizer.vocab_size(), 268);
  EXPECT_EQ(tokenizer.bos_id(), std::nullopt);  // Qwen2 has no BOS
  EXPECT_EQ(tokenizer.eos_id(), 267);           // <|im_end|>
  EXPECT_EQ(tokenizer.TokenToId("<|endoftext|>"), 265);
  EXPECT_EQ(tokenizer.Encode("caf\u00e9", /*add_bos=*/true), (Ids{259}));
}

TEST(TokenizerQwen2, NfcComposesBeforeTheSplitAndTheMerges) {
  LOAD_FIXTURE(tokenizer, kQwen2Fixture);
  // "café": é is C3 A9 = Ã ©; (Ã,©)#0, (c,a)#1, (ca,f)#2, (caf,é)#3 -> 259.
  EXPECT_EQ(tokenizer.Encode("caf\u00e9"), (Ids{259}));
  // Decomposed (e, U+0301 = CC 81), NFC makes it the same word.
  EXPECT_EQ(tokenizer.Encode("cafe\u0301"), (Ids{259}));
  // Without NFC the mark (a \p{Mn}, not a \p{L}) is a piece of its own:
  // "cafe" -> caf 258, e 68; CC 81 -> Ì 136 and 0x81's character 223.
  const absl::StatusOr<Tokenizer> raw = LoadQwen2WithoutNfc();
  ASSERT_TRUE(raw.ok()) << raw.status();
  EXPECT_EQ(raw->Encode("cafe\u0301"), (Ids{258, 68, 136, 223}));
  // " café" is one piece, but (caf,é)#3 outranks (Ġ,caf)#5: Ġ stays alone.
  EXPECT_EQ(tokenizer.Encode(" cafe\u0301 caf\u00e9"), (Ids{220, 259, 220, 259}));
  // The Angstrom sign becomes Å (C3 85): Ã 127, 0x85's character 227.
  EXPECT_EQ(tokenizer.Encode("\u212b"), (Ids{127, 227}));
  // Either order of the marks: the same ids.
  EXPECT_EQ(tokenizer.Encode("a\u0323\u0302"), tokenizer.Encode("a\u0302\u0323"));
  EXPECT_NE(raw->Encode("a\u0323\u0302"), raw->Encode("a\u0302\u0323"));
  // Between special tokens each piece is normalized.
  EXPECT_EQ(tokenizer.Encode("<|im_start|>user\ncafe\u0301<|im_end|>"),
            (Ids{266, 84, 82, 68, 81, 198, 259, 267}));
}

TEST(TokenizerQwen2, NfcTextIsEncodedAsWithoutTheNormalizer) {
  LOAD_FIXTURE(tokenizer, kQwen2Fixture);
  const absl::StatusOr<Tokenizer> raw = LoadQwen2WithoutNfc();
  ASSERT_TRUE(raw.ok()) << raw.status();
  std::mt19937 rng(2468);
  for (int i = 0; i < 300; ++i) {
    // Random text with combining marks between, and its ASCII alone.
    const std::string text = RandomUtf8(rng, 10) + "e\u0301" + RandomUtf8(rng, 10) + "\u0323" +
                             RandomUtf8(rng, 10) + "A\u030a" + RandomUtf8(rng, 10);
    std::string ascii;
    for (char c : text) {
      if (static_cast<unsigned char>(c) < 0x80) ascii.push_back(c);
    }
    const std::string nfc = NormalizeNfc(text);
    EXPECT_EQ(NormalizeNfc(nfc), nfc) << "NFC is idempotent";
    EXPECT_EQ(tokenizer.Encode(text), raw->Encode(nfc));
    EXPECT_EQ(tokenizer.Encode(nfc), raw->Encode(nfc));
    EXPECT_EQ(tokenizer.Encode(ascii), raw->Encode(ascii));
    // Decoding gives the text back composed.
    EXPECT_EQ(tokenizer.Decode(tokenizer.Encode(text)), nfc);
  }
  // Invalid bytes still round-trip (NFC leaves them alone).
  for (int i = 0; i < 300; ++i) {
    const std::string bytes = RandomBytes(rng, 40);
    EXPECT_EQ(tokenizer.Decode(tokenizer.Encode(bytes)), NormalizeNfc(bytes));
  }
}

TEST(TokenizerQwen2, SplitsDigitsOneByOneAndContractionsInAnyCase) {
  LOAD_FIXTURE(tokenizer, kQwen2Fixture);
  // Each digit is a piece, so the merge (2,0)#4 never applies: 2=17 0=15 4=19.
  EXPECT_EQ(tokenizer.Encode("2024"), (Ids{17, 15, 17, 19}));
  // Llama-3's \p{N}{1,3} instead takes "202" and "4": 20 260, 2, 4.
  const absl::StatusOr<Tokenizer> llama3 = LoadEdited(kQwen2Fixture, [](nlohmann::json& j) {
    std::string regex = j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"];
    regex.replace(regex.find(R"(\p{N}|)"), 6, R"(\p{N}{1,3}|)");
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = regex;
  });
  ASSERT_TRUE(llama3.ok()) << llama3.status();
  EXPECT_EQ(llama3->Encode("2024"), (Ids{260, 17, 19}));
  // (?i:'s): "'s" and "'S" are pieces; only the first has a merge (#7).
  // I=40 t=83 's=263 Ġ=220 I=40 T=51 '=6 S=50.
  EXPECT_EQ(tokenizer.Encode("It's IT'S"), (Ids{40, 83, 263, 220, 40, 51, 6, 50}));
  // \s*[\r\n]+ keeps a newline run together: (Ċ,Ċ)#8 -> 264.
  EXPECT_EQ(tokenizer.Encode("a\n\nb"), (Ids{64, 264, 65}));
}

// The ids Hugging Face tokenizers (0.23.2, its Node binding) gives for the
// fixture, strings with accents composed and not, emoji and newlines.
TEST(TokenizerQwen2, SameIdsAsHuggingFaceTokenizers) {
  LOAD_FIXTURE(tokenizer, kQwen2Fixture);
  const std::vector<std::pair<std::string, Ids>> cases = {
      {"Ame\u0301lie\n", {32, 76, 256, 75, 72, 68, 198}},
      {"e\u0301\u0301", {256, 136, 223}},
      {"(caf\u00e9)", {7, 259, 8}},
      {"x  \n  y", {87, 220, 220, 198, 220, 220, 88}},
      {"hello world", {71, 68, 75, 75, 78, 220, 86, 78, 81, 75, 67}},
      {"\U0001F44B\U0001F3FD e\u0327", {172, 253, 239, 233, 172, 253, 237, 121, 220, 132, 102}},
      {"\u0958", {156, 97, 243, 156, 97, 120}},
  };
  for (const auto& [text, ids] : cases) EXPECT_EQ(tokenizer.Encode(text), ids) << text;
}

// ---- Loading errors ------------------------------------------------------

TEST(TokenizerLoad, RejectsUnsupportedTypesByName) {
  struct Case {
    std::function<void(nlohmann::json&)> edit;
    std::vector<std::string> fragments;
  };
  const std::vector<Case> cases = {
      {[](nlohmann::json& j) { j["model"]["type"] = "Unigram"; },
       {"edited.json", "model", "Unigram"}},
      {[](nlohmann::json& j) {
         j["normalizer"] = {{"type", "NFKC"}};
       },
       {"normalizer", "NFKC"}},
      {[](nlohmann::json& j) {
         j["pre_tokenizer"] = {{"type", "Digits"}, {"individual_digits", true}};
       },
       {"pre_tokenizer", "Digits"}},
      {[](nlohmann::json& j) {
         j["decoder"] = {{"type", "WordPiece"}};
       },
       {"decoder", "WordPiece"}},
      {[](nlohmann::json& j) {
         j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "a(?=b)|c";
       },
       {"pre_tokenizer.pretokenizers[0].pattern", "(?=b)", "lookaround"}},
      {[](nlohmann::json& j) {
         j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = R"(\w+)";
       },
       {"\\w", "not supported"}},
      {[](nlohmann::json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"; },
       {"behavior", "Removed"}},
      {[](nlohmann::json& j) { j["model"]["dropout"] = 0.1; }, {"model.dropout", "0.1"}},
      {[](nlohmann::json& j) { j["model"]["continuing_subword_prefix"] = "##"; },
       {"continuing_subword_prefix", "##"}},
      {[](nlohmann::json& j) { j["added_tokens"][0]["single_word"] = true; },
       {"added_tokens[0].single_word", "<|begin_of_text|>"}},
  };
  for (const Case& c : cases) {
    const absl::StatusOr<Tokenizer> tokenizer = LoadEdited("byte_level_tiny.json", c.edit);
    ASSERT_FALSE(tokenizer.ok());
    EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument) << tokenizer.status();
    for (const std::string& fragment : c.fragments) {
      EXPECT_THAT(std::string(tokenizer.status().message()), ::testing::HasSubstr(fragment));
    }
  }
}

TEST(TokenizerLoad, RejectsMalformedFilesNamingTheProblem) {
  ExpectInvalidArgument(Tokenizer::FromJson("{not json", "bad.json").status(),
                        {"bad.json", "JSON"});
  ExpectInvalidArgument(Tokenizer::FromJson("{}", "empty.json").status(), {"empty.json", "model"});
  ExpectInvalidArgument(LoadEdited("byte_level_tiny.json",
                                   [](nlohmann::json& j) {
                                     j["model"]["merges"].push_back({"q", "zz"});
                                   })
                            .status(),
                        {"model.merges[12]", "'zz' is not in the vocabulary"});
  ExpectInvalidArgument(LoadEdited("byte_level_tiny.json",
                                   [](nlohmann::json& j) { j["model"]["merges"][0] = "h e x"; })
                            .status(),
                        {"model.merges[0]", "h e x"});
  ExpectInvalidArgument(LoadEdited("sentencepiece_tiny.json",
                                   [](nlohmann::json& j) { j["model"]["unk_token"] = "<nope>"; })
                            .status(),
                        {"unk_token", "<nope>"});
  ExpectInvalidArgument(
      LoadEdited("byte_level_tiny.json", [](nlohmann::json& j) { j["model"]["vocab"] = 3; })
          .status(),
      {"model.vocab"});
}

// Ids index dense tables. Found by fuzz/tokenizer_fuzzer.cc: a vocabulary
// id of 142949672953 was cut to 32 bits (1,215,752,185) and a table that
// large allocated (38 GB: out of memory); an id of 2^31 - 1 overflowed
// `id + 1` (undefined behaviour), and 4294967296 became the id 0.
TEST(TokenizerLoad, RejectsIdsOutsideTheTableLimitBeforeAllocating) {
  ExpectInvalidArgument(
      Tokenizer::FromJson(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 2147483647}}})",
                          "big.json")
          .status(),
      {"big.json", "model.vocab", "the id 2147483647 of 'b' is outside 0..4194303"});
  ExpectInvalidArgument(
      Tokenizer::FromJson(R"({"model": {"type": "BPE", "vocab": {"a": 4294967296}}})", "wrap.json")
          .status(),
      {"wrap.json", "the id 4294967296 of 'a' is outside"});
  ExpectInvalidArgument(
      Tokenizer::FromJson(R"({"model": {"type": "BPE", "vocab": {"a": 0}},)"
                          R"( "added_tokens": [{"id": 2147483647, "content": "<x>"}]})",
                          "added.json")
          .status(),
      {"added.json", "added_tokens[0]", "'id' 2147483647 is not an integer in 0..4194303"});
  ExpectInvalidArgument(Tokenizer::FromJson(R"({"model": {"type": "BPE", "vocab": {"a": 0}},)"
                                            R"( "added_tokens": [{"content": "<x>"}]})",
                                            "added.json")
                            .status(),
                        {"added_tokens[0]", "missing 'id'"});
  // The largest id allowed still loads (with a table of 2^22 entries).
  const absl::StatusOr<Tokenizer> largest =
      Tokenizer::FromJson(R"({"model": {"type": "BPE", "vocab": {"a": 4194303}}})", "ok.json");
  ASSERT_TRUE(largest.ok()) << largest.status();
  EXPECT_EQ(largest->vocab_size(), 4194304);
  EXPECT_EQ(largest->Encode("a"), Ids({4194303}));
}

// Every input under fuzz/regressions/ that once crashed the loader is now a
// plain INVALID_ARGUMENT.
TEST(TokenizerLoad, FuzzerRegressionsAreRefused) {
  const std::filesystem::path dir =
      std::filesystem::path(__FILE__).parent_path() / ".." / ".." / "fuzz" / "regressions";
  int inputs = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().filename().string().rfind("tokenizer-", 0) != 0) continue;
    const std::string input = ::compress::engine::testing::ReadBytes(entry.path().string());
    // As the fuzz target reads it: the JSON ends at the first NUL.
    const std::string json = input.substr(0, input.find('\0'));
    EXPECT_EQ(Tokenizer::FromJson(json, "fuzz").status().code(), absl::StatusCode::kInvalidArgument)
        << entry.path();
    ++inputs;
  }
  EXPECT_GE(inputs, 3) << dir;
}

TEST(TokenizerLoad, MissingFileIsNotFound) {
  EXPECT_EQ(Tokenizer::FromFile(FixturePath("no_such_tokenizer.json")).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(TokenizerLoad, TokenizerConfigNextToTheFileSetsBosAndEos) {
  TempDir dir;
  WriteBytes(dir / "tokenizer.json", ReadFixture("byte_level_tiny.json"));
  // As transformers writes them: a plain string, an AddedToken object, null.
  WriteBytes(
      dir / "tokenizer_config.json",
      R"({"bos_token": null, "eos_token": {"content": "<|begin_of_text|>", "special": true}})");
  absl::StatusOr<Tokenizer> tokenizer = Tokenizer::FromFile(dir / "tokenizer.json");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ(tokenizer->bos_id(), std::nullopt);
  EXPECT_EQ(tokenizer->eos_id(), 268);
  EXPECT_EQ(tokenizer->Encode("hello", /*add_bos=*/true), (Ids{260}));

  WriteBytes(dir / "tokenizer_config.json", R"({"eos_token": "<|nope|>"})");
  ExpectInvalidArgument(Tokenizer::FromFile(dir / "tokenizer.json").status(),
                        {"tokenizer_config.json", "<|nope|>"});
}

// ---- The split regex -----------------------------------------------------

std::vector<std::string> Pieces(const SplitRegex& regex, const std::string& text) {
  std::vector<std::string_view> views;
  regex.Split(text, &views);
  return std::vector<std::string>(views.begin(), views.end());
}

using Strings = std::vector<std::string>;
constexpr char kLlama3Pattern[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

TEST(TokenizerSplitRegex, Gpt2PatternWithTheHandMadeLookahead) {
  absl::StatusOr<SplitRegex> regex = SplitRegex::Compile(kGpt2SplitPattern);
  ASSERT_TRUE(regex.ok()) << regex.status();
  EXPECT_EQ(Pieces(*regex, "a   b"), (Strings{"a", "  ", " b"}));
  EXPECT_EQ(Pieces(*regex, "a  "), (Strings{"a", "  "}));
  // "  \n " is a whitespace run before "y"; it keeps all but the last space.
  EXPECT_EQ(Pieces(*regex, "x  \n  y"), (Strings{"x", "  \n ", " y"}));
  // Case-sensitive contractions in GPT-2: 'S is punctuation then a word.
  EXPECT_EQ(Pieces(*regex, "HE'S here"), (Strings{"HE", "'", "S", " here"}));
  // \s is Unicode White_Space (U+3000 here), \p{L} is Unicode letters.
  EXPECT_EQ(Pieces(*regex, "a\u3000b"), (Strings{"a", "\u3000", "b"}));
  EXPECT_EQ(Pieces(*regex, "héllo wörld"), (Strings{"héllo", " wörld"}));
  EXPECT_EQ(Pieces(*regex, "(a+b)*c"), (Strings{"(", "a", "+", "b", ")*", "c"}));
}

TEST(TokenizerSplitRegex, Llama3Pattern) {
  absl::StatusOr<SplitRegex> regex = SplitRegex::Compile(kLlama3Pattern);
  ASSERT_TRUE(regex.ok()) << regex.status();
  EXPECT_EQ(Pieces(*regex, "a   b"), (Strings{"a", "  ", " b"}));
  EXPECT_EQ(Pieces(*regex, "HE'S here"), (Strings{"HE", "'S", " here"}));
  EXPECT_EQ(Pieces(*regex, "12345"), (Strings{"123", "45"}));
  // \s*[\r\n]+ comes before the lookahead alternative and wins.
  EXPECT_EQ(Pieces(*regex, "a\r\n\r\nb"), (Strings{"a", "\r\n\r\n", "b"}));
  EXPECT_EQ(Pieces(*regex, "x  \n  y"), (Strings{"x", "  \n", " ", " y"}));
  EXPECT_EQ(Pieces(*regex, "a\t\tb"), (Strings{"a", "\t", "\tb"}));
  EXPECT_EQ(Pieces(*regex, "(a+b)*c"), (Strings{"(a", "+b", ")*", "c"}));
}

TEST(TokenizerSplitRegex, UnmatchedTextAndInvalidBytesBecomePieces) {
  absl::StatusOr<SplitRegex> regex = SplitRegex::Compile("a+");
  ASSERT_TRUE(regex.ok()) << regex.status();
  EXPECT_EQ(Pieces(*regex, "xyaaz"), (Strings{"xy", "aa", "z"}));
  absl::StatusOr<SplitRegex> gpt2 = SplitRegex::Compile(kGpt2SplitPattern);
  ASSERT_TRUE(gpt2.ok());
  EXPECT_EQ(Pieces(*gpt2,
                   "ab\xFF\xFE"
                   "cd"),
            (Strings{"ab", "\xFF\xFE", "cd"}));
}

TEST(TokenizerSplitRegex, RejectsWhatItCannotDoExactly) {
  for (const auto& [pattern, fragment] : std::vector<std::pair<std::string, std::string>>{
           {R"(\s+(?=x))", "lookaround"},
           {R"((?<=a)b)", "lookaround"},
           {R"((?>ab))", "atomic"},
           {R"(\w+)", R"(\w)"},
           {R"(\bx)", R"(\b)"},
           {R"((a)\1)", "backreference"},
           {R"((?i)a|b)", "flag group"},
           {R"([\S])", R"(\S inside)"},
           {R"(a++)", "RE2"},
       }) {
    const absl::StatusOr<SplitRegex> regex = SplitRegex::Compile(pattern);
    ASSERT_FALSE(regex.ok()) << pattern;
    ExpectInvalidArgument(regex.status(), {pattern, fragment});
  }
}

// ---- The trainer ---------------------------------------------------------

absl::StatusOr<Tokenizer> Train(const std::string& text, const BpeTrainerOptions& options) {
  absl::StatusOr<std::string> json = TrainByteLevelBpe(text, options);
  if (!json.ok()) return json.status();
  return Tokenizer::FromJson(*json, "trained.json");
}

TEST(BpeTrainer, FirstMergesAreTheHandCountedOnes) {
  // "aaab" once and " aaab" nine times (the split puts the space in front).
  // Pair counts: (a,a) 2 + 9*2 = 20, (a,b) 10, (Ġ,a) 9.
  //   1. a a (20). Left to right, without overlap: aaa -> aa a, so the
  //      words are [aa a b] and [Ġ aa a b]: (aa,a) 10, (a,b) 10, (Ġ,aa) 9.
  //   2. a tie at 10: the smaller pair of ids wins, (a,b) = (64, 65)
  //      before (aa,a) = (256, 64). Words [aa ab], [Ġ aa ab].
  //   3. aa ab (10) -> aaab.   4. Ġ aaab (9) -> Ġaaab.  Then no pair is left.
  std::string text = "aaab";
  for (int i = 0; i < 9; ++i) text += " aaab";
  BpeTrainerOptions options;
  options.vocab_size = 300;
  absl::StatusOr<std::string> json = TrainByteLevelBpe(text, options);
  ASSERT_TRUE(json.ok()) << json.status();
  const nlohmann::json parsed = nlohmann::json::parse(*json);
  EXPECT_EQ(parsed["model"]["merges"], (nlohmann::json{"a a", "a b", "aa ab", "Ġ aaab"}));
  EXPECT_EQ(parsed["model"]["vocab"]["aa"], 256);
  EXPECT_EQ(parsed["model"]["vocab"]["Ġaaab"], 259);

  absl::StatusOr<Tokenizer> tokenizer = Tokenizer::FromJson(*json, "trained.json");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ(tokenizer->vocab_size(), 260);
  EXPECT_EQ(tokenizer->Encode("aaab aaab"), (Ids{258, 259}));
  ExpectRoundTrips(*tokenizer, text);
}

TEST(BpeTrainer, WritesTheFormatHuggingFaceReads) {
  absl::StatusOr<std::string> json = TrainByteLevelBpe("hello hello world", BpeTrainerOptions{});
  ASSERT_TRUE(json.ok()) << json.status();
  const nlohmann::json parsed = nlohmann::json::parse(*json);
  EXPECT_EQ(parsed["version"], "1.0");
  EXPECT_EQ(parsed["normalizer"], nullptr);
  EXPECT_EQ(parsed["pre_tokenizer"]["type"], "ByteLevel");
  EXPECT_EQ(parsed["pre_tokenizer"]["use_regex"], true);
  EXPECT_EQ(parsed["pre_tokenizer"]["add_prefix_space"], false);
  EXPECT_EQ(parsed["decoder"]["type"], "ByteLevel");
  EXPECT_EQ(parsed["model"]["type"], "BPE");
  EXPECT_EQ(parsed["model"]["vocab"].size(), 256u + parsed["model"]["merges"].size());
}

TEST(BpeTrainer, HonoursVocabSizeAndSpecialTokens) {
  std::string text;
  std::mt19937 rng(42);
  const std::vector<std::string> words = {"the",   "quick", "brown", "fox",
                                          "jumps", "over",  "lazy",  "dog"};
  for (int i = 0; i < 3000; ++i) {
    text += words[rng() % words.size()];
    text += (i % 50 == 49) ? "<|end_of_text|><|begin_of_text|>" : " ";
  }
  // Eight words leave about 32 merges to learn before every word is whole;
  // stop at 22 (2 specials + 256 bytes + 22 = 280).
  BpeTrainerOptions options;
  options.vocab_size = 280;
  options.special_tokens = {"<|begin_of_text|>", "<|end_of_text|>"};
  absl::StatusOr<Tokenizer> tokenizer = Train(text, options);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ(tokenizer->vocab_size(), 280);
  EXPECT_EQ(tokenizer->TokenToId("<|begin_of_text|>"), 0);
  EXPECT_EQ(tokenizer->bos_id(), 0);
  EXPECT_EQ(tokenizer->eos_id(), 1);
  // The special tokens were cut out of the text: no merge learnt their inside.
  EXPECT_EQ(tokenizer->TokenToId("_of"), std::nullopt);
  EXPECT_EQ(tokenizer->TokenToId("|><|"), std::nullopt);
  EXPECT_EQ(tokenizer->Encode("dog<|end_of_text|>").back(), 1);
  ExpectRoundTrips(*tokenizer, text);
  EXPECT_LT(tokenizer->Encode(text).size(), text.size() / 2);
}

TEST(BpeTrainer, MinFrequencyStopsTraining) {
  BpeTrainerOptions options;
  options.vocab_size = 1000;
  options.min_frequency = 3;
  absl::StatusOr<Tokenizer> tokenizer = Train("ab ab cd", options);  // (a,b) twice, (Ġ,a) once
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ(tokenizer->vocab_size(), 256);
  options.min_frequency = 2;
  tokenizer = Train("ab ab cd", options);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ(tokenizer->vocab_size(), 257);
  EXPECT_EQ(tokenizer->TokenToId("ab"), 256);
}

TEST(BpeTrainer, RejectsImpossibleOptions) {
  BpeTrainerOptions options;
  options.vocab_size = 257;
  options.special_tokens = {"<a>", "<b>"};
  ExpectInvalidArgument(TrainByteLevelBpe("x", options).status(), {"vocab_size 257", "256"});
  options.vocab_size = 1000;
  options.special_tokens = {"<a>", "<a>"};
  ExpectInvalidArgument(TrainByteLevelBpe("x", options).status(), {"<a>", "repeated"});
  options.special_tokens = {""};
  ExpectInvalidArgument(TrainByteLevelBpe("x", options).status(), {"empty"});
}

// The King James Bible from Debian's bible-kjv, when installed.
std::string BibleText() {
  FILE* pipe = ::popen("/usr/bin/bible -f Gen1:1-Rev22:21 2>/dev/null", "r");
  if (pipe == nullptr) return "";
  std::string text;
  char buffer[1 << 16];
  size_t n;
  while ((n = ::fread(buffer, 1, sizeof(buffer), pipe)) > 0) text.append(buffer, n);
  ::pclose(pipe);
  return text;
}

TEST(BpeTrainer, CompressesTheBibleBelowPointFourTokensPerByte) {
  if (::access("/usr/bin/bible", X_OK) != 0)
    GTEST_SKIP() << "/usr/bin/bible (bible-kjv) is not installed";
  const std::string bible = BibleText();
  ASSERT_GT(bible.size(), 4'000'000u);
  using Clock = std::chrono::steady_clock;

  BpeTrainerOptions options;
  options.vocab_size = 1024;
  options.special_tokens = {"<|begin_of_text|>", "<|end_of_text|>"};
  const auto train_start = Clock::now();
  absl::StatusOr<Tokenizer> tokenizer = Train(bible.substr(0, 500'000), options);
  const double train_seconds = std::chrono::duration<double>(Clock::now() - train_start).count();
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ(tokenizer->vocab_size(), 1024);

  const auto encode_start = Clock::now();
  const Ids ids = tokenizer->Encode(bible);
  const double encode_seconds = std::chrono::duration<double>(Clock::now() - encode_start).count();
  const double tokens_per_byte = static_cast<double>(ids.size()) / bible.size();
  EXPECT_LT(tokens_per_byte, 0.4);
  EXPECT_TRUE(tokenizer->Decode(ids) == bible);
  std::cout << "trained 1024 on 500 KB in " << train_seconds << " s; encoded " << bible.size()
            << " bytes to " << ids.size() << " tokens (" << tokens_per_byte << " per byte) at "
            << bible.size() / encode_seconds / 1e6 << " MB/s\n";
}

}  // namespace
}  // namespace compress::engine
