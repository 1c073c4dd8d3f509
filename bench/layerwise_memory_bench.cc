// Peak resident memory of the layer-wise runner as a fraction of the model's
// size (goal: at most 0.25). Generates a random 24-block Llama of at least
// 2 GB (once; kept under --dir), then runs, each in a fresh child process so
// that each peak is its own:
//   rtn         RunJob, W4 g128 asymmetric, dequantized + packed outputs
//   calibrated  RunLayerwise with calibration: X^T X of every linear on
//               --samples x --sequence tokens, sequential propagation, RTN
//               applied to each block (the shape of a GPTQ job)
//   load        the baseline: every block loaded at once, as a runtime
//               without the layer-wise runner holds the model
// and prints each child's peak RSS (VmHWM), the RSS of a child that only
// started LibTorch, and ratios to the model's size on disk.
//
//   layerwise_memory_bench [--dir build/bench-model] [--layers 24] [--hidden 2048]
//                          [--intermediate 5632] [--samples 8] [--sequence 128]
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "worker/engine/model/llama_config.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/quant/rtn.h"
#include "worker/engine/recipe/device.h"
#include "worker/engine/recipe/layerwise.h"
#include "worker/engine/recipe/runner.h"

extern char** environ;

namespace {

namespace fs = std::filesystem;
using namespace compress::engine;
using Clock = std::chrono::steady_clock;

struct Flags {
  std::string dir = "build/bench-model";
  std::string mode;  // set in children
  int64_t layers = 24, hidden = 2048, intermediate = 5632, vocab = 32000;
  int64_t samples = 8, sequence = 128;
};

bool ParseFlags(int argc, char** argv, Flags* flags) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string name = argv[i];
    const std::string value = argv[i + 1];
    bool ok = true;
    if (name == "--dir") flags->dir = value;
    else if (name == "--mode") flags->mode = value;
    else if (name == "--layers") ok = absl::SimpleAtoi(value, &flags->layers);
    else if (name == "--hidden") ok = absl::SimpleAtoi(value, &flags->hidden);
    else if (name == "--intermediate") ok = absl::SimpleAtoi(value, &flags->intermediate);
    else if (name == "--samples") ok = absl::SimpleAtoi(value, &flags->samples);
    else if (name == "--sequence") ok = absl::SimpleAtoi(value, &flags->sequence);
    else ok = false;
    if (!ok) {
      std::fprintf(stderr, "bad flag %s %s\n", name.c_str(), value.c_str());
      return false;
    }
  }
  return true;
}

// A field of /proc/self/status ("VmHWM", "RssAnon", "RssFile"), in bytes.
int64_t StatusBytes(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1)) * 1024;
  }
  return -1;
}

int64_t PeakRss() { return StatusBytes("VmHWM"); }

int64_t FolderBytes(const std::string& dir) {
  int64_t total = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() == ".safetensors") total += static_cast<int64_t>(entry.file_size());
  }
  return total;
}

// ----------------------------------------------------------------- children

int RunMode(const Flags& flags) {
  c10::InferenceMode inference;
  ReturnLargeAllocationsToTheSystem();  // as RunJob does
  const Clock::time_point start = Clock::now();
  absl::Status status;
  if (flags.mode == "idle") {
    at::Tensor warm = at::ones({8, 8}).mm(at::ones({8, 8}));  // LibTorch initialised
    static_cast<void>(warm);
  } else if (flags.mode == "rtn") {
    compress::v1::JobSpec spec;
    compress::v1::RtnStage* rtn = spec.add_stages()->mutable_rtn();
    rtn->set_bits(4);
    rtn->set_group_size(128);
    spec.add_outputs(compress::v1::DEQUANTIZED_SAFETENSORS);
    spec.add_outputs(compress::v1::PACKED_SAFETENSORS);
    RunOptions options;
    options.model_path = flags.dir;
    options.output_dir = flags.dir + "-out";
    RunCallbacks callbacks;
    if (getenv("BENCH_TRACE") != nullptr) {
      callbacks.on_progress = [](double fraction, const std::string&, const std::string& message) {
        std::fprintf(stderr, "%.3f anon %lld MB file %lld MB  %s\n", fraction,
                     static_cast<long long>(StatusBytes("RssAnon") >> 20),
                     static_cast<long long>(StatusBytes("RssFile") >> 20), message.c_str());
      };
    }
    status = RunJob(spec, options, callbacks).status();
    fs::remove_all(options.output_dir);
  } else if (flags.mode == "calibrated" || flags.mode == "load") {
    absl::StatusOr<SafetensorsCheckpoint> checkpoint = SafetensorsCheckpoint::Open(flags.dir);
    absl::StatusOr<LlamaConfig> config = ReadLlamaConfig(flags.dir);
    if (!checkpoint.ok() || !config.ok()) {
      status = checkpoint.ok() ? config.status() : checkpoint.status();
    } else if (flags.mode == "load") {
      std::vector<DecoderBlockWeights> blocks;
      for (int64_t layer = 0; layer < config->num_hidden_layers && status.ok(); ++layer) {
        absl::StatusOr<DecoderBlockWeights> block =
            LoadDecoderBlock(*checkpoint, *config, layer, at::kCPU, at::kBFloat16);
        if (block.ok()) blocks.push_back(std::move(*block));
        else status = block.status();
      }
    } else {
      LayerwiseOptions options;
      options.calibration_ids =
          at::randint(0, config->vocab_size, {flags.samples, flags.sequence}, at::kLong);
      LayerwiseCallbacks callbacks;
      callbacks.transform = [](DecoderBlockWeights& block, const BlockStatistics& statistics,
                               const std::vector<std::string>& linears) {
        RtnOptions rtn;
        rtn.group_size = 128;
        for (const BlockLinear& linear : kBlockLinears) {
          if (std::find(linears.begin(), linears.end(), linear.name) == linears.end()) continue;
          if (statistics.Find(linear.name) == nullptr) return absl::InternalError("no statistics");
          at::Tensor& weight = (block.*linear.member).weight;
          absl::StatusOr<QuantizedTensor> q = QuantizeRtn(weight, rtn, linear.name);
          if (!q.ok()) return q.status();
          weight = Dequantize(*q, weight.scalar_type());
        }
        return absl::OkStatus();
      };
      callbacks.finished = [](const DecoderBlockWeights&) { return absl::OkStatus(); };
      status = RunLayerwise(*checkpoint, *config, options, callbacks);
    }
  }
  if (!status.ok()) {
    std::fprintf(stderr, "%s: %s\n", flags.mode.c_str(), status.ToString().c_str());
    return 1;
  }
  std::printf("%lld %.1f\n", static_cast<long long>(PeakRss()),
              std::chrono::duration<double>(Clock::now() - start).count());
  return 0;
}

