#include "client/commands.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "client/render.h"
#include "common/files.h"
#include "common/gguf_file.h"
#include "common/grpc_status.h"
#include "common/paths.h"
#include "common/recipe.h"
#include "common/safetensors_header.h"
#include "common/sha256.h"
#include "common/status_macros.h"

namespace compress::client {
namespace {

namespace fs = std::filesystem;
namespace v1 = compress::v1;

constexpr absl::Duration kDefaultCallTimeout = absl::Seconds(30);
// A stream cut with UNAVAILABLE (server restart, network blip) is retried
// this many times in a row, waiting kRetryBackoff * attempt in between.
constexpr int kMaxStreamRetries = 5;
constexpr absl::Duration kRetryBackoff = absl::Milliseconds(250);
constexpr int kDefaultListLimit = 100;
constexpr int kMaxPageSize = 1000;  // the server's cap on ListJobsRequest.page_size
// A stage built from flags alone: the common "w4 g128" setting.
constexpr int kDefaultBits = 4;
constexpr int kDefaultGroupSize = 128;

struct OutputFormatName {
  const char* short_name;
  v1::OutputFormat format;
};
constexpr OutputFormatName kOutputFormats[] = {
    {"dequantized", v1::DEQUANTIZED_SAFETENSORS},
    {"packed", v1::PACKED_SAFETENSORS},
    {"gguf", v1::GGUF},
};

// ---------------------------------------------------------------- flag values

absl::StatusOr<int32_t> ParseInt32Flag(const std::string& flag, const std::string& text) {
  int32_t value = 0;
  if (!absl::SimpleAtoi(text, &value)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " wants an integer, got \"", text, "\""));
  }
  return value;
}

absl::StatusOr<double> ParseDoubleFlag(const std::string& flag, const std::string& text) {
  double value = 0;
  if (!absl::SimpleAtod(text, &value)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " wants a number, got \"", text, "\""));
  }
  return value;
}

// "N:M", e.g. "2:4".
absl::StatusOr<std::pair<int32_t, int32_t>> ParsePattern(const std::string& text) {
  std::pair<std::string, std::string> parts = absl::StrSplit(text, absl::MaxSplits(':', 1));
  std::pair<int32_t, int32_t> pattern;
  if (text.find(':') == std::string::npos || !absl::SimpleAtoi(parts.first, &pattern.first) ||
      !absl::SimpleAtoi(parts.second, &pattern.second)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--pattern wants N:M, e.g. 2:4, got \"", text, "\""));
  }
  return pattern;
}

absl::StatusOr<std::pair<std::string, std::string>> ParseLabel(const std::string& text) {
  std::pair<std::string, std::string> label = absl::StrSplit(text, absl::MaxSplits('=', 1));
  if (text.find('=') == std::string::npos || label.first.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--label wants KEY=VALUE with a non-empty key, got \"", text, "\""));
  }
  return label;
}

// "dequantized", "packed", or an OutputFormat name in any case.
absl::StatusOr<v1::OutputFormat> ParseOutputFormat(const std::string& text) {
  const std::string lower = absl::AsciiStrToLower(text);
  for (const OutputFormatName& entry : kOutputFormats) {
    if (lower == entry.short_name) return entry.format;
  }
  v1::OutputFormat format;
  if (v1::OutputFormat_Parse(absl::AsciiStrToUpper(text), &format) &&
      format != v1::OUTPUT_FORMAT_UNSPECIFIED) {
    return format;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown output format \"", text, "\" (dequantized, packed, gguf)"));
}

absl::StatusOr<v1::JobState> ParseJobState(const std::string& text) {
  v1::JobState state;
  if (v1::JobState_Parse(absl::AsciiStrToUpper(text), &state) &&
      state != v1::JOB_STATE_UNSPECIFIED) {
    return state;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown state \"", text, "\" (queued, running, paused, succeeded, failed, cancelled)"));
}

// Random version-4 UUID: a default idempotency key unique per invocation.
std::string NewRequestId() {
  std::random_device seed;
  std::mt19937_64 rng((static_cast<uint64_t>(seed()) << 32) ^ seed());
  uint64_t high = rng();
  uint64_t low = rng();
  high = (high & ~uint64_t{0xf000}) | 0x4000;                    // version 4
  low = (low & ~(uint64_t{0xc} << 60)) | (uint64_t{0x8} << 60);  // RFC 4122 variant
  return absl::StrFormat("%08x-%04x-%04x-%04x-%012x", high >> 32, (high >> 16) & 0xffff,
                         high & 0xffff, low >> 48, low & 0xffffffffffffULL);
}

