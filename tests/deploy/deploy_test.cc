// The deployment files, checked without a cluster, a Docker engine or
// Grafana: every Kubernetes manifest parses and carries what running the
// service needs (persistent store, probes, resources, Secrets, GPU requests,
// a ServiceMonitor, a NetworkPolicy that admits only workers and clients);
// the dashboards are well-formed Grafana JSON that use only metrics the
// processes declare; the images are multi-stage, non-root and health-checked.
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "tests/deploy/deploy_paths.h"
#include "tests/testing/subprocess.h"

namespace compress {
namespace {

namespace fs = std::filesystem;
using testing::kDeployDir;
using testing::kDockerDir;
using testing::kSourceDir;

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> FilesIn(const std::string& dir, const std::string& extension) {
  std::vector<std::string> files;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() == extension) files.push_back(entry.path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

// ------------------------------------------------------------------ manifests

struct Manifest {
  std::string file;
  YAML::Node node;
};

class ManifestsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const std::string& file : FilesIn(kDeployDir + "/kubernetes", ".yaml")) {
      if (fs::path(file).filename() == "kustomization.yaml") continue;  // not an object
      std::vector<YAML::Node> docs;
      try {
        docs = YAML::LoadAllFromFile(file);
      } catch (const YAML::Exception& e) {
        ADD_FAILURE() << file << ": " << e.what();
        continue;
      }
      for (const YAML::Node& doc : docs) {
        if (doc.IsNull()) continue;
        ASSERT_TRUE(doc.IsMap()) << file;
        ASSERT_TRUE(doc["kind"] && doc["apiVersion"] && doc["metadata"]["name"]) << file;
        std::string key =
            doc["kind"].as<std::string>() + "/" + doc["metadata"]["name"].as<std::string>();
        ASSERT_EQ(by_key_.count(key), 0u) << key << " defined twice";
        by_key_[key] = {fs::path(file).filename().string(), doc};
      }
    }
    ASSERT_FALSE(by_key_.empty());
  }

  YAML::Node Get(const std::string& kind, const std::string& name) {
    auto it = by_key_.find(kind + "/" + name);
    if (it == by_key_.end()) {
      ADD_FAILURE() << "no " << kind << " named " << name << " under deploy/kubernetes";
      return YAML::Node();
    }
    return it->second.node;
  }

  std::vector<YAML::Node> OfKind(const std::string& kind) {
    std::vector<YAML::Node> found;
    for (const auto& [key, manifest] : by_key_) {
      if (manifest.node["kind"].as<std::string>() == kind) found.push_back(manifest.node);
    }
    return found;
  }

  std::map<std::string, Manifest> by_key_;
};

std::map<std::string, std::string> Labels(const YAML::Node& node) {
  std::map<std::string, std::string> labels;
  if (!node) return labels;
  for (const auto& label : node)
    labels[label.first.as<std::string>()] = label.second.as<std::string>();
  return labels;
}

// A label selector (matchLabels only) picks objects carrying all its labels.
bool Selects(const std::map<std::string, std::string>& selector,
             const std::map<std::string, std::string>& labels) {
  for (const auto& [key, value] : selector) {
    auto it = labels.find(key);
    if (it == labels.end() || it->second != value) return false;
  }
  return true;
}

// "--flag=value" or "--flag value" from a container's command line.
std::string FlagValue(const YAML::Node& container, const std::string& flag) {
  std::vector<std::string> argv;
  for (const char* key : {"command", "args"}) {
    if (!container[key]) continue;
    for (const auto& arg : container[key]) argv.push_back(arg.as<std::string>());
  }
  for (size_t i = 0; i < argv.size(); ++i) {
    if (argv[i] == flag && i + 1 < argv.size()) return argv[i + 1];
    if (argv[i].rfind(flag + "=", 0) == 0) return argv[i].substr(flag.size() + 1);
  }
  return "";
}

// The volume mounted at the longest mount path that is a prefix of `path`.
YAML::Node VolumeHolding(const YAML::Node& pod_spec, const YAML::Node& container,
                         const std::string& path) {
  std::string best_name;
  size_t best_length = 0;
  for (const auto& mount : container["volumeMounts"]) {
    std::string mount_path = mount["mountPath"].as<std::string>();
    bool under = path == mount_path || path.rfind(mount_path + "/", 0) == 0;
    if (under && mount_path.size() > best_length) {
      best_length = mount_path.size();
      best_name = mount["name"].as<std::string>();
    }
  }
  for (const auto& volume : pod_spec["volumes"]) {
    if (volume["name"].as<std::string>() == best_name) return volume;
  }
  return YAML::Node();
}

