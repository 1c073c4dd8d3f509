// compressctl's command line: one table of verbs and options, one parser.
//
// Every verb and option is a row in the tables in cli.cc; help text, the
// "does this option apply to this verb" check and the parser all read them.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace compress::client {

// Process exit codes, documented in `compressctl help`.
enum ExitCode : int {
  kExitOk = 0,
  kExitUsage = 1,      // bad command line, recipe or flags (nothing was sent)
  kExitRpcError = 2,   // the server or the network said no
  kExitJobFailed = 3,  // the job ended FAILED or CANCELLED
};

constexpr char kDefaultServer[] = "127.0.0.1:50051";

// Options that apply to every verb, resolved from flags and the environment.
struct GlobalOptions {
  std::string server = kDefaultServer;    // --server, else $COMPRESS_SERVER
  std::string token;                      // --token, else $COMPRESS_TOKEN
  std::string tls_ca_file;                // --tls-ca, else $COMPRESS_TLS_CA; empty: plaintext
  std::optional<absl::Duration> timeout;  // --timeout SECONDS
};

struct ParsedArgs {
  std::string verb;  // "help" for help requests
  std::vector<std::string> positionals;
  std::map<std::string, std::vector<std::string>> options;  // by name without "--"
  GlobalOptions global;

  bool Has(const std::string& name) const { return options.count(name) > 0; }
  // The last value given (a later flag overrides an earlier one), or `fallback`.
  std::string Value(const std::string& name, const std::string& fallback = "") const;
  // Every value given, in order (repeatable options such as --label).
  std::vector<std::string> Values(const std::string& name) const;
};

// Returns the value of an environment variable, or nullopt.
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;
EnvLookup ProcessEnvironment();

// Parses argv without the program name. INVALID_ARGUMENT names the problem
// ("unknown option --bitz", "get takes 1 argument (JOB), got 0").
absl::StatusOr<ParsedArgs> ParseArgs(const std::vector<std::string>& args,
                                     const EnvLookup& env = nullptr);

// `compressctl help` (empty verb) or `compressctl help VERB`.
std::string HelpText(const std::string& verb = "");

// The verbs, in the order help lists them.
std::vector<std::string> VerbNames();

}  // namespace compress::client
