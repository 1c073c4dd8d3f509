#include "worker/engine/tokenizer/bpe_model.h"

#include <algorithm>
#include <functional>
#include <queue>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "worker/engine/tokenizer/unicode.h"

namespace compress::engine {
namespace {

absl::Status Invalid(std::string_view what) {
  return absl::InvalidArgumentError(std::string(what));
}

// A symbol of the word being merged, in a doubly linked list over the
// initial positions; a symbol merged into its left neighbour gets id -1.
struct Symbol {
  int32_t id;
  int32_t prev;
  int32_t next;
};

// A merge that may apply at `pos` (the left symbol). Entries go stale when
// a neighbour merges first; they are checked when popped, as HF does.
struct Candidate {
  int32_t rank;
  int32_t pos;
  int32_t new_id;
  // The heap pops the lowest rank, then the leftmost position.
  bool operator>(const Candidate& other) const {
    return rank != other.rank ? rank > other.rank : pos > other.pos;
  }
};

}  // namespace

absl::StatusOr<BpeModel> BpeModel::Create(BpeModelSpec spec) {
  BpeModel model;
  int32_t max_id = -1;
  for (const auto& [token, id] : spec.vocab) {
    if (id < 0 || id > kMaxTokenId) {
      return Invalid(absl::StrCat("model.vocab: token '", token, "' has the id ", id,
                                  ", outside 0..", kMaxTokenId));
    }
    max_id = std::max(max_id, id);
  }
  auto id_to_token = std::make_unique<std::vector<std::string>>(max_id + 1);
  std::vector<bool> seen(max_id + 1, false);
  for (auto& [token, id] : spec.vocab) {
    if (seen[id]) return Invalid(absl::StrCat("model.vocab: id ", id, " is used twice"));
    seen[id] = true;
    (*id_to_token)[id] = std::move(token);
  }
  model.id_to_token_ = std::move(id_to_token);
  model.token_to_id_.reserve(model.id_to_token_->size());
  for (int32_t id = 0; id <= max_id; ++id) {
    if (!seen[id]) continue;
    const std::string& token = (*model.id_to_token_)[id];
    if (!model.token_to_id_.emplace(token, id).second) {
      return Invalid(absl::StrCat("model.vocab: token '", token, "' appears twice"));
    }
  }

  model.merges_.reserve(spec.merges.size());
  for (size_t rank = 0; rank < spec.merges.size(); ++rank) {
    const auto& [left, right] = spec.merges[rank];
    const std::optional<int32_t> left_id = model.TokenToId(left);
    const std::optional<int32_t> right_id = model.TokenToId(right);
    const std::optional<int32_t> merged_id = model.TokenToId(left + right);
    if (!left_id || !right_id || !merged_id) {
      return Invalid(absl::StrCat("model.merges[", rank, "] '", left, " ", right, "': '",
                                  !left_id    ? left
                                  : !right_id ? right
                                              : left + right,
                                  "' is not in the vocabulary"));
    }
    // A repeated pair takes its last rank: HF tokenizers collects the
    // merges into a map, where a later entry overwrites an earlier one.
    model.merges_.insert_or_assign(PairKey(*left_id, *right_id),
                                   MergeResult{static_cast<int32_t>(rank), *merged_id});
  }

  if (spec.unk_token) {
    model.unk_id_ = model.TokenToId(*spec.unk_token);
    if (!model.unk_id_) {
      return Invalid(
          absl::StrCat("model.unk_token '", *spec.unk_token, "' is not in the vocabulary"));
    }
  }
  model.fuse_unk_ = spec.fuse_unk;
  model.byte_fallback_ = spec.byte_fallback;
  model.ignore_merges_ = spec.ignore_merges;
  model.byte_level_ = spec.byte_level;
  const ByteLevelAlphabet& alphabet = ByteLevelAlphabet::Get();
  for (int b = 0; b < 256; ++b) {
    model.byte_symbol_[b] = model.TokenToId(alphabet.Text(b)).value_or(-1);
    model.fallback_id_[b] = model.TokenToId(absl::StrFormat("<0x%02X>", b)).value_or(-1);
  }
  return model;
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  const auto it = token_to_id_.find(token);
  if (it == token_to_id_.end()) return std::nullopt;
  return it->second;
}

std::string_view BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || id >= id_limit()) return {};
  return (*id_to_token_)[id];
}