bool MountedAt(const YAML::Node& container, const std::string& volume, const std::string& path) {
  for (const auto& mount : container["volumeMounts"]) {
    if (mount["name"].as<std::string>() == volume && mount["mountPath"].as<std::string>() == path) {
      return true;
    }
  }
  return false;
}

int ContainerPort(const YAML::Node& container, const YAML::Node& port) {
  if (port.IsScalar()) {
    for (const auto& p : container["ports"]) {
      if (p["name"] && p["name"].as<std::string>() == port.as<std::string>()) {
        return p["containerPort"].as<int>();
      }
    }
    try {
      return port.as<int>();
    } catch (const YAML::Exception&) {
    }
  }
  return -1;
}

int ListenPort(const std::string& listen) {
  size_t colon = listen.rfind(':');
  return colon == std::string::npos ? -1 : std::stoi(listen.substr(colon + 1));
}

// Probes on /healthz at the port --metrics-listen opens; requests and limits
// for CPU and memory; non-root; every Secret it mounts exists (as an example).
void ExpectRunnableContainer(const std::string& what, const YAML::Node& pod_spec,
                             const YAML::Node& container, const std::set<std::string>& secrets) {
  SCOPED_TRACE(what);
  const int metrics_port = ListenPort(FlagValue(container, "--metrics-listen"));
  EXPECT_GT(metrics_port, 0) << "--metrics-listen";
  for (const char* probe : {"livenessProbe", "readinessProbe"}) {
    const YAML::Node http = container[probe]["httpGet"];
    ASSERT_TRUE(http) << probe;
    EXPECT_EQ(http["path"].as<std::string>(), "/healthz") << probe;
    EXPECT_EQ(ContainerPort(container, http["port"]), metrics_port) << probe;
  }
  for (const char* bound : {"requests", "limits"}) {
    for (const char* resource : {"cpu", "memory"}) {
      EXPECT_TRUE(container["resources"][bound][resource]) << bound << "." << resource;
    }
  }
  EXPECT_TRUE(pod_spec["securityContext"]["runAsNonRoot"].as<bool>(false));
  EXPECT_FALSE(container["securityContext"]["allowPrivilegeEscalation"].as<bool>(true));
  for (const auto& volume : pod_spec["volumes"]) {
    if (volume["secret"]) {
      std::string name = volume["secret"]["secretName"].as<std::string>();
      EXPECT_EQ(secrets.count(name), 1u) << "Secret " << name << " is not in secrets.example.yaml";
    }
  }
}

std::set<std::string> SecretNames(const std::vector<YAML::Node>& secrets) {
  std::set<std::string> names;
  for (const YAML::Node& s : secrets) names.insert(s["metadata"]["name"].as<std::string>());
  return names;
}

TEST_F(ManifestsTest, EveryManifestParsesAndLivesInTheNamespace) {
  for (const auto& [key, manifest] : by_key_) {
    SCOPED_TRACE(manifest.file + ": " + key);
    if (manifest.node["kind"].as<std::string>() == "Namespace") continue;
    ASSERT_TRUE(manifest.node["metadata"]["namespace"]);
    EXPECT_EQ(manifest.node["metadata"]["namespace"].as<std::string>(), "compress");
  }
}

TEST_F(ManifestsTest, TheKustomizationListsEveryManifestButTheExampleSecrets) {
  YAML::Node kustomization = YAML::LoadFile(kDeployDir + "/kubernetes/kustomization.yaml");
  std::set<std::string> listed;
  for (const auto& resource : kustomization["resources"]) listed.insert(resource.as<std::string>());
  std::set<std::string> expected;
  for (const std::string& file : FilesIn(kDeployDir + "/kubernetes", ".yaml")) {
    std::string name = fs::path(file).filename().string();
    if (name != "kustomization.yaml" && name != "secrets.example.yaml") expected.insert(name);
  }
  EXPECT_EQ(listed, expected);
}

