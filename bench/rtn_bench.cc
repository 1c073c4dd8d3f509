// RTN throughput: 4-bit, group 128, on a few square weight matrices, against
// a plain memcpy of the same bytes (the floor any pass over the weights pays).
// Prints the median over repeats of each, and their ratio.
//
//   rtn_bench [--size 4096] [--repeats 7] [--threads N]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "worker/engine/quant/rtn.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Flags {
  int64_t size = 4096;
  int repeats = 7;
  int threads = 0;  // 0: LibTorch's default
};

Flags ParseFlags(int argc, char** argv) {
  Flags flags;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string name = argv[i];
    const char* value = argv[i + 1];
    bool ok = false;
    if (name == "--size") ok = absl::SimpleAtoi(value, &flags.size);
    if (name == "--repeats") ok = absl::SimpleAtoi(value, &flags.repeats);
    if (name == "--threads") ok = absl::SimpleAtoi(value, &flags.threads);
    if (!ok) {
      std::fprintf(stderr, "usage: %s [--size N] [--repeats N] [--threads N]\n", argv[0]);
      std::exit(2);
    }
  }
  return flags;
}

template <typename Body>
double MedianSeconds(int repeats, Body&& body) {
  std::vector<double> seconds;
  for (int r = 0; r < repeats; ++r) {
    const Clock::time_point start = Clock::now();
    body();
    seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(seconds.begin(), seconds.end());
  return seconds[seconds.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const Flags flags = ParseFlags(argc, argv);
  if (flags.threads > 0) at::set_num_threads(flags.threads);
  c10::InferenceMode inference_mode;
  const compress::engine::RtnOptions options{/*bits=*/4, /*symmetric=*/false, /*group_size=*/128};

  std::printf("RTN 4-bit g128 asym, %lldx%lld, %d threads, median of %d\n",
              static_cast<long long>(flags.size), static_cast<long long>(flags.size),
              at::get_num_threads(), flags.repeats);
  std::printf("%-8s %-6s %10s %12s %12s %8s\n", "matrix", "dtype", "MB", "rtn GB/s", "memcpy GB/s",
              "ratio");
  struct Case {
    const char* name;
    at::ScalarType dtype;
    uint64_t seed;
  };
  for (const Case& c : {Case{"w0", at::kFloat, 1}, Case{"w1", at::kFloat, 2},
                        Case{"w2", at::kHalf, 3}, Case{"w3", at::kHalf, 4}}) {
    at::manual_seed(c.seed);
    const at::Tensor weight = (at::randn({flags.size, flags.size}) * 0.02).to(c.dtype);
    const double bytes = static_cast<double>(weight.nbytes());
    std::vector<char> destination(weight.nbytes());

    // Warm up both (page faults, thread pool start) before timing.
    auto quantize = [&] {
      auto q = compress::engine::QuantizeRtn(weight, options, c.name);
      if (!q.ok()) {
        std::fprintf(stderr, "%s\n", q.status().ToString().c_str());
        std::exit(1);
      }
    };
    auto copy = [&] { std::memcpy(destination.data(), weight.data_ptr(), weight.nbytes()); };
    quantize();
    copy();
    const double rtn_seconds = MedianSeconds(flags.repeats, quantize);
    const double copy_seconds = MedianSeconds(flags.repeats, copy);
    const double rtn_gbps = bytes / rtn_seconds / 1e9;
    const double copy_gbps = bytes / copy_seconds / 1e9;
    std::printf("%-8s %-6s %10.1f %12.3f %12.3f %8.4f\n", c.name, c10::toString(c.dtype),
                bytes / 1e6, rtn_gbps, copy_gbps, rtn_gbps / copy_gbps);
  }
  return 0;
}
