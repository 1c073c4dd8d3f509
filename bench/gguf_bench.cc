// GGUF export measured: for each preset, a job converts --model to GGUF;
// the file's tensors, dequantized as llama.cpp dequantizes them, are run by
// the project's own runtime against the original on --text (perplexity, KL,
// top-1 agreement), with bits per weight and file size. Then each type's
// quantization throughput on a --size x --size F32 weight against a memory
// copy of the same bytes.
//
//   gguf_bench --model tests/fixtures/kjv-llama --text revelation.txt
//              [--work build/gguf-bench] [--presets Q8_0,Q4_K_M,...]
//              [--context 128] [--stride 64] [--size 4096] [--threads 0]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/files.h"
#include "common/gguf_types.h"
#include "worker/engine/eval/eval.h"
#include "worker/engine/gguf/gguf_export.h"
#include "worker/engine/gguf/gguf_quants.h"
#include "worker/engine/model/llama_config.h"
#include "worker/engine/model/llama_model.h"
#include "worker/engine/model/safetensors_writer.h"
#include "worker/engine/recipe/runner.h"
#include "worker/engine/tokenizer/tokenizer.h"

namespace {

namespace fs = std::filesystem;
namespace v1 = compress::v1;
using namespace compress::engine;
using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "gguf_bench: %s\n", status.ToString().c_str());
  return 1;
}

