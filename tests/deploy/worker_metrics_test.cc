// The worker's derived metrics: seconds per decoder block from the engine's
// per-tensor progress messages, and the device memory probe read at scrape.
#include "worker/worker_metrics.h"

#include <dlfcn.h>

#include <gtest/gtest.h>

#include "worker/cuda_memory.h"

namespace compress::worker {
namespace {

absl::Time At(double seconds) { return absl::UnixEpoch() + absl::Seconds(seconds); }

// The page's sample line for `prefix` ("name{labels}"), or "" if absent.
std::string Sample(const std::string& page, const std::string& prefix) {
  size_t at = page.find(prefix + " ");
  if (at == std::string::npos) return "";
  size_t end = page.find('\n', at);
  return page.substr(at, end - at);
}

TEST(BlockTimerTest, TimesEachBlockFromTheEndOfThePreviousOne) {
  metrics::Registry registry;
  WorkerMetrics metrics(registry);
  BlockTimer timer(&metrics.block_seconds, At(0));
  // Embeddings first (not a block), then block 0 (its calibration capture
  // runs before its first tensor is reported), then block 1.
  timer.OnProgress("rtn: model.embed_tokens.weight [512x256] 4-bit, relative error 0.1 (1/9)",
                   At(1));
  timer.OnProgress("gptq: model.layers.0.self_attn.q_proj.weight [256x256] 4-bit (2/9)", At(4));
  timer.OnProgress("gptq: model.layers.0.mlp.down_proj.weight [256x512] 4-bit (3/9)", At(5));
  timer.OnProgress("gptq: model.layers.1.self_attn.q_proj.weight [256x256] 4-bit (4/9)", At(7.5));
  timer.OnProgress("rtn: model.layers.1.mlp.down_proj.weight [256x512] 8-bit (5/9)", At(8));
  timer.OnProgress("evaluate: perplexity of the original", At(20));
  timer.Finish();
  timer.Finish();  // idempotent

  const std::string page = registry.Serialize();
  // Block 0: from the embeddings' event (1 s) to its last tensor (5 s).
  EXPECT_EQ(Sample(page, R"(compress_worker_block_seconds_count{method="gptq"})"),
            R"(compress_worker_block_seconds_count{method="gptq"} 1)")
      << page;
  EXPECT_EQ(Sample(page, R"(compress_worker_block_seconds_sum{method="gptq"})"),
            R"(compress_worker_block_seconds_sum{method="gptq"} 4)")
      << page;
  // Block 1: 5 s to 8 s, touched by two methods; evaluation is not a block.
  EXPECT_EQ(Sample(page, R"(compress_worker_block_seconds_sum{method="gptq+rtn"})"),
            R"(compress_worker_block_seconds_sum{method="gptq+rtn"} 3)")
      << page;
  EXPECT_EQ(page.find("method=\"evaluate\""), std::string::npos);
  EXPECT_EQ(page.find("method=\"rtn\""), std::string::npos);
}

TEST(BlockTimerTest, TheFirstBlockStartsWithTheTask) {
  metrics::Registry registry;
  WorkerMetrics metrics(registry);
  BlockTimer timer(&metrics.block_seconds, At(10));
  timer.OnProgress("sleep: model.layers.0.self_attn.q_proj.weight (1/2)", At(12));
  timer.OnProgress("sleep: model.layers.0.self_attn.k_proj.weight (2/2)", At(13));
  timer.Finish();
  EXPECT_NE(registry.Serialize().find(R"(compress_worker_block_seconds_sum{method="sleep"} 3)"),
            std::string::npos)
      << registry.Serialize();
}

TEST(BlockTimerTest, IgnoresMessagesThatNameNoBlock) {
  metrics::Registry registry;
  WorkerMetrics metrics(registry);
  BlockTimer timer(&metrics.block_seconds, At(0));
  for (const char* message : {"done", "evaluation done", "gguf: model.layers.x.attn",
                              "model.layers.3.mlp.up_proj.weight", ": model.layers.1.a"}) {
    timer.OnProgress(message, At(1));
  }
  timer.Finish();
  EXPECT_EQ(registry.Serialize().find("compress_worker_block_seconds"), std::string::npos)
      << registry.Serialize();
}

TEST(WorkerMetricsTest, ReadsDeviceMemoryAtEveryScrape) {
  metrics::Registry registry;
  WorkerMetrics metrics(registry);
  int64_t used = 100;
  metrics.SetDeviceMemoryProbe([&used] { return used; });
  EXPECT_NE(registry.Serialize().find("compress_worker_device_memory_used_bytes 100\n"),
            std::string::npos);
  used = 250;
  EXPECT_NE(registry.Serialize().find("compress_worker_device_memory_used_bytes 250\n"),
            std::string::npos);
}

TEST(CudaMemory, DevicesParseAndAMachineWithoutADriverReportsNothing) {
  EXPECT_EQ(CudaDeviceIndex("cuda:3"), 3);
  EXPECT_EQ(CudaDeviceIndex("cuda"), 0);
  EXPECT_EQ(CudaDeviceIndex("cpu"), std::nullopt);
  EXPECT_EQ(CudaDeviceIndex("cuda:-1"), std::nullopt);
  EXPECT_EQ(CudaDeviceIndex("cuda:x"), std::nullopt);
  EXPECT_EQ(CudaDeviceIndex("cudax"), std::nullopt);
  void* driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  const std::optional<CudaMemory> memory = QueryCudaMemory(0);
  if (driver == nullptr) {
    EXPECT_EQ(memory, std::nullopt) << "no NVIDIA driver here";
  } else if (memory) {
    EXPECT_GT(memory->total_bytes, 0);
    EXPECT_GE(memory->free_bytes, 0);
    EXPECT_LE(memory->free_bytes, memory->total_bytes);
  }
  EXPECT_EQ(QueryCudaMemory(1 << 20), std::nullopt) << "no such device";
}

}  // namespace
}  // namespace compress::worker
