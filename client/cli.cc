#include "client/cli.h"

#include <cstdlib>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace compress::client {
namespace {

enum class OptionKind {
  kFlag,      // --watch
  kValue,     // --model PATH (the last one wins)
  kRepeated,  // --label k=v --label k2=v2
};

struct OptionSpec {
  const char* name;  // without "--"
  OptionKind kind;
  const char* value_name;  // shown in help, "" for flags
  const char* help;
};

struct VerbSpec {
  const char* name;
  const char* arguments;  // positional arguments, shown in help
  int argument_count;     // exactly this many
  std::vector<const char*> options;
  const char* summary;
  const char* example;
};

const std::vector<OptionSpec>& GlobalOptionTable() {
  static const auto* table = new std::vector<OptionSpec>{
      {"server", OptionKind::kValue, "ADDR",
       "server address (else $COMPRESS_SERVER, else 127.0.0.1:50051)"},
      {"token", OptionKind::kValue, "TOKEN",
       "sent as 'authorization: Bearer TOKEN' (else $COMPRESS_TOKEN)"},
      {"timeout", OptionKind::kValue, "SECONDS",
       "deadline of each call (default 30 for single calls, none for streams)"},
      {"tls-ca", OptionKind::kValue, "FILE",
       "dial with TLS, trusting this PEM CA bundle (else $COMPRESS_TLS_CA)"},
      {"help", OptionKind::kFlag, "", "show help (for a verb: compressctl VERB --help)"},
  };
  return *table;
}

const std::vector<OptionSpec>& VerbOptionTable() {
  static const auto* table = new std::vector<OptionSpec>{
      {"recipe", OptionKind::kValue, "FILE", "recipe (YAML or JSON form of JobSpec)"},
      {"model", OptionKind::kValue, "PATH", "model folder or .safetensors file on the server"},
      {"method", OptionKind::kValue, "NAME",
       "method of the stage: rtn, gptq, awq, hqq, nf4, fp4, int8; pruning: magnitude, wanda, "
       "sparsegpt"},
      {"calibration", OptionKind::kValue, "PATH",
       "calibration text (or .tokens file) on the server, for gptq, awq, wanda and sparsegpt"},
      {"bits", OptionKind::kValue, "N", "bits per weight, 2..8 (default 4)"},
      {"group-size", OptionKind::kValue, "N",
       "weights per scale; -1 or 0: one per output channel (default 128); nf4/fp4: block size "
       "(default 64)"},
      {"double-quant", OptionKind::kFlag, "", "nf4/fp4: quantize the block absmax values to 8 bits"},
      {"sparsity", OptionKind::kValue, "RATIO",
       "pruning: fraction of the weights zeroed, unstructured (default 0.5)"},
      {"pattern", OptionKind::kValue, "N:M",
       "pruning: keep N of every M consecutive weights of a row (2:4, 4:8)"},
      {"gguf", OptionKind::kValue, "PRESETS",
       "GGUF files to write, e.g. Q4_K_M,Q8_0 (Q6_K+imatrix: weighted by calibration)"},
      {"sym", OptionKind::kFlag, "", "symmetric quantization (default)"},
      {"asym", OptionKind::kFlag, "", "asymmetric quantization, with a zero point"},
      {"output", OptionKind::kValue, "LIST", "comma-separated output formats: dequantized, packed"},
      {"priority", OptionKind::kValue, "N", "-1000..1000, higher runs first"},
      {"label", OptionKind::kRepeated, "KEY=VALUE", "label the job (submit) or filter (list)"},
      {"name", OptionKind::kValue, "NAME", "job name (submit) or artifact to fetch (fetch)"},
      {"request-id", OptionKind::kValue, "ID",
       "idempotency key: resubmitting with it returns the first job (default: random)"},
      {"watch", OptionKind::kFlag, "", "after submitting, watch the job until it ends"},
      {"json", OptionKind::kFlag, "", "print JSON (one object per line) instead of text"},
      {"state", OptionKind::kRepeated, "LIST",
       "only jobs in these states: queued, running, paused, succeeded, failed, cancelled"},
      {"limit", OptionKind::kValue, "N", "list at most N jobs (default 100)"},
      {"from-sequence", OptionKind::kValue, "N", "first event sequence to show (default 1)"},
      {"out", OptionKind::kValue, "DIR", "folder to download into"},
      {"follow", OptionKind::kFlag, "", "keep printing until the job ends"},
  };
  return *table;
}

const std::vector<VerbSpec>& VerbTable() {
  static const auto* table = new std::vector<VerbSpec>{
      {"submit",
       "",
       0,
       {"recipe", "model", "method", "calibration", "bits", "group-size", "sym", "asym",
        "double-quant", "sparsity", "pattern", "gguf", "output", "priority", "label", "name",
        "request-id", "watch", "json"},
       "Submit a job from a recipe and/or flags (flags override the recipe); prints the job id.",
       "compressctl submit --model models/llama --recipe w4.yaml --watch\n"
       "compressctl submit --model models/llama --method rtn --bits 4 --group-size 128 "
       "--output dequantized,packed --label team=nlp\n"
       "compressctl submit --model models/llama --method gptq --bits 3 --calibration calib.txt\n"
       "compressctl submit --model models/llama --method awq --bits 4 --calibration calib.txt "
       "--output packed\n"
       "compressctl submit --model models/llama --method hqq --bits 3 --group-size 64\n"
       "compressctl submit --model models/llama --method nf4 --double-quant --output packed\n"
       "compressctl submit --model models/llama --method wanda --pattern 2:4 --calibration calib.txt\n"
       "compressctl submit --model models/llama --method awq --calibration calib.txt "
       "--gguf Q4_K_M,Q8_0"},
      {"get",
       "JOB",
       1,
       {"json"},
       "Show a job: state, progress, worker, times, report and artifacts.",
       "compressctl get j-0123abcd"},
      {"list",
       "",
       0,
       {"state", "label", "limit", "json"},
       "List jobs, newest first.",
       "compressctl list --state running,queued --label team=nlp --limit 20"},
      {"watch",
       "JOB",
       1,
       {"from-sequence", "json"},
       "Follow a job's events until it ends (a progress bar on a terminal, else JSON lines).",
       "compressctl watch j-0123abcd"},
      {"cancel", "JOB", 1, {"json"}, "Cancel a job.", "compressctl cancel j-0123abcd"},
      {"pause",
       "JOB",
       1,
       {"json"},
       "Hold a job: running tasks stop, finished blocks are kept.",
       "compressctl pause j-0123abcd"},
      {"resume", "JOB", 1, {"json"}, "Continue a paused job from where it stopped.",
       "compressctl resume j-0123abcd"},
      {"delete",
       "JOB",
       1,
       {"json"},
       "Remove an ended job: its record, events, artifacts and checkpoints on the server.",
       "compressctl delete j-0123abcd"},
      {"fetch",
       "JOB",
       1,
       {"out", "name"},
       "Download a job's artifacts into DIR (resumable, sha256-checked).",
       "compressctl fetch j-0123abcd --out ./llama-w4"},
      {"logs",
       "JOB",
       1,
       {"follow"},
       "Print a job's log lines and state changes as 'TIME LEVEL text'.",
       "compressctl logs j-0123abcd --follow"},
      {"inspect",
       "FILE",
       1,
       {"json"},
       "Show a local .gguf or .safetensors file (no server): metadata, each tensor's shape "
       "[out, in], type and bytes, the total and bits per weight.",
       "compressctl inspect llama-q4_k_m.gguf\n"
       "compressctl inspect models/llama/model.safetensors --json"},
      {"help", "[VERB]", -1, {}, "Show this help, or a verb's options.", "compressctl help fetch"},
  };
  return *table;
}

const OptionSpec* FindOption(const std::string& name, bool* is_global) {
  for (const OptionSpec& option : GlobalOptionTable()) {
    if (name == option.name) {
      *is_global = true;
      return &option;
    }
  }
  for (const OptionSpec& option : VerbOptionTable()) {
    if (name == option.name) {
      *is_global = false;
      return &option;
    }
  }
  return nullptr;
}

const VerbSpec* FindVerb(const std::string& name) {
  for (const VerbSpec& verb : VerbTable()) {
    if (name == verb.name) return &verb;
  }
  return nullptr;
}

bool VerbAccepts(const VerbSpec& verb, const std::string& option) {
  for (const char* name : verb.options) {
    if (option == name) return true;
  }
  return false;
}

std::string OptionUsage(const OptionSpec& option) {
  std::string usage = absl::StrCat("--", option.name);
  if (option.kind != OptionKind::kFlag) absl::StrAppend(&usage, " ", option.value_name);
  return usage;
}

std::string Indent(const std::string& text, const std::string& prefix) {
  std::string out;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    absl::StrAppend(&out, prefix, line, "\n");
  }
  return out;
}