// The integer quantizers --method can name: their stage messages share the
// grid fields bits, group_size and symmetric.
constexpr const char* kGridMethods[] = {"rtn", "gptq", "awq", "hqq"};
// nf4 and fp4 are a bnb_4bit stage of that type; int8 is an rtn stage at 8
// bits, symmetric, per output channel (weight-only int8).
// The pruning methods: a prune stage with that PruneMethod.
struct PruneMethodName {
  const char* name;
  v1::PruneMethod method;
};
constexpr PruneMethodName kPruneMethods[] = {
    {"magnitude", v1::MAGNITUDE}, {"wanda", v1::WANDA}, {"sparsegpt", v1::SPARSEGPT}};
constexpr char kMethodList[] = "rtn, gptq, awq, hqq, nf4, fp4, int8, magnitude, wanda, sparsegpt";
// A prune stage built from flags alone: half the weights.
constexpr double kDefaultSparsity = 0.5;

const PruneMethodName* FindPruneMethod(const std::string& method) {
  for (const PruneMethodName& m : kPruneMethods) {
    if (method == m.name) return &m;
  }
  return nullptr;
}

bool IsGridMethod(const std::string& method) {
  for (const char* m : kGridMethods) {
    if (method == m) return true;
  }
  return false;
}

// The method a stage holds, in --method's words ("" for other stages).
std::string StageMethod(const v1::Stage& stage) {
  for (const char* m : kGridMethods) {
    const google::protobuf::FieldDescriptor* field = v1::Stage::descriptor()->FindFieldByName(m);
    if (stage.GetReflection()->HasField(stage, field)) return m;
  }
  if (stage.has_bnb_4bit()) return stage.bnb_4bit().type() == v1::BNB_4BIT_FP4 ? "fp4" : "nf4";
  if (stage.has_prune()) {
    for (const PruneMethodName& m : kPruneMethods) {
      if (stage.prune().method() == m.method) return m.name;
    }
  }
  return "";
}

// --sparsity and --pattern: the prune stage `stage` becomes (a fresh one
// when it held another method), unstructured at a sparsity or N:M.
absl::Status ApplyPruneFlags(const ParsedArgs& args, const PruneMethodName& method,
                             bool fresh, v1::Stage* stage) {
  if (args.Has("bits") || args.Has("group-size") || args.Has("sym") || args.Has("asym") ||
      args.Has("double-quant")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--bits, --group-size, --sym, --asym and --double-quant do not apply to ", method.name,
        " (a pruning method); to prune and then quantize, write both stages in a --recipe"));
  }
  if (args.Has("sparsity") && args.Has("pattern")) {
    return absl::InvalidArgumentError(
        "--sparsity (unstructured) and --pattern (N:M) are two different patterns; give one");
  }
  v1::PruneStage* prune = stage->mutable_prune();
  if (fresh) {
    prune->Clear();
    prune->set_sparsity(kDefaultSparsity);
  }
  prune->set_method(method.method);
  if (args.Has("sparsity")) {
    ASSIGN_OR_RETURN(double sparsity, ParseDoubleFlag("sparsity", args.Value("sparsity")));
    prune->set_sparsity(sparsity);
    prune->set_n(0);
    prune->set_m(0);
  }
  if (args.Has("pattern")) {
    ASSIGN_OR_RETURN(auto pattern, ParsePattern(args.Value("pattern")));
    prune->set_sparsity(0);
    prune->set_n(pattern.first);
    prune->set_m(pattern.second);
  }
  return absl::OkStatus();
}

