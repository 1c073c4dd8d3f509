// Trains the project's test model: a small Llama on the King James text
// (Debian's bible-kjv), with the project's own BPE trainer and training loop.
// Genesis..Jude is the training text; Revelation is held out for evaluation.
//
//   train_test_model --out DIR [--steps 3000] [--batch 16] [--seq 128] [--threads 0]
//
// Writes DIR/config.json, DIR/model.safetensors (BF16), DIR/tokenizer.json,
// DIR/training.json (settings, loss curve summary, held-out perplexity) and
// prints a sample generation.
#include <ATen/ATen.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/files.h"
#include "common/flags.h"
#include "worker/engine/model/generate.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/recipe/runner.h"
#include "worker/engine/tokenizer/bpe_trainer.h"
#include "worker/engine/tokenizer/tokenizer.h"
#include "worker/engine/train/trainer.h"

namespace {

using namespace compress::engine;

// `bible -f RANGE` prints "Book1:1 verse text" lines; keep the verse text.
std::string BibleText(const std::string& range) {
  std::string command = "bible -f " + range + " 2>/dev/null", raw;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return "";
  char buffer[1 << 16];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) raw.append(buffer, n);
  pclose(pipe);
  std::string text;
  size_t start = 0;
  while (start < raw.size()) {
    size_t end = raw.find('\n', start);
    if (end == std::string::npos) end = raw.size();
    size_t space = raw.find(' ', start);
    if (space != std::string::npos && space < end) text.append(raw, space + 1, end - space - 1);
    if (end > start) text.push_back('\n');
    start = end + 1;
  }
  return text;
}