// The GGUF file's tensors as a float32 Hugging Face folder the runtime loads.
absl::Status WriteAsFolder(const std::string& gguf, const std::string& model,
                           const LlamaConfig& config, const std::string& folder) {
  absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> tensors =
      ReadGgufAsLlamaTensors(gguf, config);
  if (!tensors.ok()) return tensors.status();
  std::vector<compress::SafetensorsTensorSpec> specs;
  for (const auto& [name, values] : *tensors) {
    specs.push_back({name, compress::SafetensorsDtype::kF32, values.sizes().vec()});
  }
  fs::create_directories(folder);
  absl::StatusOr<SafetensorsWriter> writer =
      SafetensorsWriter::Open(folder + "/model.safetensors", specs);
  if (!writer.ok()) return writer.status();
  for (const auto& [name, values] : *tensors) {
    if (absl::Status s = writer->WriteTensor(name, values); !s.ok()) return s;
  }
  if (absl::Status s = writer->Commit(); !s.ok()) return s;
  std::error_code ec;
  fs::copy_file(model + "/config.json", folder + "/config.json",
                fs::copy_options::overwrite_existing, ec);
  return ec ? absl::InternalError(ec.message()) : absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  std::string model = "tests/fixtures/kjv-llama", text_path, work = "build/gguf-bench";
  std::string calibration_path;  // for presets named NAME+imatrix
  std::string presets = "F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K";
  int64_t context = 128, stride = 64, size = 4096;
  int threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string name = argv[i], value = argv[i + 1];
    const bool ok = (name == "--model" && (model = value, true)) ||
                    (name == "--text" && (text_path = value, true)) ||
                    (name == "--work" && (work = value, true)) ||
                    (name == "--presets" && (presets = value, true)) ||
                    (name == "--calibration" && (calibration_path = value, true)) ||
                    (name == "--context" && absl::SimpleAtoi(value, &context)) ||
                    (name == "--stride" && absl::SimpleAtoi(value, &stride)) ||
                    (name == "--size" && absl::SimpleAtoi(value, &size)) ||
                    (name == "--threads" && absl::SimpleAtoi(value, &threads));
    if (!ok) {
      std::fprintf(stderr,
                   "usage: gguf_bench --model DIR --text FILE [--work DIR] [--presets A,B+imatrix] "
                   "[--calibration FILE (for +imatrix)] "
                   "[--context 128] [--stride 64] [--size 4096] [--threads 0]\n");
      return 2;
    }
  }
  SetCpuThreads(threads);
  c10::InferenceMode inference;

  if (!text_path.empty()) {
    absl::StatusOr<LlamaConfig> config = ReadLlamaConfig(model);
    absl::StatusOr<Tokenizer> tokenizer = Tokenizer::FromFile(model + "/tokenizer.json");
    absl::StatusOr<std::string> text = compress::ReadFile(text_path);
    if (!config.ok()) return Fail(config.status());
    if (!tokenizer.ok()) return Fail(tokenizer.status());
    if (!text.ok()) return Fail(text.status());
    const std::vector<int32_t> tokens = tokenizer->Encode(*text);
    absl::StatusOr<LlamaModel> original = LlamaModel::Load(model);
    if (!original.ok()) return Fail(original.status());
    PerplexityOptions windows;
    windows.context_length = context;
    windows.stride = stride;
    windows.max_tokens = static_cast<int64_t>(tokens.size());
    std::printf("| preset | perplexity | KL (nats) | top-1 agreement | bits/weight | size | export |\n");
    std::printf("|---|---|---|---|---|---|---|\n");
    bool first = true;
    for (absl::string_view preset : absl::StrSplit(presets, ',', absl::SkipEmpty())) {
      v1::JobSpec spec;
      spec.mutable_model()->set_path(model);
      absl::string_view name = preset;
      // "Q4_K_M+imatrix": the k-quant search weighted by calibration energy.
      const bool importance = absl::ConsumeSuffix(&name, "+imatrix");
      v1::GgufOutput* gguf = spec.add_gguf();
      gguf->set_preset(std::string(name));
      gguf->set_importance(importance);
      if (importance) {
        if (calibration_path.empty()) {
          return Fail(absl::InvalidArgumentError(absl::StrCat(preset, ": needs --calibration FILE")));
        }
        spec.mutable_calibration()->set_path(calibration_path);
        spec.mutable_calibration()->set_num_samples(128);
        spec.mutable_calibration()->set_sequence_length(128);
      }
      RunOptions run;
      run.model_path = model;
      run.calibration_path = calibration_path;
      run.output_dir = work + "/" + std::string(preset);
      const Clock::time_point start = Clock::now();
      absl::StatusOr<RunResult> result = RunJob(spec, run, {});
      const double export_seconds = SecondsSince(start);
      if (!result.ok()) return Fail(result.status());
      const v1::GgufFileReport& report = result->report.gguf(0);
      const std::string folder = run.output_dir + "/as-safetensors";
      if (absl::Status s = WriteAsFolder(run.output_dir + "/" + report.file(), model, *config, folder);
          !s.ok()) {
        return Fail(s);
      }
      absl::StatusOr<LlamaModel> candidate = LlamaModel::Load(folder);
      if (!candidate.ok()) return Fail(candidate.status());
      absl::StatusOr<DivergenceResult> divergence =
          CompareToReference(*original, *candidate, tokens, windows);
      if (!divergence.ok()) return Fail(divergence.status());
      if (first) {
        std::printf("| original (%s) | %.3f | 0 | 100%% | | | |\n", config->torch_dtype.c_str(),
                    divergence->reference.perplexity);
        first = false;
      }
      std::printf("| %s | %.3f | %.4f | %.1f%% | %.2f | %.2f MiB | %.1f s |\n",
                  std::string(preset).c_str(), divergence->candidate.perplexity, divergence->mean_kl,
                  100 * divergence->top1_agreement, report.bits_per_weight(),
                  report.size_bytes() / 1048576.0, export_seconds);
      std::fflush(stdout);
    }
  }

  // Throughput of each type's quantizer against a memcpy of the same bytes.
  at::manual_seed(1);
  const at::Tensor weight = at::randn({size, size}) * 0.02;
  const double bytes = static_cast<double>(weight.nbytes());
  std::vector<char> copy(weight.nbytes());
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::vector<double> copies;
  for (int r = 0; r < 5; ++r) {
    const Clock::time_point start = Clock::now();
    std::memcpy(copy.data(), weight.data_ptr(), copy.size());
    copies.push_back(SecondsSince(start));
  }
  const double memcpy_gbs = bytes / median(copies) / 1e9;
  std::printf("\n%lldx%lld F32 weight, %d threads: memcpy %.2f GB/s\n",
              static_cast<long long>(size), static_cast<long long>(size), at::get_num_threads(),
              memcpy_gbs);
  std::printf("| type | GB/s of F32 input | ratio to memcpy |\n|---|---|---|\n");
  for (const compress::GgufTypeInfo& type : compress::kGgufTypes) {
    std::vector<double> seconds;
    for (int r = 0; r < 3; ++r) {
      const Clock::time_point start = Clock::now();
      absl::StatusOr<std::string> q = QuantizeGgufTensor(weight, type.type, at::Tensor(), "bench");
      if (!q.ok()) return Fail(q.status());
      seconds.push_back(SecondsSince(start));
    }
    const double gbs = bytes / median(seconds) / 1e9;
    std::printf("| %s | %.3f | %.3f |\n", type.name, gbs, gbs / memcpy_gbs);
  }
  return 0;
}