absl::Status ResolveGlobals(const EnvLookup& env, ParsedArgs* parsed) {
  auto from_env = [&env](const char* name) -> std::string {
    if (!env) return "";
    return env(name).value_or("");
  };
  std::string server = parsed->Value("server", from_env("COMPRESS_SERVER"));
  if (!server.empty()) parsed->global.server = server;
  parsed->global.token = parsed->Value("token", from_env("COMPRESS_TOKEN"));
  parsed->global.tls_ca_file = parsed->Value("tls-ca", from_env("COMPRESS_TLS_CA"));
  if (parsed->Has("timeout")) {
    double seconds = 0;
    if (!absl::SimpleAtod(parsed->Value("timeout"), &seconds) || !(seconds > 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--timeout wants a positive number of seconds, got \"", parsed->Value("timeout"), "\""));
    }
    parsed->global.timeout = absl::Seconds(seconds);
  }
  return absl::OkStatus();
}

}  // namespace

std::string ParsedArgs::Value(const std::string& name, const std::string& fallback) const {
  auto it = options.find(name);
  if (it == options.end() || it->second.empty()) return fallback;
  return it->second.back();
}

std::vector<std::string> ParsedArgs::Values(const std::string& name) const {
  auto it = options.find(name);
  if (it == options.end()) return {};
  return it->second;
}

