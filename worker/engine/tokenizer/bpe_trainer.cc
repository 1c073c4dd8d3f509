#include "worker/engine/tokenizer/bpe_trainer.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <queue>
#include <set>
#include <string_view>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "worker/engine/tokenizer/added_tokens.h"
#include "worker/engine/tokenizer/split_regex.h"
#include "worker/engine/tokenizer/unicode.h"

namespace compress::engine {
namespace {

using Pair = uint64_t;  // (left id << 32) | right id: compares as (left, right)

Pair MakePair(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(left) << 32) | static_cast<uint32_t>(right);
}
int32_t Left(Pair pair) { return static_cast<int32_t>(pair >> 32); }
int32_t Right(Pair pair) { return static_cast<int32_t>(pair & 0xFFFFFFFFu); }

struct HeapEntry {
  int64_t count;
  Pair pair;
  // Max-heap order: the highest count on top, then the smallest pair.
  bool operator<(const HeapEntry& other) const {
    return count != other.count ? count < other.count : pair > other.pair;
  }
};

bool IsValidUtf8(std::string_view s) {
  for (size_t pos = 0; pos < s.size();) {
    const Utf8Char c = DecodeUtf8(s, pos);
    if (!c.valid) return false;
    pos += c.length;
  }
  return true;
}

// The distinct words of `text` and how often each occurs: the pieces of the
// GPT-2 split of everything between special tokens.
std::vector<std::pair<std::string_view, int64_t>> CountWords(
    std::string_view text, const std::vector<std::string>& special_tokens) {
  std::vector<AddedToken> specials;
  for (const std::string& token : special_tokens)
    specials.push_back({0, token, true, false, false});
  const AddedTokenMatcher matcher(std::move(specials));
  std::vector<AddedTokenMatcher::Segment> segments;
  matcher.Split(text, &segments);

  static const SplitRegex* const kSplit = new SplitRegex(*SplitRegex::Compile(kGpt2SplitPattern));
  std::unordered_map<std::string_view, int64_t> counts;
  std::vector<std::string_view> pieces;
  for (const AddedTokenMatcher::Segment& segment : segments) {
    if (segment.token != nullptr) continue;
    pieces.clear();
    kSplit->Split(segment.text, &pieces);
    for (std::string_view piece : pieces) ++counts[piece];
  }
  std::vector<std::pair<std::string_view, int64_t>> words(counts.begin(), counts.end());
  std::sort(words.begin(), words.end());  // a fixed order, whatever the hash
  return words;
}

}  // namespace

