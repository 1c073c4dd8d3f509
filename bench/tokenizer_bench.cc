// Tokenizer throughput on the King James text: trains a byte-level BPE of
// 1024 tokens, then encodes the whole text, against a plain memcpy of the
// same bytes in the same run. Prints medians over repeats and the ratio.
//
//   tokenizer_bench [--text FILE] [--vocab 1024] [--repeats 5]
// Without --text it reads `bible -f Gen1:1-Rev22:21` (Debian's bible-kjv).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "common/files.h"
#include "worker/engine/tokenizer/bpe_trainer.h"
#include "worker/engine/tokenizer/tokenizer.h"

namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::string ReadCommand(const char* command) {
  std::string out;
  FILE* pipe = popen(command, "r");
  if (pipe == nullptr) return out;
  char buffer[1 << 16];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) out.append(buffer, n);
  pclose(pipe);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string text_path;
  int vocab = 1024, repeats = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string name = argv[i];
    if (name == "--text") text_path = argv[i + 1];
    if (name == "--vocab") (void)absl::SimpleAtoi(argv[i + 1], &vocab);
    if (name == "--repeats") (void)absl::SimpleAtoi(argv[i + 1], &repeats);
  }
  std::string text;
  if (text_path.empty()) {
    text = ReadCommand("bible -f Gen1:1-Rev22:21 2>/dev/null");
  } else if (auto read = compress::ReadFile(text_path); read.ok()) {
    text = *read;
  }
  if (text.empty()) {
    std::fprintf(stderr, "tokenizer_bench: no text (install bible-kjv or pass --text FILE)\n");
    return 1;
  }
  const double megabytes = static_cast<double>(text.size()) / 1e6;

  compress::engine::BpeTrainerOptions options;
  options.vocab_size = vocab;
  auto start = Clock::now();
  auto json = compress::engine::TrainByteLevelBpe(text, options);
  double train_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (!json.ok()) {
    std::fprintf(stderr, "train: %s\n", json.status().ToString().c_str());
    return 1;
  }
  auto tokenizer = compress::engine::Tokenizer::FromJson(*json, "trained");
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "load: %s\n", tokenizer.status().ToString().c_str());
    return 1;
  }

  std::vector<double> encode_seconds, copy_seconds;
  size_t tokens = 0;
  std::vector<char> copy(text.size());
  for (int r = 0; r < repeats; ++r) {
    // A fresh tokenizer per repeat: the word cache must not make later runs free.
    auto fresh = compress::engine::Tokenizer::FromJson(*json, "trained");
    start = Clock::now();
    tokens = fresh->Encode(text).size();
    encode_seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
    start = Clock::now();
    std::memcpy(copy.data(), text.data(), text.size());
    copy_seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  double encode_mbps = megabytes / Median(encode_seconds);
  double copy_mbps = megabytes / Median(copy_seconds);
  std::printf("text: %.2f MB, vocab %d, trained in %.2f s\n", megabytes, vocab, train_seconds);
  std::printf("encode: %.1f MB/s (median of %d), %.3f tokens/byte\n", encode_mbps, repeats,
              static_cast<double>(tokens) / static_cast<double>(text.size()));
  std::printf("memcpy: %.1f MB/s; encode/memcpy ratio %.5f\n", copy_mbps, encode_mbps / copy_mbps);
  return 0;
}
