// compressctl: the command-line client. Parses the line, dials the server and
// hands over to the verbs in commands.cc.
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <iostream>
#include <string>
#include <vector>

#include "client/cli.h"
#include "client/commands.h"
#include "common/files.h"

int main(int argc, char** argv) {
  using compress::client::ParsedArgs;
  absl::StatusOr<ParsedArgs> args = compress::client::ParseArgs(
      std::vector<std::string>(argv + 1, argv + argc), compress::client::ProcessEnvironment());
  if (!args.ok()) {
    std::cerr << "compressctl: " << args.status().message() << "\n";
    return compress::client::kExitUsage;
  }
  std::unique_ptr<compress::v1::JobService::Stub> stub;
  // Local verbs (help, inspect) never dial the server.
  if (args->verb != "help" && args->verb != "inspect") {
    std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
    if (!args->global.tls_ca_file.empty()) {
      absl::StatusOr<std::string> ca = compress::ReadFile(args->global.tls_ca_file, 1 << 20);
      if (!ca.ok()) {
        std::cerr << "compressctl: --tls-ca: " << ca.status().message() << "\n";
        return compress::client::kExitUsage;
      }
      grpc::SslCredentialsOptions options;
      options.pem_root_certs = *ca;
      credentials = grpc::SslCredentials(options);
    }
    stub = compress::v1::JobService::NewStub(grpc::CreateChannel(args->global.server, credentials));
  }
  return compress::client::RunCommand(stub.get(), *args, std::cout, std::cerr,
                                      ::isatty(STDOUT_FILENO) == 1);
}
