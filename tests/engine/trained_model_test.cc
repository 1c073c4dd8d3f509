// The project's trained test model (tests/fixtures/kjv-llama): it loads, its
// held-out perplexity is the one recorded when it was trained, and it writes
// recognisably scriptural text.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "tests/engine/test_util.h"
#include "worker/engine/eval/eval.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/tokenizer/tokenizer.h"

namespace compress::engine {
namespace {

constexpr char kModel[] = FIXTURES_DIR "/kjv-llama";

// Verse text of a `bible -f` range, one verse per line (as the trainer reads it).
std::string Bible(const std::string& range) {
  std::string text;
  FILE* pipe = popen(("bible -f " + range + " 2>/dev/null | sed 's/^[^ ]* //'").c_str(), "r");
  if (pipe == nullptr) return text;
  char buffer[1 << 16];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) text.append(buffer, n);
  pclose(pipe);
  return text;
}

TEST(TrainedModel, HeldOutPerplexityIsTheRecordedOne) {
  const std::string revelation = Bible("Rev1:1-Rev22:21");
  ASSERT_GT(revelation.size(), 10000u) << "bible-kjv is missing: bash scripts/setup.sh";
  absl::StatusOr<Tokenizer> tokenizer = Tokenizer::FromFile(std::string(kModel) + "/tokenizer.json");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  absl::StatusOr<LlamaModel> model = LlamaModel::Load(kModel);
  ASSERT_TRUE(model.ok()) << model.status();
  const nlohmann::json training =
      nlohmann::json::parse(testing::ReadBytes(std::string(kModel) + "/training.json"));
  // Non-overlapping windows of 128, as the trainer measured it (in float32,
  // before the weights were rounded to bfloat16 for shipping).
  PerplexityOptions windows;
  windows.context_length = 128;
  windows.stride = 128;
  absl::StatusOr<PerplexityResult> held_out = Perplexity(*model, tokenizer->Encode(revelation), windows);
  ASSERT_TRUE(held_out.ok()) << held_out.status();
  const double recorded = training["held_out_perplexity_f32"].get<double>();
  EXPECT_NEAR(held_out->perplexity, recorded, 0.02 * recorded);
  // Far better than the unigram frequencies of its own vocabulary.
  EXPECT_LT(held_out->perplexity, 0.5 * tokenizer->vocab_size());
}

TEST(TrainedModel, WritesScripturalText) {
  absl::StatusOr<Tokenizer> tokenizer = Tokenizer::FromFile(std::string(kModel) + "/tokenizer.json");
  absl::StatusOr<LlamaModel> model = LlamaModel::Load(kModel);
  ASSERT_TRUE(tokenizer.ok() && model.ok());
  GenerateOptions greedy;
  greedy.max_new_tokens = 40;
  absl::StatusOr<SampleResult> sample = SampleText(*model, *tokenizer, "And God said", greedy);
  ASSERT_TRUE(sample.ok()) << sample.status();
  const std::string& text = sample->completion;
  // Words of the King James text that a model of it cannot avoid.
  int found = 0;
  for (const char* word : {" the ", " unto ", " and ", " of ", " shall ", " LORD"}) {
    if (text.find(word) != std::string::npos) ++found;
  }
  EXPECT_GE(found, 3) << "And God said" << text;
}

}  // namespace
}  // namespace compress::engine
