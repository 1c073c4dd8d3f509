// compressctl's verbs, written against the generated stub interface so that
// tests drive them with compress::v1::MockJobServiceStub and string streams.
#pragma once

#include <ostream>

#include "client/cli.h"
#include "compress/v1/compress.grpc.pb.h"

namespace compress::client {

// Runs `args.verb` and returns the process exit code (an ExitCode). Results go
// to `out`; errors go to `err` as one line, "compressctl: VERB: CODE: message".
// `is_terminal`: `out` is a terminal, so watch draws a live progress bar.
// `stub` may be null for "help".
int RunCommand(compress::v1::JobService::StubInterface* stub, const ParsedArgs& args,
               std::ostream& out, std::ostream& err, bool is_terminal);

}  // namespace compress::client