// --method, --bits, --group-size, --sym, --asym and --double-quant describe
// one quantizing stage, --method with --sparsity or --pattern one prune
// stage. With no stages in the recipe they create it (default rtn w4 g128
// symmetric; a prune method at sparsity 0.5); with one stage they edit it;
// more stages are ambiguous.
absl::Status ApplyStageFlags(const ParsedArgs& args, v1::JobSpec* spec) {
  const bool grid_flags =
      args.Has("bits") || args.Has("group-size") || args.Has("sym") || args.Has("asym");
  const bool prune_flags = args.Has("sparsity") || args.Has("pattern");
  const bool has_stage_flags =
      args.Has("method") || grid_flags || args.Has("double-quant") || prune_flags;
  if (args.Has("sym") && args.Has("asym")) {
    return absl::InvalidArgumentError("--sym and --asym contradict each other");
  }
  const std::string method =
      args.Has("method") ? absl::AsciiStrToLower(args.Value("method")) : "";
  if (!method.empty() && !IsGridMethod(method) && method != "nf4" && method != "fp4" &&
      method != "int8" && FindPruneMethod(method) == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown --method \"", args.Value("method"), "\" (methods: ", kMethodList, ")"));
  }
  if (spec->stages_size() > 1) {
    if (!has_stage_flags) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        "--method, --bits, --group-size, --sym, --asym, --double-quant, --sparsity and "
        "--pattern edit a single-stage recipe; this one has ",
        spec->stages_size(), " stages"));
  }
  if (spec->stages_size() == 1 && !has_stage_flags) return absl::OkStatus();
  v1::Stage* stage = spec->stages_size() == 0 ? spec->add_stages() : spec->mutable_stages(0);
  const std::string current = StageMethod(*stage);
  if (current.empty() && method.empty() && stage->method_case() != v1::Stage::METHOD_NOT_SET) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--bits, --group-size, --sym and --asym apply to a quantizing stage; the recipe's stage "
        "is none (add --method to replace it: ",
        kMethodList, ")"));
  }
  const std::string wanted = !method.empty()    ? method
                             : !current.empty() ? current
                             : prune_flags      ? "magnitude"
                                                : "rtn";
  if (const PruneMethodName* prune = FindPruneMethod(wanted)) {
    return ApplyPruneFlags(args, *prune, /*fresh=*/!stage->has_prune(), stage);
  }
  if (prune_flags) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--sparsity and --pattern apply to the pruning methods (magnitude, wanda, sparsegpt), "
        "not to ", wanted));
  }
  if (wanted == "nf4" || wanted == "fp4") {
    if (args.Has("bits") || args.Has("sym") || args.Has("asym")) {
      return absl::InvalidArgumentError(
          "--bits, --sym and --asym do not apply to nf4/fp4 (4 bits, one absmax per block; "
          "--group-size sets the block size)");
    }
    v1::Bnb4BitStage* bnb = stage->mutable_bnb_4bit();
    bnb->set_type(wanted == "fp4" ? v1::BNB_4BIT_FP4 : v1::BNB_4BIT_NF4);
    if (args.Has("group-size")) {
      ASSIGN_OR_RETURN(int32_t block, ParseInt32Flag("group-size", args.Value("group-size")));
      bnb->set_block_size(block);
    }
    if (args.Has("double-quant")) bnb->set_double_quant(true);
    return absl::OkStatus();
  }
  if (args.Has("double-quant")) {
    return absl::InvalidArgumentError("--double-quant applies to nf4 and fp4 only");
  }
  if (wanted == "int8") {
    if (grid_flags) {
      return absl::InvalidArgumentError(
          "int8 is 8 bits, symmetric, per output channel; use --method rtn to choose a grid");
    }
    v1::RtnStage* rtn = stage->mutable_rtn();
    rtn->set_bits(8);
    rtn->set_symmetric(true);
    rtn->set_group_size(-1);
    return absl::OkStatus();
  }
  const google::protobuf::Reflection* stage_reflection = stage->GetReflection();
  google::protobuf::Message* grid =
      stage_reflection->MutableMessage(stage, v1::Stage::descriptor()->FindFieldByName(wanted));
  const google::protobuf::Reflection* r = grid->GetReflection();
  const google::protobuf::Descriptor* d = grid->GetDescriptor();
  if (wanted != current) {
    // A fresh stage of that method, with the defaults.
    grid->Clear();
    r->SetInt32(grid, d->FindFieldByName("bits"), kDefaultBits);
    r->SetInt32(grid, d->FindFieldByName("group_size"), kDefaultGroupSize);
    r->SetBool(grid, d->FindFieldByName("symmetric"), true);
  }
  if (args.Has("bits")) {
    ASSIGN_OR_RETURN(int32_t bits, ParseInt32Flag("bits", args.Value("bits")));
    r->SetInt32(grid, d->FindFieldByName("bits"), bits);
  }
  if (args.Has("group-size")) {
    ASSIGN_OR_RETURN(int32_t group_size, ParseInt32Flag("group-size", args.Value("group-size")));
    r->SetInt32(grid, d->FindFieldByName("group_size"), group_size);
  }
  if (args.Has("sym")) r->SetBool(grid, d->FindFieldByName("symmetric"), true);
  if (args.Has("asym")) r->SetBool(grid, d->FindFieldByName("symmetric"), false);
  return absl::OkStatus();
}

absl::Status ApplySubmitFlags(const ParsedArgs& args, v1::JobSpec* spec) {
  if (args.Has("name")) spec->set_name(args.Value("name"));
  if (args.Has("model")) spec->mutable_model()->set_path(args.Value("model"));
  if (args.Has("calibration")) spec->mutable_calibration()->set_path(args.Value("calibration"));
  if (args.Has("priority")) {
    ASSIGN_OR_RETURN(int32_t priority, ParseInt32Flag("priority", args.Value("priority")));
    spec->set_priority(priority);
  }
  for (const std::string& text : args.Values("label")) {
    ASSIGN_OR_RETURN(auto label, ParseLabel(text));
    (*spec->mutable_labels())[label.first] = label.second;
  }
  if (args.Has("output")) {
    spec->clear_outputs();
    for (absl::string_view name : absl::StrSplit(args.Value("output"), ',', absl::SkipEmpty())) {
      ASSIGN_OR_RETURN(v1::OutputFormat format,
                       ParseOutputFormat(std::string(absl::StripAsciiWhitespace(name))));
      spec->add_outputs(format);
    }
  }
  if (args.Has("gguf")) {
    // Each preset one GGUF file; "+imatrix" weights its search by calibration.
    spec->clear_gguf();
    for (absl::string_view item : absl::StrSplit(args.Value("gguf"), ',', absl::SkipEmpty())) {
      item = absl::StripAsciiWhitespace(item);
      v1::GgufOutput* gguf = spec->add_gguf();
      gguf->set_importance(absl::ConsumeSuffix(&item, "+imatrix"));
      gguf->set_preset(std::string(item));
    }
  }
  return ApplyStageFlags(args, spec);
}

