// Each quantization method's cost per layer: seconds to quantize one
// --size x --size linear (W4, groups of 128; NF4 in blocks of 64) given its
// inputs' Hessian, against RTN on the same weight and against one matrix
// product of the same size (the unit GPTQ's lazy updates and AWQ's error
// evaluations are made of). Also each result's output error on the inputs
// the Hessian came from, as a ratio to RTN's. Medians over --repeats.
//
//   quant_bench [--size 4096] [--repeats 3] [--threads 0]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "worker/engine/quant/awq.h"
#include "worker/engine/quant/bnb4bit.h"
#include "worker/engine/quant/gptq.h"
#include "worker/engine/quant/hqq.h"
#include "worker/engine/quant/rtn.h"
#include "worker/engine/recipe/runner.h"

namespace {

using namespace compress::engine;
using Clock = std::chrono::steady_clock;

template <typename F>
double MedianSeconds(int repeats, F&& run) {
  std::vector<double> seconds;
  for (int i = 0; i < repeats; ++i) {
    const Clock::time_point start = Clock::now();
    run();
    seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(seconds.begin(), seconds.end());
  return seconds[seconds.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int64_t size = 4096;
  int repeats = 3, threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string name = argv[i];
    bool ok = (name == "--size" && absl::SimpleAtoi(argv[i + 1], &size)) ||
              (name == "--repeats" && absl::SimpleAtoi(argv[i + 1], &repeats)) ||
              (name == "--threads" && absl::SimpleAtoi(argv[i + 1], &threads));
    if (!ok) {
      std::fprintf(stderr, "usage: quant_bench [--size 4096] [--repeats 3] [--threads 0]\n");
      return 2;
    }
  }
  SetCpuThreads(threads);
  c10::InferenceMode inference;
  at::manual_seed(1);
  const at::Tensor weight = at::randn({size, size}) * 0.02;
  // Correlated inputs with unequal channels, as activations are.
  const at::Tensor mix = at::eye(size) + 0.05 * at::randn({size, size});
  const at::Tensor x = at::randn({2048, size}).mm(mix) * at::linspace(0.2, 3.0, size);
  const at::Tensor hessian = x.t().mm(x);

  GptqOptions options;
  options.grid.bits = 4;
  options.grid.group_size = 128;
  absl::StatusOr<GptqResult> gptq;
  const double gptq_seconds =
      MedianSeconds(repeats, [&] { gptq = QuantizeGptq(weight, hessian, options, "bench"); });
  if (!gptq.ok()) {
    std::fprintf(stderr, "%s\n", gptq.status().ToString().c_str());
    return 1;
  }
  absl::StatusOr<QuantizedTensor> rtn;
  const double rtn_seconds =
      MedianSeconds(repeats, [&] { rtn = QuantizeRtn(weight, options.grid, "bench"); });
  const double matmul_seconds = MedianSeconds(repeats, [&] { (void)weight.mm(weight); });
  const double rtn_error = RelativeOutputError(weight, Dequantize(*rtn, at::kFloat), hessian);
  // AWQ: the scale search (the input's mean |x| from the same inputs), then
  // the clipping search, then RTN on the scaled weight.
  const at::Tensor mean_abs = x.abs().mean(0);
  AwqOptions awq_options;
  awq_options.grid = options.grid;
  absl::StatusOr<AwqScales> scales;
  const double awq_seconds = MedianSeconds(repeats, [&] {
    scales = SearchAwqScales({weight}, mean_abs, awq_options, "bench",
                             LinearOutputError({weight}, hessian));
  });
  absl::StatusOr<at::Tensor> clipped;
  const at::Tensor scaled = weight * scales->scales;
  const at::Tensor scaled_hessian = hessian / scales->scales.unsqueeze(0) / scales->scales.unsqueeze(1);
  const double clip_seconds = MedianSeconds(repeats, [&] {
    clipped = SearchAwqClip(scaled, scaled_hessian, awq_options, "bench");
  });
  const at::Tensor awq_weight =
      Dequantize(*QuantizeRtn(*clipped, options.grid, "bench"), at::kFloat) / scales->scales;
  HqqOptions hqq_options;
  hqq_options.grid = options.grid;
  absl::StatusOr<QuantizedTensor> hqq;
  const double hqq_seconds =
      MedianSeconds(repeats, [&] { hqq = QuantizeHqq(weight, hqq_options, "bench"); });
  absl::StatusOr<Bnb4BitTensor> nf4;
  const double nf4_seconds =
      MedianSeconds(repeats, [&] { nf4 = QuantizeBnb4Bit(weight, Bnb4BitOptions(), "bench"); });
  if (!scales.ok() || !clipped.ok() || !hqq.ok() || !nf4.ok()) {
    std::fprintf(stderr, "a method failed\n");
    return 1;
  }
  auto row = [&](const char* name, double seconds, const at::Tensor& approximation) {
    const double error = RelativeOutputError(weight, approximation, hessian);
    std::printf("  %-16s %7.2f s  %6.1fx rtn  %5.1f matmuls   output error %.3e (%.2f of rtn's)\n",
                name, seconds, seconds / rtn_seconds, seconds / matmul_seconds, error,
                error / rtn_error);
  };
  std::printf("%lldx%lld linear, F32 CPU, %d threads; rtn %.3f s, one %lld^3 matmul %.2f s\n",
              static_cast<long long>(size), static_cast<long long>(size), at::get_num_threads(),
              rtn_seconds, static_cast<long long>(size), matmul_seconds);
  row("rtn w4 g128", rtn_seconds, Dequantize(*rtn, at::kFloat));
  row("gptq w4 g128", gptq_seconds, Dequantize(gptq->quantized, at::kFloat));
  row("awq scales", awq_seconds, Dequantize(*QuantizeRtn(scaled, options.grid, "bench"), at::kFloat) / scales->scales);
  row("awq + clip", awq_seconds + clip_seconds, awq_weight);
  row("hqq w4 g128", hqq_seconds, Dequantize(*hqq, at::kFloat));
  row("nf4 b64", nf4_seconds, DequantizeBnb4Bit(*nf4, at::kFloat));
  return 0;
}