EnvLookup ProcessEnvironment() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* value = std::getenv(name.c_str());
    if (value == nullptr) return std::nullopt;
    return std::string(value);
  };
}

absl::StatusOr<ParsedArgs> ParseArgs(const std::vector<std::string>& args, const EnvLookup& env) {
  ParsedArgs parsed;
  // Options are checked against the verb after the whole line is read, so
  // global options may come before or after it.
  std::vector<std::string> verb_options_seen;
  bool options_ended = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i] == "-h" && !options_ended ? "--help" : args[i];
    if (options_ended || !absl::StartsWith(arg, "--") || arg == "-") {
      if (parsed.verb.empty()) {
        parsed.verb = arg;
      } else {
        parsed.positionals.push_back(arg);
      }
      continue;
    }
    if (arg == "--") {
      options_ended = true;
      continue;
    }
    std::string name = arg.substr(2);
    std::optional<std::string> inline_value;
    if (size_t equals = name.find('='); equals != std::string::npos) {
      inline_value = name.substr(equals + 1);
      name = name.substr(0, equals);
    }
    bool is_global = false;
    const OptionSpec* option = FindOption(name, &is_global);
    if (option == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("unknown option --", name));
    if (!is_global) verb_options_seen.push_back(name);
    std::vector<std::string>& values = parsed.options[name];
    if (option->kind == OptionKind::kFlag) {
      if (inline_value) {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
      }
      values.push_back("true");
      continue;
    }
    if (!inline_value) {
      if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, " needs a value (", option->value_name, ")"));
      }
      inline_value = args[++i];
    }
    values.push_back(*inline_value);
  }

  if (parsed.Has("help")) {
    // "compressctl submit --help" is "compressctl help submit".
    if (!parsed.verb.empty() && parsed.verb != "help") parsed.positionals = {parsed.verb};
    parsed.verb = "help";
  }
  if (parsed.verb.empty()) {
    return absl::InvalidArgumentError("no verb given (try: compressctl help)");
  }
  const VerbSpec* verb = FindVerb(parsed.verb);
  if (verb == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown verb \"", parsed.verb, "\" (verbs: ", absl::StrJoin(VerbNames(), ", "), ")"));
  }
  if (parsed.verb == "help") {
    if (parsed.positionals.size() > 1 ||
        (parsed.positionals.size() == 1 && FindVerb(parsed.positionals[0]) == nullptr)) {
      return absl::InvalidArgumentError(
          absl::StrCat("help takes one verb (", absl::StrJoin(VerbNames(), ", "), ")"));
    }
    return parsed;
  }
  for (const std::string& name : verb_options_seen) {
    if (!VerbAccepts(*verb, name)) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " is not an option of ",
                                                     verb->name, " (see: compressctl help ",
                                                     verb->name, ")"));
    }
  }
  if (static_cast<int>(parsed.positionals.size()) != verb->argument_count) {
    return absl::InvalidArgumentError(
        verb->argument_count == 0
            ? absl::StrCat(verb->name, " takes no arguments, got \"", parsed.positionals[0], "\"")
            : absl::StrCat(verb->name, " takes ", verb->arguments, ", got ",
                           parsed.positionals.size(), " arguments"));
  }
  absl::Status globals = ResolveGlobals(env, &parsed);
  if (!globals.ok()) return globals;
  return parsed;
}