// Mean next-token NLL over non-overlapping windows (the held-out figure).
double HeldOutPerplexity(const LlamaModel& model, const std::vector<int32_t>& tokens, int64_t window) {
  at::NoGradGuard no_grad;
  double nll = 0;
  int64_t count = 0;
  for (size_t begin = 0; begin + 2 <= tokens.size(); begin += window) {
    int64_t length = std::min<int64_t>(window + 1, static_cast<int64_t>(tokens.size() - begin));
    if (length < 2) break;
    at::Tensor ids = at::tensor(std::vector<int64_t>(tokens.begin() + begin, tokens.begin() + begin + length),
                                at::kLong)
                         .unsqueeze(0);
    at::Tensor logits = *model.Forward(ids.narrow(1, 0, length - 1));
    at::Tensor logp = at::log_softmax(logits.to(at::kDouble).squeeze(0), -1);
    at::Tensor targets = ids.narrow(1, 1, length - 1).squeeze(0);
    nll -= logp.gather(1, targets.unsqueeze(1)).sum().item<double>();
    count += length - 1;
  }
  return std::exp(nll / static_cast<double>(count));
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "train_test_model: %s\n", status.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string out_dir;
  int steps = 3000, batch = 16, seq = 128, threads = 0, vocab = 1024, seed = 1;
  compress::FlagSet flags("train_test_model");
  flags.Add("out", &out_dir, "folder for the trained model");
  flags.Add("steps", &steps, "optimizer steps");
  flags.Add("batch", &batch, "sequences per step");
  flags.Add("seq", &seq, "tokens per sequence");
  flags.Add("threads", &threads, "CPU threads (0: one per core)");
  flags.Add("vocab", &vocab, "BPE vocabulary size");
  flags.Add("seed", &seed, "seed for initialisation and batches");
  if (absl::Status parsed = flags.Parse(argc, argv); !parsed.ok()) return Fail(parsed);
  if (out_dir.empty()) return Fail(absl::InvalidArgumentError("--out is required"));
  SetCpuThreads(threads);

  const std::string train_text = BibleText("Gen1:1-Jude1:25");
  const std::string held_out_text = BibleText("Rev1:1-Rev22:21");
  if (train_text.empty() || held_out_text.empty()) {
    return Fail(absl::FailedPreconditionError("no text: install bible-kjv (scripts/setup.sh)"));
  }
  BpeTrainerOptions bpe;
  bpe.vocab_size = vocab;
  bpe.special_tokens = {"<|begin_of_text|>", "<|end_of_text|>"};
  absl::StatusOr<std::string> tokenizer_json = TrainByteLevelBpe(train_text, bpe);
  if (!tokenizer_json.ok()) return Fail(tokenizer_json.status());
  absl::StatusOr<Tokenizer> tokenizer = Tokenizer::FromJson(*tokenizer_json, "trained");
  if (!tokenizer.ok()) return Fail(tokenizer.status());
  const std::vector<int32_t> train_tokens = tokenizer->Encode(train_text);
  const std::vector<int32_t> held_out_tokens = tokenizer->Encode(held_out_text);
  std::printf("train %zu bytes -> %zu tokens; held out (Revelation) %zu tokens\n", train_text.size(),
              train_tokens.size(), held_out_tokens.size());

  RandomModelOptions init;
  init.hidden_size = 256;
  init.intermediate_size = 768;
  init.num_layers = 6;
  init.num_heads = 8;
  init.num_kv_heads = 4;
  init.vocab_size = tokenizer->vocab_size();
  init.seed = static_cast<uint64_t>(seed);
  std::string init_dir = out_dir + ".init";
  if (absl::Status s = WriteRandomLlamaModel(init, init_dir); !s.ok()) return Fail(s);
  absl::StatusOr<LlamaModel> model = LlamaModel::Load(init_dir);
  if (!model.ok()) return Fail(model.status());

  TrainOptions options;
  options.schedule = {/*peak=*/3e-3, /*minimum=*/3e-4, /*warmup_steps=*/std::max(1, steps / 20),
                      /*total_steps=*/steps};
  options.batch_size = batch;
  options.sequence_length = seq;
  options.seed = static_cast<uint64_t>(seed);
  double smoothed = 0;
  auto began = std::chrono::steady_clock::now();
  options.on_step = [&](const TrainStep& step) {
    smoothed = step.step == 1 ? step.loss : 0.98 * smoothed + 0.02 * step.loss;
    if (step.step % 50 == 0 || step.step == 1) {
      double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
      std::printf("step %5lld  loss %.3f (smoothed %.3f)  lr %.2e  |g| %.2f  %.0f tok/s  %.0f s\n",
                  static_cast<long long>(step.step), step.loss, smoothed, step.learning_rate,
                  step.gradient_norm, step.tokens_per_second, elapsed);
      std::fflush(stdout);
    }
  };
  absl::StatusOr<TrainResult> trained = TrainCausalLm(*model, train_tokens, options);
  if (!trained.ok()) return Fail(trained.status());
  const double perplexity = HeldOutPerplexity(*model, held_out_tokens, seq);
  std::printf("held-out perplexity (Revelation, windows of %d): %.3f\n", seq, perplexity);

  if (absl::Status s = model->SaveHuggingFace(out_dir, at::kBFloat16); !s.ok()) return Fail(s);
  if (absl::Status s = compress::WriteFileAtomic(out_dir + "/tokenizer.json", *tokenizer_json); !s.ok()) {
    return Fail(s);
  }
  std::filesystem::remove_all(init_dir);
  std::string summary = absl::StrFormat(
      "{\n  \"data\": \"bible-kjv: train Gen1:1-Jude1:25, held out Rev1:1-Rev22:21\",\n"
      "  \"steps\": %d, \"batch\": %d, \"sequence_length\": %d, \"vocab\": %d, \"seed\": %d,\n"
      "  \"final_smoothed_loss\": %.4f,\n  \"held_out_perplexity_f32\": %.4f\n}\n",
      steps, batch, seq, tokenizer->vocab_size(), seed, smoothed, perplexity);
  if (absl::Status s = compress::WriteFileAtomic(out_dir + "/training.json", summary); !s.ok()) {
    return Fail(s);
  }

  GenerateOptions sample;
  sample.max_new_tokens = 60;
  sample.temperature = 0.8;
  sample.top_p = 0.95;
  sample.seed = 3;
  absl::StatusOr<GenerateResult> generated =
      Generate(*model, tokenizer->Encode("And God said"), sample);
  if (generated.ok()) {
    std::printf("sample: And God said%s\n", tokenizer->Decode(generated->tokens).c_str());
  }
  return 0;
}
