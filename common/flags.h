// A small flag table for the server and worker binaries: `--name value` or
// `--name=value`; repeatable flags collect into a vector.
#pragma once

#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"

namespace compress {

class FlagSet {
 public:
  explicit FlagSet(std::string program) : program_(std::move(program)) {}
  void Add(std::string name, std::string* value, std::string help);
  void Add(std::string name, int* value, std::string help);
  void Add(std::string name, bool* value, std::string help);  // --name / --no-name
  void Add(std::string name, std::vector<std::string>* values, std::string help);  // repeatable

  // Parses argv[first..]; non-flag arguments go to positional(). "--help"
  // gives a FAILED_PRECONDITION whose message is Usage().
  absl::Status Parse(int argc, char** argv, int first = 1);
  std::string Usage() const;
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  struct Flag {
    std::string name;
    std::variant<std::string*, int*, bool*, std::vector<std::string>*> target;
    std::string help;
  };
  const Flag* Find(const std::string& name) const;

  std::string program_;
  std::vector<Flag> flags_;
  std::vector<std::string> positional_;
};

}  // namespace compress