TEST_F(ManifestsTest, TheServerIsAStatefulSetWithAPersistentStore) {
  const YAML::Node set = Get("StatefulSet", "compress-server");
  ASSERT_TRUE(set);
  EXPECT_EQ(set["spec"]["replicas"].as<int>(), 1) << "one writer: the job store is SQLite";
  const YAML::Node pod = set["spec"]["template"]["spec"];
  ASSERT_EQ(pod["containers"].size(), 1u);
  const YAML::Node server = pod["containers"][0];
  EXPECT_EQ(server["command"][0].as<std::string>(), "compress-server");

  // The store and the artifacts on a claim from the StatefulSet's template.
  const std::string data_dir = FlagValue(server, "--data-dir");
  ASSERT_FALSE(data_dir.empty());
  bool claimed = false;
  for (const auto& claim : set["spec"]["volumeClaimTemplates"]) {
    const std::string name = claim["metadata"]["name"].as<std::string>();
    if (!MountedAt(server, name, data_dir)) continue;
    claimed = true;
    EXPECT_TRUE(claim["spec"]["resources"]["requests"]["storage"]);
    EXPECT_EQ(claim["spec"]["accessModes"][0].as<std::string>(), "ReadWriteOnce");
  }
  EXPECT_TRUE(claimed) << "--data-dir " << data_dir << " is not on a volumeClaimTemplate";

  // Models from the shared claim, read-only.
  const YAML::Node models = VolumeHolding(pod, server, FlagValue(server, "--model-root"));
  ASSERT_TRUE(models) << "--model-root is not on a volume";
  EXPECT_EQ(models["persistentVolumeClaim"]["claimName"].as<std::string>(), "compress-models");
  const YAML::Node models_claim = Get("PersistentVolumeClaim", "compress-models");
  ASSERT_TRUE(models_claim);
  EXPECT_EQ(models_claim["spec"]["accessModes"][0].as<std::string>(), "ReadWriteMany")
      << "server and workers on many nodes mount it";

  // Tokens and TLS material from Secrets.
  for (const char* flag : {"--auth-tokens", "--tls-cert", "--tls-key"}) {
    const std::string path = FlagValue(server, flag);
    ASSERT_FALSE(path.empty()) << flag;
    EXPECT_TRUE(VolumeHolding(pod, server, path)["secret"]) << flag << " " << path;
  }
  ExpectRunnableContainer("server", pod, server, SecretNames(OfKind("Secret")));

  // The governing Service exists and is headless.
  const YAML::Node headless = Get("Service", set["spec"]["serviceName"].as<std::string>());
  ASSERT_TRUE(headless);
  EXPECT_EQ(headless["spec"]["clusterIP"].as<std::string>(), "None");
}

TEST_F(ManifestsTest, TheServerServiceReachesItsPorts) {
  const YAML::Node set = Get("StatefulSet", "compress-server");
  const YAML::Node service = Get("Service", "compress-server");
  ASSERT_TRUE(set && service);
  const YAML::Node server = set["spec"]["template"]["spec"]["containers"][0];
  EXPECT_TRUE(Selects(Labels(service["spec"]["selector"]),
                      Labels(set["spec"]["template"]["metadata"]["labels"])));
  std::map<std::string, int> ports;
  for (const auto& port : service["spec"]["ports"]) {
    ports[port["name"].as<std::string>()] = port["port"].as<int>();
    EXPECT_EQ(ContainerPort(server, port["targetPort"]), port["port"].as<int>())
        << port["name"].as<std::string>();
  }
  EXPECT_EQ(ports["grpc"], ListenPort(FlagValue(server, "--listen")));
  EXPECT_EQ(ports["metrics"], ListenPort(FlagValue(server, "--metrics-listen")));
}

