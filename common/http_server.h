// A small HTTP server for /metrics and /healthz (cpp-httplib underneath).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace compress {

namespace metrics { class Registry; }

struct HttpResponse {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
};

class HttpServer {
 public:
  HttpServer();
  ~HttpServer();  // stops
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // GET handlers, registered before Start().
  void Handle(const std::string& path, std::function<HttpResponse()> handler);
  // Serves registry.Serialize() at /metrics with the Prometheus content type.
  void HandleMetrics(const metrics::Registry& registry);

  // `listen` is "host:port"; port 0 picks a free one. Returns the bound port.
  // Serves on a background thread.
  absl::StatusOr<int> Start(const std::string& listen);
  void Stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace compress
