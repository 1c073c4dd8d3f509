// GPTQ's cost per layer: seconds to quantize one --size x --size linear (W4,
// groups of 128) given its Hessian, against RTN on the same weight and
// against one matrix product of the same size (the unit GPTQ's lazy block
// updates are made of). Also the layer's output error, GPTQ's and RTN's, on
// the inputs the Hessian came from. Medians over --repeats.
//
//   gptq_bench [--size 4096] [--repeats 3] [--threads 0]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "worker/engine/quant/gptq.h"
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
      std::fprintf(stderr, "usage: gptq_bench [--size 4096] [--repeats 3] [--threads 0]\n");
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
  const double gptq_error =
      RelativeOutputError(weight, Dequantize(gptq->quantized, at::kFloat), hessian);
  const double rtn_error = RelativeOutputError(weight, Dequantize(*rtn, at::kFloat), hessian);
  std::printf("%lldx%lld linear, W4 g128, F32 CPU, %d threads\n", static_cast<long long>(size),
              static_cast<long long>(size), at::get_num_threads());
  std::printf("  gptq   %7.2f s   output error %.3e\n", gptq_seconds, gptq_error);
  std::printf("  rtn    %7.2f s   output error %.3e   gptq/rtn time %.0fx, error %.2f\n",
              rtn_seconds, rtn_error, gptq_seconds / rtn_seconds, gptq_error / rtn_error);
  std::printf("  matmul %7.2f s   (%lld^3): gptq costs %.1f matmuls\n", matmul_seconds,
              static_cast<long long>(size), gptq_seconds / matmul_seconds);
  return 0;
}