TEST_F(ManifestsTest, WorkersAreDeploymentsOnGpusAndOnCpus) {
  const YAML::Node service = Get("Service", "compress-server");
  ASSERT_TRUE(service);
  const std::set<std::string> secrets = SecretNames(OfKind("Secret"));
  for (const char* name : {"compress-worker-gpu", "compress-worker-cpu"}) {
    SCOPED_TRACE(name);
    const YAML::Node deployment = Get("Deployment", name);
    ASSERT_TRUE(deployment);
    const YAML::Node pod = deployment["spec"]["template"]["spec"];
    EXPECT_TRUE(Selects(Labels(deployment["spec"]["selector"]["matchLabels"]),
                        Labels(deployment["spec"]["template"]["metadata"]["labels"])));
    const YAML::Node worker = pod["containers"][0];
    EXPECT_EQ(worker["command"][0].as<std::string>(), "compress-worker");
    const bool gpu = std::string(name) == "compress-worker-gpu";
    const std::string device = FlagValue(worker, "--device");
    if (gpu) {
      EXPECT_EQ(device.rfind("cuda", 0), 0u) << device;
      EXPECT_GE(worker["resources"]["limits"]["nvidia.com/gpu"].as<int>(0), 1);
    } else {
      EXPECT_EQ(device, "cpu");
      EXPECT_FALSE(worker["resources"]["limits"]["nvidia.com/gpu"]);
    }
    // Dials the server's Service, with a worker token and the CA from Secrets.
    const std::string server = FlagValue(worker, "--server");
    EXPECT_EQ(server.rfind("compress-server.", 0), 0u) << server;
    EXPECT_EQ(ListenPort(server), 50051);
    for (const char* flag : {"--token-file", "--tls-ca"}) {
      const std::string path = FlagValue(worker, flag);
      ASSERT_FALSE(path.empty()) << flag;
      EXPECT_TRUE(VolumeHolding(pod, worker, path)["secret"]) << flag << " " << path;
    }
    const YAML::Node models = VolumeHolding(pod, worker, "/models");
    EXPECT_EQ(models["persistentVolumeClaim"]["claimName"].as<std::string>(""), "compress-models");
    EXPECT_TRUE(VolumeHolding(pod, worker, FlagValue(worker, "--work-dir"))["emptyDir"]);
    ExpectRunnableContainer(name, pod, worker, secrets);
  }
}

TEST_F(ManifestsTest, AServiceMonitorScrapesTheServerAndEveryWorker) {
  const std::vector<YAML::Node> monitors = OfKind("ServiceMonitor");
  ASSERT_EQ(monitors.size(), 1u);
  const YAML::Node monitor = monitors[0];
  EXPECT_EQ(monitor["apiVersion"].as<std::string>(), "monitoring.coreos.com/v1");
  const auto selector = Labels(monitor["spec"]["selector"]["matchLabels"]);
  ASSERT_EQ(monitor["spec"]["endpoints"].size(), 1u);
  const YAML::Node endpoint = monitor["spec"]["endpoints"][0];
  EXPECT_EQ(endpoint["path"].as<std::string>(), "/metrics");
  const std::string port = endpoint["port"].as<std::string>();

  // The Services it selects: the server's and the workers' (not the headless
  // governing one, which would scrape the server twice).
  std::set<std::string> selected;
  for (const YAML::Node& service : OfKind("Service")) {
    if (!Selects(selector, Labels(service["metadata"]["labels"]))) continue;
    const std::string name = service["metadata"]["name"].as<std::string>();
    selected.insert(name);
    bool has_port = false;
    for (const auto& p : service["spec"]["ports"]) has_port |= p["name"].as<std::string>() == port;
    EXPECT_TRUE(has_port) << name << " has no port " << port;
  }
  EXPECT_EQ(selected, (std::set<std::string>{"compress-server", "compress-worker"}));
  // The workers' Service selects both worker Deployments' pods.
  const auto worker_selector = Labels(Get("Service", "compress-worker")["spec"]["selector"]);
  for (const char* name : {"compress-worker-gpu", "compress-worker-cpu"}) {
    EXPECT_TRUE(Selects(worker_selector,
                        Labels(Get("Deployment", name)["spec"]["template"]["metadata"]["labels"])))
        << name;
  }
}