std::vector<std::string> VerbNames() {
  std::vector<std::string> names;
  for (const VerbSpec& verb : VerbTable()) names.push_back(verb.name);
  return names;
}

std::string HelpText(const std::string& verb_name) {
  std::string text;
  if (const VerbSpec* verb = FindVerb(verb_name); verb != nullptr) {
    absl::StrAppend(&text, "Usage: compressctl ", verb->name,
                    *verb->arguments ? absl::StrCat(" ", verb->arguments) : "",
                    verb->options.empty() ? "" : " [OPTIONS]", "\n\n", verb->summary, "\n");
    if (!verb->options.empty()) absl::StrAppend(&text, "\nOptions:\n");
    for (const char* name : verb->options) {
      bool is_global = false;
      const OptionSpec* option = FindOption(name, &is_global);
      absl::StrAppend(&text, absl::StrFormat("  %-22s %s\n", OptionUsage(*option), option->help));
    }
    absl::StrAppend(&text, "\nExample:\n", Indent(verb->example, "  "));
    return text;
  }
  absl::StrAppend(&text,
                  "compressctl: submit, follow and fetch model compression jobs.\n\n"
                  "Usage: compressctl VERB [ARGS] [OPTIONS]\n\nVerbs:\n");
  for (const VerbSpec& verb : VerbTable()) {
    absl::StrAppend(&text, absl::StrFormat("  %-8s %s\n", verb.name, verb.summary),
                    Indent(verb.example, "             "));
  }
  absl::StrAppend(&text, "\nGlobal options:\n");
  for (const OptionSpec& option : GlobalOptionTable()) {
    absl::StrAppend(&text, absl::StrFormat("  %-22s %s\n", OptionUsage(option), option.help));
  }
  absl::StrAppend(&text,
                  "\nExit codes: 0 ok; 1 usage error (nothing sent); 2 server or network error;\n"
                  "3 the job ended FAILED or CANCELLED (watch, submit --watch).\n");
  return text;
}

}  // namespace compress::client