// Runs this binary with `mode`; returns its peak RSS and seconds.
bool RunChild(const Flags& flags, const std::string& mode, int64_t* peak, double* seconds) {
  int fds[2];
  if (::pipe(fds) != 0) return false;
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  std::vector<std::string> args = {"/proc/self/exe", "--dir", flags.dir, "--mode", mode,
                                   "--samples", std::to_string(flags.samples), "--sequence",
                                   std::to_string(flags.sequence)};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int spawned = posix_spawn(&pid, "/proc/self/exe", &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(fds[1]);
  if (spawned != 0) return false;
  std::string out;
  char buffer[256];
  ssize_t n;
  while ((n = ::read(fds[0], buffer, sizeof(buffer))) > 0) out.append(buffer, static_cast<size_t>(n));
  ::close(fds[0]);
  int wstatus = 0;
  ::waitpid(pid, &wstatus, 0);
  long long rss = 0;
  if (!WIFEXITED(wstatus) || WEXITSTATUS(wstatus) != 0 ||
      std::sscanf(out.c_str(), "%lld %lf", &rss, seconds) != 2) {
    return false;
  }
  *peak = rss;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  if (!ParseFlags(argc, argv, &flags)) return 2;
  if (!flags.mode.empty()) return RunMode(flags);

  if (!fs::exists(fs::path(flags.dir) / "config.json")) {
    RandomModelOptions model;
    model.num_layers = flags.layers;
    model.hidden_size = flags.hidden;
    model.intermediate_size = flags.intermediate;
    model.num_heads = flags.hidden / 128;
    model.num_kv_heads = std::max<int64_t>(1, flags.hidden / 512);
    model.vocab_size = flags.vocab;
    model.dtype = compress::SafetensorsDtype::kBF16;
    std::printf("generating a %lld-block hidden-%lld model in %s ...\n",
                static_cast<long long>(flags.layers), static_cast<long long>(flags.hidden),
                flags.dir.c_str());
    std::fflush(stdout);
    if (absl::Status s = WriteRandomLlamaModel(model, flags.dir); !s.ok()) {
      std::fprintf(stderr, "%s\n", s.ToString().c_str());
      return 1;
    }
  }
  const int64_t model_bytes = FolderBytes(flags.dir);
  std::printf("model: %s, %.2f GB on disk (BF16)\n", flags.dir.c_str(), model_bytes / 1e9);
  int64_t idle = 0;
  double idle_seconds = 0;
  if (!RunChild(flags, "idle", &idle, &idle_seconds)) return 1;
  std::printf("%-11s peak RSS %7.0f MB  (LibTorch started, nothing loaded)\n", "idle", idle / 1e6);
  for (const char* mode : {"rtn", "calibrated", "load"}) {
    int64_t peak = 0;
    double seconds = 0;
    if (!RunChild(flags, mode, &peak, &seconds)) {
      std::fprintf(stderr, "%s failed\n", mode);
      return 1;
    }
    std::printf("%-11s peak RSS %7.0f MB  %6.1f s  ratio to model size %.3f (%.3f above idle)\n",
                mode, peak / 1e6, seconds, static_cast<double>(peak) / model_bytes,
                static_cast<double>(peak - idle) / model_bytes);
  }
  return 0;
}