TEST_F(ManifestsTest, OnlyWorkersAndClientsReachTheServer) {
  const YAML::Node policy = Get("NetworkPolicy", "compress-server");
  ASSERT_TRUE(policy);
  const auto server_labels =
      Labels(Get("StatefulSet", "compress-server")["spec"]["template"]["metadata"]["labels"]);
  EXPECT_TRUE(Selects(Labels(policy["spec"]["podSelector"]["matchLabels"]), server_labels));
  bool ingress = false;
  for (const auto& type : policy["spec"]["policyTypes"])
    ingress |= type.as<std::string>() == "Ingress";
  EXPECT_TRUE(ingress);

  std::vector<std::map<std::string, std::string>> grpc_peers;  // pod selectors allowed on grpc
  for (const auto& rule : policy["spec"]["ingress"]) {
    // A rule without `from` or without `ports` would admit everyone.
    ASSERT_TRUE(rule["from"] && rule["from"].size() > 0);
    ASSERT_TRUE(rule["ports"] && rule["ports"].size() > 0);
    bool grpc = false;
    for (const auto& port : rule["ports"]) grpc |= port["port"].as<std::string>() == "grpc";
    for (const auto& peer : rule["from"]) {
      EXPECT_FALSE(peer["ipBlock"]) << "no address ranges";
      if (!grpc) continue;
      ASSERT_TRUE(peer["podSelector"]) << "every peer on the gRPC port is a pod selector";
      auto labels = Labels(peer["podSelector"]["matchLabels"]);
      EXPECT_FALSE(labels.empty());
      grpc_peers.push_back(labels);
    }
  }
  auto admitted = [&](const std::map<std::string, std::string>& pod_labels) {
    for (const auto& peer : grpc_peers) {
      if (Selects(peer, pod_labels)) return true;
    }
    return false;
  };
  for (const char* name : {"compress-worker-gpu", "compress-worker-cpu"}) {
    EXPECT_TRUE(admitted(Labels(Get("Deployment", name)["spec"]["template"]["metadata"]["labels"])))
        << name;
  }
  EXPECT_TRUE(admitted({{"compress-client", "true"}})) << "a client pod";
  EXPECT_FALSE(admitted({{"app.kubernetes.io/name", "something-else"}})) << "any other pod";
  EXPECT_EQ(grpc_peers.size(), 2u) << "workers and clients, nobody else";
}

TEST_F(ManifestsTest, ThePrometheusRuleIsTheRulesFile) {
  const YAML::Node rule = Get("PrometheusRule", "compress");
  ASSERT_TRUE(rule);
  YAML::Node file = YAML::LoadFile(kDeployDir + "/prometheus/rules/compress-alerts.yml");
  // Compared as JSON-like trees: formatting and comments may differ.
  std::function<nlohmann::json(const YAML::Node&)> to_json =
      [&](const YAML::Node& n) -> nlohmann::json {
    if (n.IsMap()) {
      nlohmann::json j = nlohmann::json::object();
      for (const auto& kv : n) j[kv.first.as<std::string>()] = to_json(kv.second);
      return j;
    }
    if (n.IsSequence()) {
      nlohmann::json j = nlohmann::json::array();
      for (const auto& item : n) j.push_back(to_json(item));
      return j;
    }
    return n.IsNull() ? nlohmann::json() : nlohmann::json(n.as<std::string>());
  };
  EXPECT_EQ(to_json(rule["spec"]), to_json(file))
      << "regenerate deploy/kubernetes/prometheusrule.yaml from the rules file";
}

// ------------------------------------------------------------------ dashboards

std::vector<nlohmann::json> Dashboards() {
  std::vector<nlohmann::json> dashboards;
  for (const std::string& file : FilesIn(kDeployDir + "/grafana/dashboards", ".json")) {
    dashboards.push_back(nlohmann::json::parse(ReadText(file)));
  }
  return dashboards;
}

// Every metric name the processes declare (`.Name("compress_...")`).
std::set<std::string> DeclaredMetrics() {
  std::set<std::string> names;
  const std::regex name_call(R"re(\.Name\("([a-zA-Z_:][a-zA-Z0-9_:]*)"\))re");
  for (const char* file : {"/server/server_metrics.cc", "/worker/worker_metrics.cc"}) {
    const std::string text = ReadText(kSourceDir + file);
    for (std::sregex_iterator it(text.begin(), text.end(), name_call), end; it != end; ++it) {
      names.insert((*it)[1]);
    }
  }
  return names;
}

std::set<std::string> MetricsUsedIn(const std::string& expr) {
  std::set<std::string> names;
  const std::regex metric(R"(\bcompress_[a-z0-9_]+)");
  for (std::sregex_iterator it(expr.begin(), expr.end(), metric), end; it != end; ++it) {
    names.insert((*it)[0]);
  }
  return names;
}

