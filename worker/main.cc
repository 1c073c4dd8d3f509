// compress-worker: serves a compress-server (default), or runs one recipe
// locally with no server (`run`), or writes a random Llama-shaped model for
// demos and tests (`make-random-model`).
#include <grpcpp/grpcpp.h>

#include <csignal>
#include <cstdio>
#include <iostream>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/files.h"
#include "common/flags.h"
#include "common/http_server.h"
#include "common/log.h"
#include "common/process_stats.h"
#include "common/paths.h"
#include "common/recipe.h"
#include "worker/agent.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/recipe/runner.h"

namespace {

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "compress-worker: %s\n", status.ToString().c_str());
  return status.code() == absl::StatusCode::kInvalidArgument ? 1 : 2;
}

int ParseOrExit(compress::FlagSet& flags, int argc, char** argv, int first) {
  absl::Status parsed = flags.Parse(argc, argv, first);
  if (parsed.ok()) return -1;
  std::fprintf(stderr, "%s\n", std::string(parsed.message()).c_str());
  return parsed.code() == absl::StatusCode::kFailedPrecondition ? 0 : 1;
}

// Local mode: the same recipe file as `compressctl submit`, no server.
int RunLocal(int argc, char** argv) {
  std::string recipe_path, model_path, output_dir = "./compressed", device = "cpu", calibration;
  compress::FlagSet flags("compress-worker run");
  flags.Add("recipe", &recipe_path, "recipe file (YAML or JSON JobSpec)");
  flags.Add("model", &model_path, "model folder or .safetensors file (overrides the recipe)");
  flags.Add("out", &output_dir, "folder for the outputs");
  flags.Add("device", &device, "cpu or cuda:N");
  flags.Add("calibration", &calibration, "calibration text file (overrides the recipe)");
  int threads = 0;
  flags.Add("threads", &threads, "CPU threads per operation (0: one per core)");
  std::string model_root;
  flags.Add("model-root", &model_root,
            "resolve the recipe's paths under this folder, as compress-server does "
            "(default: as given, relative to the current folder)");
  if (int rc = ParseOrExit(flags, argc, argv, 2); rc >= 0) return rc;
  compress::engine::SetCpuThreads(threads);
  if (recipe_path.empty()) return Fail(absl::InvalidArgumentError("--recipe is required"));
  absl::StatusOr<compress::v1::JobSpec> spec = compress::LoadRecipeFile(recipe_path);
  if (!spec.ok()) return Fail(spec.status());
  if (!model_path.empty()) spec->mutable_model()->set_path(model_path);
  if (!calibration.empty()) spec->mutable_calibration()->set_path(calibration);
  if (absl::Status valid = compress::ValidateJobSpec(*spec); !valid.ok()) return Fail(valid);

  compress::engine::RunOptions options;
  options.output_dir = output_dir;
  options.device = device;
  std::string evaluation_path;
  for (const compress::v1::Stage& stage : spec->stages()) {
    if (stage.has_evaluate()) evaluation_path = stage.evaluate().text_path();
  }
  const std::pair<const std::string*, std::string*> paths[] = {
      {&spec->model().path(), &options.model_path},
      {&spec->calibration().path(), &options.calibration_path},
      {&evaluation_path, &options.evaluation_path}};
  for (const auto& [given, resolved] : paths) {
    if (model_root.empty() || given->empty()) {
      *resolved = *given;
      continue;
    }
    absl::StatusOr<std::string> under_root = compress::ResolveUnderRoots(*given, {model_root});
    if (!under_root.ok()) return Fail(under_root.status());
    *resolved = *under_root;
  }
  compress::engine::RunCallbacks callbacks;
  callbacks.on_progress = [](double fraction, const std::string& stage, const std::string& message) {
    std::fprintf(stderr, "[%5.1f%%] %s: %s\n", fraction * 100, stage.c_str(), message.c_str());
  };
  callbacks.on_metric = [](const std::string& stage, const std::string& name, double value,
                           const std::string& unit) {
    std::fprintf(stderr, "metric %s %s=%g %s\n", stage.c_str(), name.c_str(), value, unit.c_str());
  };
  callbacks.on_log = [](const std::string& level, const std::string& text) {
    std::fprintf(stderr, "%s %s\n", level.c_str(), text.c_str());
  };
  callbacks.is_cancelled = [] { return g_stop.load(); };
  absl::StatusOr<compress::engine::RunResult> result =
      compress::engine::RunJob(*spec, options, callbacks);
  if (!result.ok()) return Fail(result.status());
  std::cout << compress::ToJson(result->report, /*pretty=*/true) << "\n";
  for (const auto& artifact : result->artifacts) {
    std::fprintf(stderr, "wrote %s/%s (%lld bytes, sha256 %s)\n", output_dir.c_str(),
                 artifact.name.c_str(), static_cast<long long>(artifact.size_bytes),
                 artifact.sha256.c_str());
  }
  return 0;
}

