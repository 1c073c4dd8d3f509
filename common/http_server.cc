#include "common/http_server.h"

#include <sys/socket.h>

#include <chrono>
#include <exception>
#include <map>
#include <mutex>
#include <thread>

// Debian builds libcpp-httplib with OpenSSL support, which adds members to
// httplib::Request and ClientImpl: the header must see the same define, or
// its classes have another layout than the compiled library. (Its zlib and
// brotli defines only declare compressor classes we never use, and zlib.h's
// global compress() would collide with our namespace.)
#ifndef CPPHTTPLIB_OPENSSL_SUPPORT
#define CPPHTTPLIB_OPENSSL_SUPPORT
#endif
#include <httplib.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/metrics.h"

namespace compress {
namespace {

constexpr char kPrometheusContentType[] = "text/plain; version=0.0.4; charset=utf-8";
// /metrics and /healthz see a scrape every few seconds; two threads are plenty.
constexpr size_t kServerThreads = 2;
constexpr auto kStartTimeout = std::chrono::seconds(5);

struct HostPort {
  std::string host;
  int port = 0;
};

// "host:port", "[v6]:port" or ":port" (all interfaces).
absl::StatusOr<HostPort> ParseListenAddress(const std::string& listen) {
  size_t colon = listen.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen address \"", listen, "\" is not host:port"));
  }
  HostPort result;
  result.host = listen.substr(0, colon);
  if (result.host.size() >= 2 && result.host.front() == '[' && result.host.back() == ']') {
    result.host = result.host.substr(1, result.host.size() - 2);
  }
  if (result.host.empty()) result.host = "0.0.0.0";
  if (!absl::SimpleAtoi(listen.substr(colon + 1), &result.port) || result.port < 0 ||
      result.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen address \"", listen, "\" has no port in 0..65535"));
  }
  return result;
}

}  // namespace

struct HttpServer::Impl {
  httplib::Server server;
  std::thread thread;
  std::mutex mu;
  std::map<std::string, std::function<HttpResponse()>> handlers;  // by exact path
  bool started = false;

  // One route for every GET: exact path lookup, so paths need no regex escaping.
  void Dispatch(const httplib::Request& request, httplib::Response& response) {
    std::function<HttpResponse()> handler;
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = handlers.find(request.path);
      if (it != handlers.end()) handler = it->second;
    }
    if (!handler) {
      response.status = 404;
      response.set_content("not found\n", "text/plain; charset=utf-8");
      return;
    }
    HttpResponse reply;
    try {
      reply = handler();
    } catch (const std::exception& e) {
      reply.status = 500;
      reply.content_type = "text/plain; charset=utf-8";
      reply.body = absl::StrCat("handler failed: ", e.what(), "\n");
    }
    response.status = reply.status;
    response.set_content(reply.body, reply.content_type.c_str());
  }
};

HttpServer::HttpServer() : impl_(std::make_unique<Impl>()) {
  impl_->server.new_task_queue = [] { return new httplib::ThreadPool(kServerThreads); };
  // httplib's default sets SO_REUSEPORT, which lets a second process bind the
  // same port and silently share the scrapes. SO_REUSEADDR alone still allows
  // a quick restart, and a busy port fails Start().
  impl_->server.set_socket_options([](socket_t sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  impl_->server.Get(
      ".*", [impl = impl_.get()](const httplib::Request& request, httplib::Response& response) {
        impl->Dispatch(request, response);
      });
  Handle("/healthz", [] {
    HttpResponse ok;
    ok.body = "ok\n";
    return ok;
  });
}

HttpServer::~HttpServer() { Stop(); }

void HttpServer::Handle(const std::string& path, std::function<HttpResponse()> handler) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->handlers[path] = std::move(handler);
}

void HttpServer::HandleMetrics(const metrics::Registry& registry) {
  Handle("/metrics", [&registry] {
    HttpResponse page;
    page.content_type = kPrometheusContentType;
    page.body = registry.Serialize();
    return page;
  });
}

absl::StatusOr<int> HttpServer::Start(const std::string& listen) {
  absl::StatusOr<HostPort> address = ParseListenAddress(listen);
  if (!address.ok()) return address.status();
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->started) return absl::FailedPreconditionError("HTTP server already started");
    impl_->started = true;
  }
  int port = address->port;
  if (port == 0) {
    port = impl_->server.bind_to_any_port(address->host);
  } else if (!impl_->server.bind_to_port(address->host, port)) {
    port = -1;
  }
  if (port < 0) {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->started = false;
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", listen, " (address in use, or not permitted)"));
  }
  impl_->thread = std::thread([impl = impl_.get()] { impl->server.listen_after_bind(); });
  // httplib's stop() is a no-op until the accept loop runs; wait for it so that
  // a Stop() right after Start() cannot leave the thread blocked in accept.
  auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
  while (!impl_->server.is_running() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return port;
}

void HttpServer::Stop() {
  impl_->server.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

}  // namespace compress
