#include "tests/testing/subprocess.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

namespace compress::testing {

Subprocess::Subprocess(std::vector<std::string> argv, std::string log_path)
    : log_path_(std::move(log_path)) {
  pid_ = fork();
  if (pid_ == 0) {
    int fd = open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    std::vector<char*> args;
    for (std::string& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
}

Subprocess::~Subprocess() {
  if (Running()) Kill();
}

void Subprocess::Signal(int signal) {
  if (pid_ > 0 && status_ < 0) kill(pid_, signal);
}

int Subprocess::Wait() {
  if (status_ >= 0) return status_;
  int raw = 0;
  waitpid(pid_, &raw, 0);
  status_ = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
  return status_;
}

bool Subprocess::Running() {
  if (pid_ <= 0 || status_ >= 0) return false;
  int raw = 0;
  pid_t r = waitpid(pid_, &raw, WNOHANG);
  if (r == 0) return true;
  status_ = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
  return false;
}

std::string Subprocess::Log() const {
  std::ifstream in(log_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int Subprocess::WaitForNumber(const std::string& key, int timeout_ms) const {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  std::string needle = key + "=";
  while (std::chrono::steady_clock::now() < deadline) {
    std::string log = Log();
    size_t at = log.rfind(needle);
    if (at != std::string::npos) {
      size_t end = at + needle.size();
      while (end < log.size() && isdigit(static_cast<unsigned char>(log[end]))) ++end;
      if (end > at + needle.size() && end < log.size()) {
        return std::stoi(log.substr(at + needle.size(), end - at - needle.size()));
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

int RunCommand(const std::vector<std::string>& argv, std::string* output) {
  char path[] = "/tmp/compress-cmd-XXXXXX";
  int fd = mkstemp(path);
  close(fd);
  int status;
  {
    Subprocess process(argv, path);
    status = process.Wait();
    if (output) *output = process.Log();
  }
  unlink(path);
  return status;
}

int PickFreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  int port = ntohs(addr.sin_port);
  close(fd);
  return port;
}

}  // namespace compress::testing
