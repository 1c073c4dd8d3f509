#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/support/server_interceptor.h>

#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/files.h"
#include "common/log.h"
#include "common/process_stats.h"
#include "common/status_macros.h"

namespace compress::server {
namespace {

// Times every unary RPC from its arrival to its status, by method name
// ("/compress.v1.JobService/SubmitJob" -> "SubmitJob").
class RpcLatencyInterceptor : public grpc::experimental::Interceptor {
 public:
  RpcLatencyInterceptor(grpc::experimental::ServerRpcInfo* info, ServerMetrics* metrics)
      : metrics_(metrics), unary_(info->type() == grpc::experimental::ServerRpcInfo::Type::UNARY) {
    const std::string method = info->method() == nullptr ? "" : info->method();
    method_ = method.substr(method.rfind('/') + 1);
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using Hook = grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(Hook::POST_RECV_INITIAL_METADATA)) {
      start_ = absl::Now();
    }
    if (unary_ && methods->QueryInterceptionHookPoint(Hook::PRE_SEND_STATUS)) {
      metrics_->rpc_latency_seconds.Add({{"method", method_}}, metrics::DefaultLatencyBuckets())
          .Observe(absl::ToDoubleSeconds(absl::Now() - start_));
    }
    methods->Proceed();
  }

 private:
  ServerMetrics* const metrics_;
  const bool unary_;
  std::string method_;
  absl::Time start_ = absl::Now();
};

class RpcLatencyInterceptorFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit RpcLatencyInterceptorFactory(ServerMetrics* metrics) : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new RpcLatencyInterceptor(info, metrics_);
  }

 private:
  ServerMetrics* const metrics_;
};

}  // namespace


CompressServer::CompressServer(ServerConfig config)
    : config_(std::move(config)), metrics_(registry_) {}

CompressServer::~CompressServer() { Shutdown(); }

absl::Status CompressServer::Start() {
  namespace fs = std::filesystem;
  RETURN_IF_ERROR(MakeDirs(config_.data_dir));
  std::string artifact_dir = (fs::path(config_.data_dir) / "artifacts").string();
  RETURN_IF_ERROR(MakeDirs(artifact_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<JobStore> store, OpenStore());
  SchedulerConfig scheduler_config;
  scheduler_config.model_roots = config_.model_roots;
  scheduler_config.artifact_dir = artifact_dir;
  scheduler_config.lease_timeout = absl::Seconds(config_.lease_seconds);
  scheduler_config.max_attempts = config_.max_attempts;
  scheduler_config.planner.max_block_tasks = config_.max_block_tasks;
  scheduler_config.max_task_memory_bytes = int64_t{config_.max_task_memory_gib} << 30;
  scheduler_config.retention = config_.retention;
  ASSIGN_OR_RETURN(scheduler_, Scheduler::Create(scheduler_config, std::move(store), &metrics_));
  if (!config_.auth_tokens_file.empty()) {
    ASSIGN_OR_RETURN(auth_, TokenAuthenticator::FromFile(config_.auth_tokens_file));
  }
  job_service_ = std::make_unique<JobServiceImpl>(scheduler_.get(), &metrics_, &auth_);
  worker_service_ = std::make_unique<WorkerServiceImpl>(scheduler_.get(), &metrics_, &auth_);
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials, ServerCredentials());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(config_.listen, credentials, &grpc_port_);
  // A second server on the same port fails to start instead of sharing it.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(config_.max_message_bytes);
  builder.SetMaxSendMessageSize(config_.max_message_bytes);
  builder.RegisterService(job_service_.get());
  builder.RegisterService(worker_service_.get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<RpcLatencyInterceptorFactory>(&metrics_));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  grpc_server_ = builder.BuildAndStart();
  if (grpc_server_ == nullptr || grpc_port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", config_.listen));
  }
  if (grpc::HealthCheckServiceInterface* health = grpc_server_->GetHealthCheckService()) {
    for (const char* service : {"compress.v1.JobService", "compress.v1.WorkerService"}) {
      health->SetServingStatus(service, true);
    }
  }
  scheduler_->Start();

  if (!config_.metrics_listen.empty()) {
    registry_.AddCollectHook([this] {
      metrics_.process_resident_memory_bytes.Set(static_cast<double>(ResidentMemoryBytes()));
      metrics_.process_cpu_seconds.Increment(ProcessCpuSeconds() -
                                             metrics_.process_cpu_seconds.Value());
    });
    http_.HandleMetrics(registry_);
    http_.Handle("/healthz", [] { return HttpResponse{200, "text/plain; charset=utf-8", "ok\n"}; });
    ASSIGN_OR_RETURN(metrics_port_, http_.Start(config_.metrics_listen));
  }
  LOG_INFO("serving", {{"grpc_port", std::to_string(grpc_port_)},
                       {"metrics_port", std::to_string(metrics_port_)},
                       {"data_dir", config_.data_dir},
                       {"store", config_.store.empty() ? "sqlite" : "postgres"}});
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<JobStore>> CompressServer::OpenStore() const {
  const std::string& store = config_.store;
  if (store.empty()) {
    return OpenSqliteJobStore((std::filesystem::path(config_.data_dir) / "jobs.db").string());
  }
  if (absl::StartsWith(store, "postgres://") || absl::StartsWith(store, "postgresql://")) {
    return OpenPostgresJobStore(store);
  }
  // Only the scheme is repeated: the rest may hold a password.
  const size_t colon = store.find(':');
  return absl::InvalidArgumentError(absl::StrCat(
      "--store: ", colon == std::string::npos ? "not a URL" : "no store for '" + store.substr(0, colon) + ":'",
      "; leave it empty for SQLite in --data-dir, or give postgresql://USER@HOST:PORT/DATABASE"));
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> CompressServer::ServerCredentials() const {
  if (config_.tls_cert_file.empty() != config_.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (config_.tls_cert_file.empty()) return grpc::InsecureServerCredentials();
  ASSIGN_OR_RETURN(std::string cert, ReadFile(config_.tls_cert_file, 1 << 20));
  ASSIGN_OR_RETURN(std::string key, ReadFile(config_.tls_key_file, 1 << 20));
  grpc::SslServerCredentialsOptions options;
  options.pem_key_cert_pairs.push_back({key, cert});
  return grpc::SslServerCredentials(options);
}

void CompressServer::Shutdown() {
  if (grpc_server_ && grpc_server_->GetHealthCheckService()) {
    grpc_server_->GetHealthCheckService()->Shutdown();  // NOT_SERVING while draining
  }
  if (scheduler_) scheduler_->Stop();  // ends waiting long polls first
  // In-flight calls get a short drain; clients resume (watch from their
  // sequence, workers by retrying). An idle client connection would hold a
  // longer deadline to its end.
  if (grpc_server_) {
    grpc_server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  }
  http_.Stop();
}

void CompressServer::Wait() {
  if (grpc_server_) grpc_server_->Wait();
}

}  // namespace compress::server
