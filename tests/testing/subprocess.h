// Real child processes for end-to-end tests: start, read their output, signal.
#pragma once

#include <signal.h>
#include <sys/types.h>

#include <string>
#include <vector>

namespace compress::testing {

class Subprocess {
 public:
  // Starts `argv` with stdout and stderr appended to `log_path`.
  Subprocess(std::vector<std::string> argv, std::string log_path);
  ~Subprocess();  // SIGKILLs if still running
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  pid_t pid() const { return pid_; }
  void Signal(int signal);
  void Kill() { Signal(SIGKILL); Wait(); }
  int Wait();  // exit status (or 128 + signal)
  bool Running();
  std::string Log() const;
  // Waits until the log contains `key=<int>` and returns the int (-1 on timeout).
  int WaitForNumber(const std::string& key, int timeout_ms = 20000) const;

 private:
  pid_t pid_ = -1;
  std::string log_path_;
  int status_ = -1;
};

// Runs to completion; returns the exit status and fills `output`.
int RunCommand(const std::vector<std::string>& argv, std::string* output);

// A port that was free a moment ago (for processes that must restart on it).
int PickFreePort();

}  // namespace compress::testing