TEST(DashboardsTest, AreWellFormedGrafanaDashboards) {
  const std::vector<nlohmann::json> dashboards = Dashboards();
  ASSERT_EQ(dashboards.size(), 3u) << "overview, workers, one job";
  std::set<std::string> uids;
  for (const nlohmann::json& dashboard : dashboards) {
    const std::string uid = dashboard.at("uid");
    SCOPED_TRACE(uid);
    EXPECT_TRUE(uids.insert(uid).second) << "uid used twice";
    EXPECT_FALSE(dashboard.at("title").get<std::string>().empty());
    EXPECT_GE(dashboard.at("schemaVersion").get<int>(), 36);
    bool datasource_variable = false;
    for (const auto& variable : dashboard.at("templating").at("list")) {
      if (variable.at("type") == "datasource" && variable.at("name") == "datasource") {
        datasource_variable = variable.at("query") == "prometheus";
      }
    }
    EXPECT_TRUE(datasource_variable) << "panels pick Prometheus through ${datasource}";
    std::set<int> ids;
    int panels = 0;
    for (const auto& panel : dashboard.at("panels")) {
      EXPECT_TRUE(ids.insert(panel.at("id").get<int>()).second) << "panel id used twice";
      for (const char* key : {"h", "w", "x", "y"}) EXPECT_TRUE(panel.at("gridPos").contains(key));
      if (panel.at("type") == "row") continue;
      ++panels;
      const std::string title = panel.at("title");
      EXPECT_EQ(panel.at("datasource").at("uid"), "${datasource}") << title;
      ASSERT_FALSE(panel.at("targets").empty()) << title;
      std::set<std::string> ref_ids;
      for (const auto& target : panel.at("targets")) {
        EXPECT_TRUE(ref_ids.insert(target.at("refId").get<std::string>()).second) << title;
        EXPECT_FALSE(target.at("expr").get<std::string>().empty()) << title;
      }
    }
    EXPECT_GE(panels, 4);
  }
  EXPECT_EQ(uids, (std::set<std::string>{"compress-overview", "compress-workers", "compress-job"}));
}

TEST(DashboardsTest, TheJobDashboardIsChosenByAJobIdVariable) {
  for (const nlohmann::json& dashboard : Dashboards()) {
    if (dashboard.at("uid") != "compress-job") continue;
    bool variable = false;
    for (const auto& v : dashboard.at("templating").at("list"))
      variable |= v.at("name") == "job_id";
    EXPECT_TRUE(variable);
    for (const auto& panel : dashboard.at("panels")) {
      for (const auto& target : panel.value("targets", nlohmann::json::array())) {
        EXPECT_NE(target.at("expr").get<std::string>().find("job_id=\"$job_id\""),
                  std::string::npos)
            << panel.at("title");
      }
    }
    return;
  }
  FAIL() << "no compress-job dashboard";
}

// Dashboards and alerts name only metrics that a process declares, apart from
// the few listed in deploy_paths.h that wait for the scheduler.
TEST(DashboardsTest, UseOnlyMetricsTheProcessesDeclare) {
  const std::set<std::string> declared = DeclaredMetrics();
  ASSERT_GT(declared.size(), 15u);
  const std::set<std::string> pending(testing::kMetricsNotYetExported.begin(),
                                      testing::kMetricsNotYetExported.end());
  for (const std::string& name : pending) {
    EXPECT_EQ(declared.count(name), 0u)
        << name
        << " is declared now: remove it from kMetricsNotYetExported (tests/deploy/deploy_paths.h)";
  }
  auto check = [&](const std::string& where, const std::string& expr) {
    for (std::string name : MetricsUsedIn(expr)) {
      if (declared.count(name) || pending.count(name)) continue;
      for (const char* suffix : {"_bucket", "_sum", "_count"}) {
        const std::string s = suffix;
        if (name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0 &&
            declared.count(name.substr(0, name.size() - s.size()))) {
          name.clear();
          break;
        }
      }
      EXPECT_TRUE(name.empty()) << where << " uses " << name << ", which no process declares";
    }
  };
  std::set<std::string> used_pending;
  for (const nlohmann::json& dashboard : Dashboards()) {
    for (const auto& panel : dashboard.at("panels")) {
      for (const auto& target : panel.value("targets", nlohmann::json::array())) {
        const std::string expr = target.at("expr");
        check(dashboard.at("uid").get<std::string>() + " / " + panel.at("title").get<std::string>(),
              expr);
        for (const std::string& name : MetricsUsedIn(expr)) {
          if (pending.count(name)) used_pending.insert(name);
        }
      }
    }
    for (const auto& variable : dashboard.at("templating").at("list")) {
      if (variable.at("type") == "query") {
        check("variable " + variable.at("name").get<std::string>(),
              variable.at("query").at("query"));
      }
    }
  }
  EXPECT_EQ(used_pending, pending) << "a pending metric no panel uses: drop it from the list";
  for (const auto& group :
       YAML::LoadFile(kDeployDir + "/prometheus/rules/compress-alerts.yml")["groups"]) {
    for (const auto& rule : group["rules"]) {
      check("alert " + rule["alert"].as<std::string>(), rule["expr"].as<std::string>());
      for (const std::string& name : MetricsUsedIn(rule["expr"].as<std::string>())) {
        EXPECT_EQ(pending.count(name), 0u) << "alerts use only exported metrics";
      }
    }
  }
}