int MakeRandomModel(int argc, char** argv) {
  std::string output_dir, dtype = "f32";
  int hidden = 256, intermediate = 768, layers = 2, heads = 8, kv_heads = 4, vocab = 1024;
  int seed = 0, shard_megabytes = 0;
  compress::FlagSet flags("compress-worker make-random-model");
  flags.Add("out", &output_dir, "folder to write config.json and safetensors into");
  flags.Add("hidden", &hidden, "hidden size");
  flags.Add("intermediate", &intermediate, "feed-forward size");
  flags.Add("layers", &layers, "decoder blocks");
  flags.Add("heads", &heads, "attention heads");
  flags.Add("kv-heads", &kv_heads, "key/value heads");
  flags.Add("vocab", &vocab, "vocabulary size");
  flags.Add("dtype", &dtype, "f32, f16 or bf16");
  flags.Add("seed", &seed, "random seed");
  flags.Add("shard-megabytes", &shard_megabytes, "split into shards of this size (0: one file)");
  if (int rc = ParseOrExit(flags, argc, argv, 2); rc >= 0) return rc;
  if (output_dir.empty()) return Fail(absl::InvalidArgumentError("--out is required"));
  compress::engine::RandomModelOptions options;
  options.hidden_size = hidden;
  options.intermediate_size = intermediate;
  options.num_layers = layers;
  options.num_heads = heads;
  options.num_kv_heads = kv_heads;
  options.vocab_size = vocab;
  options.seed = static_cast<uint64_t>(seed);
  options.max_shard_bytes = static_cast<int64_t>(shard_megabytes) << 20;
  absl::StatusOr<compress::SafetensorsDtype> parsed_dtype =
      compress::ParseSafetensorsDtype(absl::AsciiStrToUpper(dtype));
  if (!parsed_dtype.ok()) return Fail(parsed_dtype.status());
  options.dtype = *parsed_dtype;
  absl::Status written = compress::engine::WriteRandomLlamaModel(options, output_dir);
  if (!written.ok()) return Fail(written);
  std::printf("wrote %s\n", output_dir.c_str());
  return 0;
}

int Serve(int argc, char** argv) {
  compress::worker::WorkerConfig config;
  if (const char* env = std::getenv("COMPRESS_SERVER")) config.server = env;
  int memory_megabytes = 0;
  std::string token_file, tls_ca_file;
  if (const char* env = std::getenv("COMPRESS_WORKER_TOKEN")) config.token = env;
  compress::FlagSet flags("compress-worker");
  flags.Add("server", &config.server, "compress-server address (env COMPRESS_SERVER)");
  flags.Add("device", &config.device, "cpu or cuda:N");
  flags.Add("worker-id", &config.worker_id, "stable id (default host-pid)");
  flags.Add("work-dir", &config.work_dir, "scratch folder for task outputs");
  flags.Add("metrics-listen", &config.metrics_listen, "HTTP address for /metrics and /healthz");
  flags.Add("memory-megabytes", &memory_megabytes, "device memory to advertise (0: detect)");
  flags.Add("poll-millis", &config.poll_millis, "long-poll wait for a task");
  flags.Add("token-file", &token_file, "file holding the worker token (else $COMPRESS_WORKER_TOKEN)");
  flags.Add("tls-ca", &tls_ca_file, "dial with TLS, trusting this PEM CA bundle");
  int threads = 0;
  flags.Add("threads", &threads, "CPU threads per operation (0: one per core)");
  std::string log_format = "auto";
  flags.Add("log-format", &log_format, "text, json (one object per line) or auto (text on a terminal)");
  if (int rc = ParseOrExit(flags, argc, argv, 1); rc >= 0) return rc;
  absl::StatusOr<compress::LogFormat> format = compress::ParseLogFormat(log_format);
  if (!format.ok()) return Fail(format.status());
  compress::SetLogFormat(*format);
  compress::engine::SetCpuThreads(threads);
  if (!token_file.empty()) {
    absl::StatusOr<std::string> token = compress::ReadFile(token_file, 4096);
    if (!token.ok()) return Fail(token.status());
    config.token = std::string(absl::StripAsciiWhitespace(*token));
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!tls_ca_file.empty()) {
    absl::StatusOr<std::string> ca = compress::ReadFile(tls_ca_file, 1 << 20);
    if (!ca.ok()) return Fail(ca.status());
    grpc::SslCredentialsOptions options;
    options.pem_root_certs = *ca;
    credentials = grpc::SslCredentials(options);
  }
  config.memory_bytes = static_cast<int64_t>(memory_megabytes) << 20;

  compress::metrics::Registry registry;
  compress::worker::WorkerMetrics metrics(registry);
  registry.AddCollectHook([&metrics] {
    metrics.resident_memory_bytes.Set(static_cast<double>(compress::ResidentMemoryBytes()));
    metrics.cpu_seconds.Increment(compress::ProcessCpuSeconds() - metrics.cpu_seconds.Value());
  });
  compress::HttpServer http;
  if (!config.metrics_listen.empty()) {
    http.HandleMetrics(registry);
    http.Handle("/healthz", [] { return compress::HttpResponse{200, "text/plain; charset=utf-8", "ok\n"}; });
    absl::StatusOr<int> port = http.Start(config.metrics_listen);
    if (!port.ok()) return Fail(port.status());
    std::printf("metrics_port=%d\n", *port);
    std::fflush(stdout);
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  auto channel = grpc::CreateCustomChannel(config.server, credentials, args);
  compress::worker::WorkerAgent agent(config, compress::v1::WorkerService::NewStub(channel), &metrics);
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  agent.Run(&g_stop);
  http.Stop();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  compress::SetLogComponent("worker");
  // A file size limit makes writes fail (EFBIG, a clear error), not the process.
  std::signal(SIGXFSZ, SIG_IGN);
  std::string verb = argc > 1 ? argv[1] : "";
  if (verb == "run") return RunLocal(argc, argv);
  if (verb == "make-random-model") return MakeRandomModel(argc, argv);
  return Serve(argc, argv);
}