// ---------------------------------------------------------------- file output

absl::Status ErrnoError(absl::string_view what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

class ScopedFd {
 public:
  explicit ScopedFd(int fd) : fd_(fd) {}
  ~ScopedFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

absl::Status WriteAll(int fd, const std::string& data, const std::string& path) {
  const char* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("write", path);
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

int64_t FileSizeOrZero(const std::string& path) {
  std::error_code ec;
  auto size = fs::file_size(path, ec);
  return ec ? 0 : static_cast<int64_t>(size);
}

absl::Time EventTime(const v1::JobEvent& event) {
  if (!event.has_time()) return absl::Now();
  return absl::FromUnixSeconds(event.time().seconds()) + absl::Nanoseconds(event.time().nanos());
}

// ---------------------------------------------------------------- the verbs

using EventHandler = std::function<bool(const v1::JobEvent&)>;  // false: stop

class Session {
 public:
  Session(v1::JobService::StubInterface* stub, const ParsedArgs& args, std::ostream& out,
          std::ostream& err, bool is_terminal)
      : stub_(stub), args_(args), out_(out), err_(err), is_terminal_(is_terminal) {}

  int Run() {
    const std::string& verb = args_.verb;
    if (verb == "help") {
      out_ << HelpText(args_.positionals.empty() ? "" : args_.positionals[0]);
      return kExitOk;
    }
    if (verb == "inspect") return Inspect();  // local: reads a file, calls no server
    if (stub_ == nullptr) return Fail(kExitUsage, "no connection to a server");
    if (verb == "submit") return Submit();
    if (verb == "get") return Get();
    if (verb == "list") return List();
    if (verb == "watch") return WatchVerb();
    if (verb == "cancel") return Cancel();
    if (verb == "pause") return Pause();
    if (verb == "resume") return Resume();
    if (verb == "delete") return Delete();
    if (verb == "fetch") return Fetch();
    if (verb == "logs") return Logs();
    return Fail(kExitUsage, absl::StrCat("unknown verb \"", verb, "\""));
  }

 private:
  enum class CallKind { kUnary, kStream };

  // Streams get no deadline unless --timeout asks for one: a watch may
  // legitimately last hours.
  std::unique_ptr<grpc::ClientContext> NewContext(CallKind kind) const {
    auto context = std::make_unique<grpc::ClientContext>();
    if (!args_.global.token.empty()) {
      context->AddMetadata("authorization", absl::StrCat("Bearer ", args_.global.token));
    }
    std::optional<absl::Duration> timeout = args_.global.timeout;
    if (!timeout && kind == CallKind::kUnary) timeout = kDefaultCallTimeout;
    if (timeout) context->set_deadline(absl::ToChronoTime(absl::Now() + *timeout));
    return context;
  }

  // One line, so that scripts can take the reason from the last line of stderr.
  int Fail(int exit_code, absl::string_view message) {
    err_ << "compressctl: " << args_.verb << ": " << absl::StrReplaceAll(message, {{"\n", " "}})
         << "\n";
    return exit_code;
  }

  int StatusFailure(const absl::Status& status) {
    return Fail(kExitRpcError,
                absl::StrCat(absl::StatusCodeToString(status.code()), ": ", status.message()));
  }

  int RpcFailure(const grpc::Status& status) { return StatusFailure(FromGrpcStatus(status)); }

  grpc::Status GetJob(const std::string& job_id, v1::Job* job) {
    v1::GetJobRequest request;
    request.set_job_id(job_id);
    auto context = NewContext(CallKind::kUnary);
    return stub_->GetJob(context.get(), request, job);
  }

  // GGUF by its magic, else safetensors. Every failure is a local one
  // (missing or invalid file): kExitUsage, like a bad recipe.
  int Inspect() {
    const std::string& path = args_.positionals[0];
    const bool json = args_.Has("json");
    std::error_code ec;
    if (fs::exists(path, ec) && !fs::is_regular_file(path, ec)) {
      return Fail(kExitUsage, absl::StrCat(path, " is not a file"));
    }
    std::string magic(4, '\0');
    {
      std::ifstream in(path, std::ios::binary);
      if (!in) {
        return Fail(kExitUsage, absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
      }
      in.read(magic.data(), 4);
      magic.resize(static_cast<size_t>(in.gcount()));
    }
    const bool gguf_extension = absl::EndsWithIgnoreCase(path, ".gguf");
    if (magic == "GGUF" || gguf_extension) {
      absl::StatusOr<GgufHeader> header = ReadGgufHeader(path);
      if (!header.ok()) return Fail(kExitUsage, header.status().message());
      out_ << (json ? GgufFileToJson(path, *header) + "\n" : FormatGgufFile(path, *header));
      return kExitOk;
    }
    absl::StatusOr<SafetensorsHeader> header = ReadSafetensorsHeader(path);
    if (!header.ok()) {
      if (absl::EndsWithIgnoreCase(path, ".safetensors")) {
        return Fail(kExitUsage, header.status().message());
      }
      return Fail(kExitUsage, absl::StrCat(path, " is neither GGUF (no 'GGUF' magic) nor "
                                                 "safetensors (",
                                           header.status().message(), ")"));
    }
    out_ << (json ? SafetensorsFileToJson(path, *header) + "\n"
                  : FormatSafetensorsFile(path, *header));
    return kExitOk;
  }

  int Submit() {
    v1::JobSpec spec;
    if (args_.Has("recipe")) {
      absl::StatusOr<v1::JobSpec> recipe = LoadRecipeFile(args_.Value("recipe"));
      if (!recipe.ok()) return Fail(kExitUsage, recipe.status().message());
      spec = *std::move(recipe);
    }
    if (absl::Status flags = ApplySubmitFlags(args_, &spec); !flags.ok()) {
      return Fail(kExitUsage, flags.message());
    }
    // Checked here too so that a typo costs no round trip and names the field.
    if (absl::Status valid = ValidateJobSpec(spec); !valid.ok()) {
      return Fail(kExitUsage, absl::StrCat("invalid job: ", valid.message()));
    }
    v1::SubmitJobRequest request;
    std::string request_id = args_.Value("request-id");
    request.set_request_id(request_id.empty() ? NewRequestId() : request_id);
    *request.mutable_spec() = std::move(spec);

    v1::SubmitJobResponse response;
    auto context = NewContext(CallKind::kUnary);
    grpc::Status status = stub_->SubmitJob(context.get(), request, &response);
    if (!status.ok()) return RpcFailure(status);
    const v1::Job& job = response.job();
    if (args_.Has("json")) {
      out_ << ToJson(job) << "\n";
    } else {
      out_ << job.id() << "\n";
    }
    out_.flush();
    if (!response.created()) {
      err_ << "compressctl: note: request id " << request.request_id()
           << " was submitted before; this is that job\n";
    }
    if (args_.Has("watch")) return Watch(job.id(), 0);
    return kExitOk;
  }

  int Get() {
    v1::Job job;
    grpc::Status status = GetJob(args_.positionals[0], &job);
    if (!status.ok()) return RpcFailure(status);
    out_ << (args_.Has("json") ? ToJson(job) + "\n" : FormatJobSummary(job));
    return kExitOk;
  }

  int List() {
    v1::ListJobsRequest request;
    for (const std::string& list : args_.Values("state")) {
      for (absl::string_view name : absl::StrSplit(list, ',', absl::SkipEmpty())) {
        absl::StatusOr<v1::JobState> state =
            ParseJobState(std::string(absl::StripAsciiWhitespace(name)));
        if (!state.ok()) return Fail(kExitUsage, state.status().message());
        request.add_states(*state);
      }
    }
    for (const std::string& text : args_.Values("label")) {
      absl::StatusOr<std::pair<std::string, std::string>> label = ParseLabel(text);
      if (!label.ok()) return Fail(kExitUsage, label.status().message());
      (*request.mutable_labels())[label->first] = label->second;
    }
    int32_t limit = kDefaultListLimit;
    if (args_.Has("limit")) {
      absl::StatusOr<int32_t> parsed = ParseInt32Flag("limit", args_.Value("limit"));
      if (!parsed.ok() || *parsed <= 0) return Fail(kExitUsage, "--limit wants a positive integer");
      limit = *parsed;
    }

    std::vector<v1::Job> jobs;
    bool more = false;
    do {
      request.set_page_size(
          std::min<int32_t>(limit - static_cast<int32_t>(jobs.size()), kMaxPageSize));
      v1::ListJobsResponse response;
      auto context = NewContext(CallKind::kUnary);
      grpc::Status status = stub_->ListJobs(context.get(), request, &response);
      if (!status.ok()) return RpcFailure(status);
      for (const v1::Job& job : response.jobs()) {
        if (static_cast<int32_t>(jobs.size()) < limit) {
          jobs.push_back(job);
        } else {
          more = true;
        }
      }
      request.set_page_token(response.next_page_token());
    } while (!request.page_token().empty() && static_cast<int32_t>(jobs.size()) < limit);
    more = more || !request.page_token().empty();

    if (args_.Has("json")) {
      for (const v1::Job& job : jobs) out_ << ToJson(job) << "\n";
      return kExitOk;
    }
    out_ << FormatJobTable(jobs);
    if (more) err_ << "(more jobs: raise --limit to see them)\n";
    return kExitOk;
  }

  int Cancel() {
    return ChangeJob([this](grpc::ClientContext* context, const std::string& id, v1::Job* job) {
      v1::CancelJobRequest request;
      request.set_job_id(id);
      return stub_->CancelJob(context, request, job);
    });
  }

  int Pause() {
    return ChangeJob([this](grpc::ClientContext* context, const std::string& id, v1::Job* job) {
      v1::PauseJobRequest request;
      request.set_job_id(id);
      return stub_->PauseJob(context, request, job);
    });
  }

  int Resume() {
    return ChangeJob([this](grpc::ClientContext* context, const std::string& id, v1::Job* job) {
      v1::ResumeJobRequest request;
      request.set_job_id(id);
      return stub_->ResumeJob(context, request, job);
    });
  }

  int Delete() {
    v1::DeleteJobRequest request;
    request.set_job_id(args_.positionals[0]);
    v1::DeleteJobResponse response;
    auto context = NewContext(CallKind::kUnary);
    grpc::Status status = stub_->DeleteJob(context.get(), request, &response);
    if (!status.ok()) return RpcFailure(status);
    out_ << (args_.Has("json") ? ToJson(response)
                               : absl::StrCat("deleted ", response.job_id(), " (",
                                              FormatBytes(response.freed_bytes()), " freed)"))
         << "\n";
    return kExitOk;
  }

  // One unary call that returns the changed job; prints "<id> <state>".
  int ChangeJob(const std::function<grpc::Status(grpc::ClientContext*, const std::string&, v1::Job*)>& call) {
    v1::Job job;
    auto context = NewContext(CallKind::kUnary);
    grpc::Status status = call(context.get(), args_.positionals[0], &job);
    if (!status.ok()) return RpcFailure(status);
    out_ << (args_.Has("json") ? ToJson(job) : absl::StrCat(job.id(), " ", StateName(job.state())))
         << "\n";
    return kExitOk;
  }

  // Streams the events of `job_id` from *next_sequence, replaying then
  // following, and reconnects from the last event seen when the stream breaks
  // with UNAVAILABLE. Returns when the stream ends (the job ended), when
  // `on_event` returns false (OK), or with the error that stopped it.
  grpc::Status StreamEvents(const std::string& job_id, int64_t* next_sequence,
                            const EventHandler& on_event) {
    int failures = 0;
    for (;;) {
      auto context = NewContext(CallKind::kStream);
      v1::WatchJobRequest request;
      request.set_job_id(job_id);
      request.set_from_sequence(*next_sequence);
      std::unique_ptr<grpc::ClientReaderInterface<v1::JobEvent>> reader =
          stub_->WatchJob(context.get(), request);
      v1::JobEvent event;
      bool stopped = false;
      while (reader->Read(&event)) {
        // After a reconnect the server may repeat what we have already shown.
        if (event.sequence() != 0 && event.sequence() < *next_sequence) continue;
        if (event.sequence() != 0) *next_sequence = event.sequence() + 1;
        failures = 0;
        if (!on_event(event)) {
          stopped = true;
          context->TryCancel();
          break;
        }
      }
      grpc::Status status = reader->Finish();
      if (stopped) return grpc::Status::OK;
      if (status.error_code() != grpc::StatusCode::UNAVAILABLE || ++failures > kMaxStreamRetries) {
        return status;
      }
      absl::SleepFor(kRetryBackoff * failures);
    }
  }

  int WatchVerb() {
    int64_t from_sequence = 0;
    if (args_.Has("from-sequence")) {
      if (!absl::SimpleAtoi(args_.Value("from-sequence"), &from_sequence) || from_sequence < 0) {
        return Fail(kExitUsage, "--from-sequence wants a non-negative integer");
      }
    }
    return Watch(args_.positionals[0], from_sequence);
  }

  // Shows one event on a terminal: the bar for progress, a line for the rest.
  static void ShowEvent(const v1::JobEvent& event, ProgressBar* bar) {
    if (event.has_progress()) {
      bar->Update(event.progress(), EventTime(event));
    } else if (event.has_artifact()) {
      bar->PrintLine(absl::StrCat("artifact ", event.artifact().name(), " (",
                                  FormatBytes(event.artifact().size_bytes()), ")"));
    } else if (std::optional<std::string> line = FormatLogLine(event)) {
      bar->PrintLine(*line);
    }
    // Metric events are for dashboards and `--json`; on a terminal they are noise.
  }

  int Watch(const std::string& job_id, int64_t from_sequence) {
    const bool json_lines = args_.Has("json") || !is_terminal_;
    std::optional<ProgressBar> bar;
    if (!json_lines) bar.emplace(out_);
    v1::JobState final_state = v1::JOB_STATE_UNSPECIFIED;
    std::string final_reason;
    auto on_event = [&](const v1::JobEvent& event) {
      if (json_lines) {
        out_ << ToJson(event) << "\n";
        out_.flush();
      } else {
        ShowEvent(event, &*bar);
      }
      if (event.has_state() && IsTerminalState(event.state().state())) {
        final_state = event.state().state();
        final_reason = event.state().reason();
      }
      return true;
    };

    int64_t next_sequence = from_sequence;
    for (int early_ends = 0; final_state == v1::JOB_STATE_UNSPECIFIED; ++early_ends) {
      grpc::Status status = StreamEvents(job_id, &next_sequence, on_event);
      if (bar) bar->Finish();
      if (!status.ok()) return RpcFailure(status);
      if (final_state != v1::JOB_STATE_UNSPECIFIED) break;
      // The stream ended without a final state: the events were skipped by
      // --from-sequence, or the server closed it early. The job knows.
      v1::Job job;
      status = GetJob(job_id, &job);
      if (!status.ok()) return RpcFailure(status);
      if (IsTerminalState(job.state())) {
        final_state = job.state();
        final_reason = job.message();
        break;
      }
      if (early_ends >= kMaxStreamRetries) {
        return Fail(kExitRpcError,
                    absl::StrCat("UNAVAILABLE: the event stream of job ", job_id,
                                 " keeps ending while the job is ", StateName(job.state())));
      }
      absl::SleepFor(kRetryBackoff * (early_ends + 1));
    }
    if (final_state == v1::SUCCEEDED) return kExitOk;
    return Fail(kExitJobFailed,
                absl::StrCat("job ", job_id, " ", StateName(final_state),
                             final_reason.empty() ? "" : absl::StrCat(": ", final_reason)));
  }

  int Logs() {
    const std::string& job_id = args_.positionals[0];
    const bool follow = args_.Has("follow");
    // Without --follow, stop at the newest event that exists now.
    int64_t caught_up_at = 0;
    if (!follow) {
      v1::Job job;
      grpc::Status status = GetJob(job_id, &job);
      if (!status.ok()) return RpcFailure(status);
      if (job.last_sequence() == 0) return kExitOk;
      caught_up_at = job.last_sequence();
    }
    int64_t next_sequence = 0;
    grpc::Status status = StreamEvents(job_id, &next_sequence, [&](const v1::JobEvent& event) {
      if (std::optional<std::string> line = FormatLogLine(event)) out_ << *line << "\n";
      return follow || event.sequence() < caught_up_at;
    });
    out_.flush();
    if (!status.ok()) return RpcFailure(status);
    return kExitOk;
  }

  int Fetch() {
    const std::string& job_id = args_.positionals[0];
    const std::string out_dir = args_.Value("out");
    if (out_dir.empty()) return Fail(kExitUsage, "--out DIR is required");
    v1::Job job;
    grpc::Status status = GetJob(job_id, &job);
    if (!status.ok()) return RpcFailure(status);

    std::vector<v1::Artifact> wanted;
    std::vector<std::string> names;
    for (const v1::Artifact& artifact : job.artifacts()) {
      names.push_back(artifact.name());
      if (!args_.Has("name") || artifact.name() == args_.Value("name")) wanted.push_back(artifact);
    }
    if (wanted.empty()) {
      if (args_.Has("name")) {
        return StatusFailure(absl::NotFoundError(absl::StrCat(
            "job ", job_id, " has no artifact \"", args_.Value("name"),
            "\" (artifacts: ", names.empty() ? "none" : absl::StrJoin(names, ", "), ")")));
      }
      return StatusFailure(absl::FailedPreconditionError(
          absl::StrCat("job ", job_id, " is ", StateName(job.state()), " and has no artifacts")));
    }
    for (const v1::Artifact& artifact : wanted) {
      absl::Status fetched = FetchArtifact(job_id, artifact, out_dir);
      if (!fetched.ok()) return StatusFailure(fetched);
    }
    return kExitOk;
  }

  // Downloads into OUT/NAME.partial, resuming from its size, checks size and
  // sha256 over the whole file, then renames it to OUT/NAME.
  absl::Status FetchArtifact(const std::string& job_id, const v1::Artifact& artifact,
                             const std::string& out_dir) {
    const std::string& name = artifact.name();
    // Names come from the server; one like "../../.bashrc" must not escape --out.
    if (!IsSafeRelativeName(name)) {
      return absl::PermissionDeniedError(
          absl::StrCat("artifact name \"", name, "\" is not a safe relative path; not writing it"));
    }
    if (artifact.sha256().empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat(name, ": the server recorded no sha256, so it cannot be verified"));
    }
    const fs::path final_path = fs::path(out_dir) / name;
    const std::string partial_path = final_path.string() + ".partial";
    RETURN_IF_ERROR(MakeDirs(final_path.parent_path().string()));

    std::error_code ec;
    if (fs::exists(final_path, ec)) {
      absl::StatusOr<std::string> existing = Sha256OfFile(final_path.string());
      if (existing.ok() && *existing == artifact.sha256()) {
        out_ << name << ": already fetched\n";
        return absl::OkStatus();
      }
    }
    int64_t have = FileSizeOrZero(partial_path);
    if (have > artifact.size_bytes()) {  // not a prefix of this artifact
      fs::remove(partial_path, ec);
      have = 0;
    }
    const int64_t resumed_from = have;
    RETURN_IF_ERROR(DownloadRemainder(job_id, artifact, partial_path, &have));

    ASSIGN_OR_RETURN(std::string actual, Sha256OfFile(partial_path));
    if (actual != artifact.sha256()) {
      fs::remove(partial_path, ec);
      return absl::DataLossError(absl::StrCat(name, ": sha256 mismatch (expected ",
                                              artifact.sha256(), ", got ", actual,
                                              "); removed the download"));
    }
    fs::rename(partial_path, final_path, ec);
    if (ec) {
      return absl::InternalError(
          absl::StrCat("rename ", partial_path, " to ", final_path.string(), ": ", ec.message()));
    }
    out_ << name << ": " << FormatBytes(artifact.size_bytes()) << ", sha256 ok"
         << (resumed_from > 0 ? absl::StrCat(", resumed at byte ", resumed_from) : "") << "\n";
    out_.flush();
    return absl::OkStatus();
  }

  // Appends bytes [*have, size) of the artifact to `partial_path`, resuming
  // after UNAVAILABLE from what has been written. Append-only, so an
  // interrupted run leaves a prefix the next run resumes from.
  absl::Status DownloadRemainder(const std::string& job_id, const v1::Artifact& artifact,
                                 const std::string& partial_path, int64_t* have) {
    ScopedFd fd(::open(partial_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
    if (fd.get() < 0) return ErrnoError("open", partial_path);
    const int64_t size = artifact.size_bytes();
    int failures = 0;
    while (*have < size) {
      auto context = NewContext(CallKind::kStream);
      v1::DownloadArtifactRequest request;
      request.set_job_id(job_id);
      request.set_name(artifact.name());
      request.set_offset(*have);
      std::unique_ptr<grpc::ClientReaderInterface<v1::ArtifactChunk>> reader =
          stub_->DownloadArtifact(context.get(), request);
      v1::ArtifactChunk chunk;
      absl::Status write_status;
      while (write_status.ok() && reader->Read(&chunk)) {
        const int64_t length = static_cast<int64_t>(chunk.data().size());
        if (chunk.offset() != *have) {
          write_status =
              absl::DataLossError(absl::StrCat(artifact.name(), ": the server sent bytes at ",
                                               chunk.offset(), ", expected ", *have));
        } else if (*have + length > size) {
          write_status = absl::DataLossError(absl::StrCat(
              artifact.name(), ": the server sent more than the recorded ", size, " bytes"));
        } else {
          write_status = WriteAll(fd.get(), chunk.data(), partial_path);
          if (write_status.ok()) {
            *have += length;
            if (length > 0) failures = 0;
          }
        }
        if (!write_status.ok()) context->TryCancel();
      }
      grpc::Status status = reader->Finish();
      if (!write_status.ok()) return write_status;
      if (status.ok()) {
        if (*have < size) {
          return absl::DataLossError(absl::StrCat(artifact.name(), ": the download ended at byte ",
                                                  *have, " of ", size,
                                                  "; run fetch again to resume"));
        }
        break;
      }
      if (status.error_code() != grpc::StatusCode::UNAVAILABLE || ++failures > kMaxStreamRetries) {
        return FromGrpcStatus(status);
      }
      absl::SleepFor(kRetryBackoff * failures);
    }
    if (::fsync(fd.get()) != 0) return ErrnoError("fsync", partial_path);
    return absl::OkStatus();
  }

  v1::JobService::StubInterface* stub_;
  const ParsedArgs& args_;
  std::ostream& out_;
  std::ostream& err_;
  bool is_terminal_;
};

}  // namespace

int RunCommand(v1::JobService::StubInterface* stub, const ParsedArgs& args, std::ostream& out,
               std::ostream& err, bool is_terminal) {
  return Session(stub, args, out, err, is_terminal).Run();
}

}  // namespace compress::client