TEST(DashboardsTest, GrafanaProvisioningLoadsThem) {
  const YAML::Node providers =
      YAML::LoadFile(kDeployDir + "/grafana/provisioning/dashboards/compress.yaml");
  const std::string path = providers["providers"][0]["options"]["path"].as<std::string>();
  const YAML::Node datasources =
      YAML::LoadFile(kDeployDir + "/grafana/provisioning/datasources/prometheus.yaml");
  EXPECT_EQ(datasources["datasources"][0]["type"].as<std::string>(), "prometheus");
  // docker/compose.yaml mounts the dashboards where the provider looks, and
  // the provisioning folder where Grafana reads it.
  const YAML::Node compose = YAML::LoadFile(kDockerDir + "/compose.yaml");
  std::set<std::string> mounts;
  for (const auto& volume : compose["services"]["grafana"]["volumes"])
    mounts.insert(volume.as<std::string>());
  EXPECT_EQ(mounts.count("../deploy/grafana/dashboards:" + path + ":ro"), 1u) << path;
  EXPECT_EQ(mounts.count("../deploy/grafana/provisioning:/etc/grafana/provisioning:ro"), 1u);
  for (const char* service : {"server", "worker-1", "worker-2", "prometheus", "grafana"}) {
    EXPECT_TRUE(compose["services"][service]) << service;
  }
}

// ------------------------------------------------------------------ images

TEST(ImagesTest, AreMultiStageNonRootAndHealthChecked) {
  int images = 0;
  for (const auto& entry : fs::directory_iterator(kDockerDir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("Dockerfile.", 0) != 0 || entry.path().extension() == ".dockerignore") continue;
    ++images;
    SCOPED_TRACE(name);
    std::istringstream in(ReadText(entry.path().string()));
    int stages = 0;
    std::string user, line;
    bool healthcheck = false;
    while (std::getline(in, line)) {
      if (line.rfind("FROM ", 0) == 0) {
        ++stages;
        user.clear();  // USER applies to its own stage
        healthcheck = false;
      }
      if (line.rfind("USER ", 0) == 0) user = line.substr(5);
      if (line.rfind("HEALTHCHECK ", 0) == 0) healthcheck = true;
    }
    EXPECT_GE(stages, 2) << "build stage and runtime stage";
    EXPECT_FALSE(user.empty()) << "the runtime stage sets USER";
    EXPECT_NE(user.rfind("root", 0), 0u);
    EXPECT_NE(user.rfind("0", 0), 0u);
    EXPECT_TRUE(healthcheck) << "the runtime stage has a HEALTHCHECK";
    EXPECT_TRUE(fs::exists(entry.path().string() + ".dockerignore"))
        << "keeps build/ out of the context";
  }
  EXPECT_EQ(images, 3) << "server, CPU worker, CUDA worker";
}

// ------------------------------------------------------------------ command lines

// A Dockerfile's last ENTRYPOINT and CMD (exec form), continuation lines joined.
struct ImageCommand {
  std::vector<std::string> entrypoint;
  std::vector<std::string> cmd;
};

ImageCommand ImageCommandOf(const std::string& dockerfile) {
  std::string joined = std::regex_replace(ReadText(dockerfile), std::regex("\\\\\n\\s*"), " ");
  ImageCommand command;
  std::istringstream in(joined);
  std::string line;
  while (std::getline(in, line)) {
    for (const auto& [instruction, target] :
         {std::pair{"ENTRYPOINT ", &command.entrypoint}, std::pair{"CMD ", &command.cmd}}) {
      if (line.rfind(instruction, 0) != 0) continue;
      *target = nlohmann::json::parse(line.substr(std::strlen(instruction)))
                    .get<std::vector<std::string>>();
    }
  }
  return command;
}

