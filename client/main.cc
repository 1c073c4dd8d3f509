// compressctl: the command-line client. Parses the line, dials the server and
// hands over to the verbs in commands.cc.
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <iostream>
#include <string>
#include <vector>

#include "client/cli.h"
#include "client/commands.h"

int main(int argc, char** argv) {
  using compress::client::ParsedArgs;
  absl::StatusOr<ParsedArgs> args = compress::client::ParseArgs(
      std::vector<std::string>(argv + 1, argv + argc), compress::client::ProcessEnvironment());
  if (!args.ok()) {
    std::cerr << "compressctl: " << args.status().message() << "\n";
    return compress::client::kExitUsage;
  }
  std::unique_ptr<compress::v1::JobService::Stub> stub;
  if (args->verb != "help") {
    stub = compress::v1::JobService::NewStub(
        grpc::CreateChannel(args->global.server, grpc::InsecureChannelCredentials()));
  }
  return compress::client::RunCommand(stub.get(), *args, std::cout, std::cerr,
                                      ::isatty(STDOUT_FILENO) == 1);
}