void BpeModel::InitialSymbols(std::string_view word, std::vector<int32_t>* symbols) const {
  bool last_is_unk = false;
  size_t pos = 0;
  while (pos < word.size()) {
    // The character at `pos` and its id, if the vocabulary has it.
    size_t length;
    int32_t id;
    if (byte_level_) {
      length = 1;
      id = byte_symbol_[static_cast<uint8_t>(word[pos])];
    } else {
      length = DecodeUtf8(word, pos).length;
      id = TokenToId(word.substr(pos, length)).value_or(-1);
    }
    const std::string_view bytes = word.substr(pos, length);
    pos += length;
    if (id >= 0) {
      symbols->push_back(id);
      last_is_unk = false;
      continue;
    }
    if (byte_fallback_) {
      bool all_bytes_known = true;
      for (char b : bytes) all_bytes_known &= fallback_id_[static_cast<uint8_t>(b)] >= 0;
      if (all_bytes_known) {
        for (char b : bytes) symbols->push_back(fallback_id_[static_cast<uint8_t>(b)]);
        last_is_unk = false;
        continue;
      }
    }
    // Unknown: one <unk> (a run of them fused into one with fuse_unk), or
    // nothing at all when the model has no unk_token, as in HF tokenizers.
    if (unk_id_ && !(fuse_unk_ && last_is_unk)) {
      symbols->push_back(*unk_id_);
      last_is_unk = true;
    }
  }
}

void BpeModel::MergeSymbols(std::vector<int32_t>* ids) const {
  if (ids->size() < 2 || merges_.empty()) return;
  const int32_t n = static_cast<int32_t>(ids->size());
  std::vector<Symbol> symbols(n);
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  const auto push_if_mergeable = [&](int32_t pos) {
    const Symbol& left = symbols[pos];
    const auto it = merges_.find(PairKey(left.id, symbols[left.next].id));
    if (it != merges_.end()) queue.push({it->second.rank, pos, it->second.id});
  };
  for (int32_t i = 0; i < n; ++i) symbols[i] = {(*ids)[i], i - 1, i + 1 < n ? i + 1 : -1};
  for (int32_t i = 0; i + 1 < n; ++i) push_if_mergeable(i);

  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.id < 0 || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    // Stale when either side changed since the entry was pushed. HF compares
    // only the resulting id; doing the same keeps the ids identical to HF's
    // even for vocabularies where two pairs make the same token.
    const auto it = merges_.find(PairKey(left.id, right.id));
    if (it == merges_.end() || it->second.id != top.new_id) continue;
    left.id = top.new_id;
    right.id = -1;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    if (left.prev >= 0) push_if_mergeable(left.prev);
    if (left.next >= 0) push_if_mergeable(top.pos);
  }
  ids->clear();
  for (int32_t i = 0; i >= 0; i = symbols[i].next) ids->push_back(symbols[i].id);
}

void BpeModel::EncodeWord(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    std::optional<int32_t> whole;
    if (byte_level_) {
      std::string spelled;
      for (char b : word) spelled += ByteLevelAlphabet::Get().Text(static_cast<uint8_t>(b));
      whole = TokenToId(spelled);
    } else {
      whole = TokenToId(word);
    }
    if (whole) {
      ids->push_back(*whole);
      return;
    }
  }
  std::vector<int32_t> symbols;
  symbols.reserve(word.size());
  InitialSymbols(word, &symbols);
  MergeSymbols(&symbols);
  ids->insert(ids->end(), symbols.begin(), symbols.end());
}

}  // namespace compress::engine