// The Dockerfile an image name is built from (compress-worker-cpu:dev ->
// docker/Dockerfile.worker-cpu; the GPU manifests run the CUDA image).
std::string DockerfileOfImage(std::string image) {
  image = image.substr(0, image.find(':'));
  image = image.substr(image.rfind('/') + 1);
  image = image.substr(std::strlen("compress-"));
  return kDockerDir + "/Dockerfile." + image;
}

// Runs `argv` (its program named as in the images) with --help last: the
// binaries parse every flag before it, so an unknown flag or a bad number
// fails, and --help stops before anything starts.
void ExpectFlagsAccepted(std::vector<std::string> argv, const std::string& where) {
  ASSERT_FALSE(argv.empty()) << where;
  const std::map<std::string, std::string> binaries = {{"compress-server", COMPRESS_SERVER_BIN},
                                                       {"compress-worker", COMPRESS_WORKER_BIN}};
  auto binary = binaries.find(argv[0]);
  ASSERT_NE(binary, binaries.end()) << where << ": runs " << argv[0];
  argv[0] = binary->second;
  for (std::string& arg : argv) {
    arg =
        std::regex_replace(arg, std::regex("\\$\\([A-Z_]+\\)"), "1");  // Kubernetes env references
  }
  argv.push_back("--help");
  std::string output;
  EXPECT_EQ(testing::RunCommand(argv, &output), 0) << where << ":\n" << output;
}

TEST(CommandLinesTest, EveryFlagTheImagesManifestsAndComposeFilePassIsAccepted) {
  int checked = 0;
  for (const auto& entry : fs::directory_iterator(kDockerDir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("Dockerfile.", 0) != 0 || entry.path().extension() == ".dockerignore") continue;
    ImageCommand image = ImageCommandOf(entry.path().string());
    std::vector<std::string> argv = image.entrypoint;
    argv.insert(argv.end(), image.cmd.begin(), image.cmd.end());
    ExpectFlagsAccepted(argv, name);
    ++checked;
  }
  for (const std::string& file : FilesIn(kDeployDir + "/kubernetes", ".yaml")) {
    for (const YAML::Node& doc : YAML::LoadAllFromFile(file)) {
      if (!doc.IsMap() || !doc["spec"] || !doc["spec"]["template"]) continue;
      for (const YAML::Node& container : doc["spec"]["template"]["spec"]["containers"]) {
        const std::string image = container["image"].as<std::string>();
        if (image.rfind("compress-", 0) != 0) continue;
        // Kubernetes: command replaces ENTRYPOINT, args replace CMD.
        const ImageCommand built = ImageCommandOf(DockerfileOfImage(image));
        std::vector<std::string> argv = container["command"]
                                            ? container["command"].as<std::vector<std::string>>()
                                            : built.entrypoint;
        const std::vector<std::string> args =
            container["args"] ? container["args"].as<std::vector<std::string>>()
                              : (container["command"] ? std::vector<std::string>{} : built.cmd);
        argv.insert(argv.end(), args.begin(), args.end());
        ExpectFlagsAccepted(
            argv, fs::path(file).filename().string() + " " + container["name"].as<std::string>());
        ++checked;
      }
    }
  }
  const YAML::Node compose = YAML::LoadFile(kDockerDir + "/compose.yaml");
  for (const auto& service : compose["services"]) {
    // yaml-cpp keeps a merge key (<<: *worker) as a plain key: look there too.
    const YAML::Node merged = service.second["<<"];
    const YAML::Node build = service.second["build"] ? service.second["build"]
                             : merged                ? merged["build"]
                                                     : YAML::Node();
    if (!build || !build.IsMap()) continue;
    // Compose: command replaces CMD after the image's ENTRYPOINT; the
    // Dockerfile is relative to the context, the repository root.
    const ImageCommand built =
        ImageCommandOf(kSourceDir + "/" + build["dockerfile"].as<std::string>());
    std::vector<std::string> argv = built.entrypoint;
    const std::vector<std::string> command =
        service.second["command"] ? service.second["command"].as<std::vector<std::string>>()
                                  : built.cmd;
    argv.insert(argv.end(), command.begin(), command.end());
    ExpectFlagsAccepted(argv, "compose.yaml " + service.first.as<std::string>());
    ++checked;
  }
  EXPECT_GE(checked, 3 + 3 + 3) << "3 images, 3 workloads, 3 services";
}

}  // namespace
}  // namespace compress