absl::StatusOr<std::string> TrainByteLevelBpe(const std::string& text,
                                              const BpeTrainerOptions& options) {
  const int num_specials = static_cast<int>(options.special_tokens.size());
  if (options.vocab_size < 256 + num_specials) {
    return absl::InvalidArgumentError(absl::StrCat("BPE trainer: vocab_size ", options.vocab_size,
                                                   " is below the 256 byte tokens plus ",
                                                   num_specials, " special tokens"));
  }
  // Ids and texts: special tokens, the byte alphabet in code point order
  // (as HF sorts it), then one per merge.
  const ByteLevelAlphabet& alphabet = ByteLevelAlphabet::Get();
  std::set<std::string_view> seen;
  for (int b = 0; b < 256; ++b) seen.insert(alphabet.Text(b));
  for (const std::string& token : options.special_tokens) {
    if (token.empty() || !IsValidUtf8(token) || !seen.insert(token).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("BPE trainer: special token '", token,
                       "' is empty, not UTF-8, repeated or the same as a byte token"));
    }
  }
  std::vector<std::string> token_texts(options.special_tokens);
  std::array<int32_t, 256> byte_ids{};
  std::vector<int> bytes_by_code_point(256);
  for (int b = 0; b < 256; ++b) bytes_by_code_point[b] = b;
  std::sort(bytes_by_code_point.begin(), bytes_by_code_point.end(),
            [&](int a, int b) { return alphabet.CodePoint(a) < alphabet.CodePoint(b); });
  for (int b : bytes_by_code_point) {
    byte_ids[b] = static_cast<int32_t>(token_texts.size());
    token_texts.push_back(alphabet.Text(b));
  }

  std::unordered_map<std::string, int32_t> id_of_text;
  for (size_t id = 0; id < token_texts.size(); ++id) id_of_text.emplace(token_texts[id], id);

  const std::vector<std::pair<std::string_view, int64_t>> word_counts =
      CountWords(text, options.special_tokens);
  std::vector<std::vector<int32_t>> words(word_counts.size());
  std::unordered_map<Pair, int64_t> pair_counts;
  // The words that hold each pair (possibly no longer: checked on use).
  std::unordered_map<Pair, std::vector<uint32_t>> pair_words;
  for (uint32_t w = 0; w < words.size(); ++w) {
    const auto& [word, count] = word_counts[w];
    for (char b : word) words[w].push_back(byte_ids[static_cast<uint8_t>(b)]);
    for (size_t i = 0; i + 1 < words[w].size(); ++i) {
      const Pair pair = MakePair(words[w][i], words[w][i + 1]);
      pair_counts[pair] += count;
      std::vector<uint32_t>& holders = pair_words[pair];
      if (holders.empty() || holders.back() != w) holders.push_back(w);
    }
  }
  std::priority_queue<HeapEntry> heap;
  for (const auto& [pair, count] : pair_counts) heap.push({count, pair});

  std::vector<std::pair<int32_t, int32_t>> merges;
  const int64_t min_count = std::max<int64_t>(1, options.min_frequency);
  std::vector<int32_t> merged_word;
  std::unordered_map<Pair, int64_t> changes;
  while (static_cast<int>(token_texts.size()) < options.vocab_size && !heap.empty()) {
    const HeapEntry top = heap.top();
    heap.pop();
    const int64_t current = pair_counts[top.pair];
    if (top.count != current) {
      // Counts of existing pairs only fall; re-queue with the true count.
      if (current > 0) heap.push({current, top.pair});
      continue;
    }
    if (top.count < min_count) break;

    const int32_t left = Left(top.pair);
    const int32_t right = Right(top.pair);
    // A merge that spells an existing token (a special token, say) takes its
    // id, as in HF tokenizers; the vocabulary cannot hold a text twice.
    std::string merged_text = token_texts[left] + token_texts[right];
    const auto [known, is_new] =
        id_of_text.emplace(merged_text, static_cast<int32_t>(token_texts.size()));
    const int32_t new_id = known->second;
    if (is_new) token_texts.push_back(std::move(merged_text));
    merges.emplace_back(left, right);

    // Rewrite each word that holds the pair, left to right without overlap
    // ("a a a" + (a, a) -> "aa a"), and record how its pairs change.
    const std::vector<uint32_t> words_with_pair = std::move(pair_words[top.pair]);
    pair_words.erase(top.pair);
    pair_counts.erase(top.pair);
    changes.clear();
    for (uint32_t w : words_with_pair) {
      std::vector<int32_t>& symbols = words[w];
      merged_word.clear();
      bool found = false;
      for (size_t i = 0; i < symbols.size(); ++i) {
        if (i + 1 < symbols.size() && symbols[i] == left && symbols[i + 1] == right) {
          merged_word.push_back(new_id);
          found = true;
          ++i;
        } else {
          merged_word.push_back(symbols[i]);
        }
      }
      if (!found) continue;
      const int64_t count = word_counts[w].second;
      for (size_t i = 0; i + 1 < symbols.size(); ++i)
        changes[MakePair(symbols[i], symbols[i + 1])] -= count;
      for (size_t i = 0; i + 1 < merged_word.size(); ++i) {
        const int32_t a = merged_word[i];
        const int32_t b = merged_word[i + 1];
        changes[MakePair(a, b)] += count;
        if (a == new_id || b == new_id) {
          std::vector<uint32_t>& holders = pair_words[MakePair(a, b)];
          if (holders.empty() || holders.back() != w) holders.push_back(w);
        }
      }
      symbols.swap(merged_word);
    }
    for (const auto& [pair, delta] : changes) {
      if (delta == 0 || pair == top.pair) continue;  // the merged pair is gone for good
      const int64_t count = pair_counts[pair] += delta;
      // Only pairs with the new token gain counts: queue them now. The
      // others fell, and their heap entries are refreshed when popped.
      if (delta > 0 && count > 0) heap.push({count, pair});
    }
  }

  using ojson = nlohmann::ordered_json;
  ojson added_tokens = ojson::array();
  for (int i = 0; i < num_specials; ++i) {
    added_tokens.push_back({{"id", i},
                            {"content", options.special_tokens[i]},
                            {"single_word", false},
                            {"lstrip", false},
                            {"rstrip", false},
                            {"normalized", false},
                            {"special", true}});
  }
  ojson vocab = ojson::object();
  for (size_t id = 0; id < token_texts.size(); ++id) vocab[token_texts[id]] = id;
  ojson merge_list = ojson::array();
  // "a b" strings: every tokenizers version reads them, and byte-level
  // tokens never hold a space (it is spelled 'Ġ').
  for (const auto& [a, b] : merges)
    merge_list.push_back(absl::StrCat(token_texts[a], " ", token_texts[b]));
  const ojson byte_level = {{"type", "ByteLevel"},
                            {"add_prefix_space", false},
                            {"trim_offsets", true},
                            {"use_regex", true}};
  ojson root = {{"version", "1.0"},
                {"truncation", nullptr},
                {"padding", nullptr},
                {"added_tokens", std::move(added_tokens)},
                {"normalizer", nullptr},
                {"pre_tokenizer", byte_level},
                {"post_processor", nullptr},
                {"decoder", byte_level},
                {"model",
                 {{"type", "BPE"},
                  {"dropout", nullptr},
                  {"unk_token", nullptr},
                  {"continuing_subword_prefix", nullptr},
                  {"end_of_word_suffix", nullptr},
                  {"fuse_unk", false},
                  {"byte_fallback", false},
                  {"vocab", std::move(vocab)},
                  {"merges", std::move(merge_list)}}}};
  return root.dump(2);
}

}  // namespace compress::engine
