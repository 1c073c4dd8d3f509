// The model runtime's speed on a random hidden-256, 6-block Llama (the test
// model's shape), each figure with a baseline measured in the same run:
//   forward     tokens/s of a [4, 128] batch, and the GFLOP/s its linear
//               layers reach as a fraction of a plain at::mm of the same
//               shapes (the ceiling any forward pass has on this machine)
//   decode      tokens/s with the KV cache against recomputing the whole
//               sequence for every new token (what no cache costs)
//   perplexity  tokens/s of Perplexity at context 256, stride 128, against
//               the forward pass's tokens/s (the overhead of scoring)
// Medians over --repeats.
//
//   runtime_bench [--repeats 5] [--threads 0]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "worker/engine/eval/eval.h"
#include "worker/engine/model/generate.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/recipe/runner.h"

namespace {

using namespace compress::engine;
using Clock = std::chrono::steady_clock;

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

template <typename F>
double MedianSeconds(int repeats, F&& run) {
  std::vector<double> seconds;
  run();  // warm-up
  for (int i = 0; i < repeats; ++i) {
    const Clock::time_point start = Clock::now();
    run();
    seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  return Median(seconds);
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "runtime_bench: %s\n", status.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  int repeats = 5, threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string name = argv[i];
    if ((name != "--repeats" || !absl::SimpleAtoi(argv[i + 1], &repeats)) &&
        (name != "--threads" || !absl::SimpleAtoi(argv[i + 1], &threads))) {
      std::fprintf(stderr, "usage: runtime_bench [--repeats 5] [--threads 0]\n");
      return 2;
    }
  }
  SetCpuThreads(threads);
  c10::InferenceMode inference;
  RandomModelOptions options;
  options.hidden_size = 256;
  options.intermediate_size = 768;
  options.num_layers = 6;
  options.num_heads = 8;
  options.num_kv_heads = 4;
  options.vocab_size = 1024;
  const std::string dir =
      (std::filesystem::temp_directory_path() / "compress-runtime-bench").string();
  if (absl::Status s = WriteRandomLlamaModel(options, dir); !s.ok()) return Fail(s);
  absl::StatusOr<LlamaModel> model = LlamaModel::Load(dir);
  std::filesystem::remove_all(dir);
  if (!model.ok()) return Fail(model.status());
  std::printf("llama hidden 256, 6 blocks, 8/4 heads, FFN 768, vocab 1024, F32 CPU, %d threads\n",
              at::get_num_threads());

  // Forward against the matmuls of its linear layers.
  at::manual_seed(1);
  const at::Tensor ids = at::randint(0, options.vocab_size, {4, 128}, at::kLong);
  const double forward = MedianSeconds(repeats, [&] { (void)model->Forward(ids); });
  const int64_t tokens = ids.numel();
  std::vector<std::pair<int64_t, int64_t>> shapes;  // [out, in] of every linear
  for (int64_t layer = 0; layer < options.num_layers; ++layer) {
    shapes.insert(shapes.end(), {{256, 256}, {128, 256}, {128, 256}, {256, 256},
                                 {768, 256}, {768, 256}, {256, 768}});
  }
  shapes.push_back({options.vocab_size, 256});
  double flops = 0;
  std::vector<std::pair<at::Tensor, at::Tensor>> operands;
  for (const auto& [out, in] : shapes) {
    flops += 2.0 * tokens * out * in;
    operands.emplace_back(at::randn({tokens, in}), at::randn({in, out}));
  }
  const double matmuls = MedianSeconds(repeats, [&] {
    for (const auto& [x, w] : operands) (void)x.mm(w);
  });
  std::printf("  forward [4, 128]:  %8.0f tokens/s, linears at %.1f GFLOP/s; the same at::mm "
              "alone %.1f GFLOP/s: ratio %.2f\n",
              tokens / forward, flops / forward / 1e9, flops / matmuls / 1e9, matmuls / forward);

  // Decode with the KV cache against recomputing the prefix each step.
  std::vector<int32_t> prompt(32);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>(i * 37 % 1024);
  GenerateOptions generate;
  generate.max_new_tokens = 33;
  std::vector<double> decode_rates;
  for (int i = 0; i < repeats; ++i) {
    absl::StatusOr<GenerateResult> result = Generate(*model, prompt, generate);
    if (!result.ok()) return Fail(result.status());
    decode_rates.push_back(result->decode_tokens_per_second());
  }
  const double cached = Median(decode_rates);
  const double recompute = MedianSeconds(repeats, [&] {
    std::vector<int64_t> sequence(prompt.begin(), prompt.end());
    for (int step = 0; step < 32; ++step) {
      const at::Tensor input =
          at::tensor(sequence, at::kLong).unsqueeze(0);
      const at::Tensor logits = *model->Forward(input);
      sequence.push_back(logits[0][-1].argmax().item<int64_t>());
    }
  });
  std::printf("  decode (batch 1):  %8.0f tokens/s with the KV cache; recomputing the sequence "
              "%.0f tokens/s: ratio %.1f\n",
              cached, 32 / recompute, cached / (32 / recompute));

  // Perplexity against the plain forward pass.
  std::vector<int32_t> text(4097);
  for (size_t i = 0; i < text.size(); ++i) text[i] = static_cast<int32_t>((i * 7919) % 1024);
  PerplexityOptions windows;
  windows.context_length = 256;
  windows.stride = 128;
  std::vector<double> rates;
  for (int i = 0; i < repeats; ++i) {
    absl::StatusOr<PerplexityResult> result = Perplexity(*model, text, windows);
    if (!result.ok()) return Fail(result.status());
    rates.push_back(result->tokens_per_second);
  }
  // Stride 128 of context 256 runs each token through the model twice.
  std::printf("  perplexity (context 256, stride 128): %.0f scored tokens/s; forward %.0f "
              "tokens/s / 2: ratio %.2f\n",
              Median(rates), tokens / forward / 2, Median(rates) / (tokens / forward / 2));
  return 0;
}
