// Where the deployment files live, and the metrics the dashboards use that no
// process exports yet. Shared by deploy_test and prometheus_test.
#pragma once

#include <string>
#include <vector>

namespace compress::testing {

inline const std::string kDeployDir = DEPLOY_DIR;  // <source>/deploy
inline const std::string kDockerDir = DOCKER_DIR;  // <source>/docker
inline const std::string kSourceDir = SOURCE_DIR;

// Metrics a dashboard uses before any process exports them (none now):
// prometheus_test requires their panels to return no data, and deploy_test
// fails once a process declares one, so it is moved out of here.
inline const std::vector<std::string> kMetricsNotYetExported = {};

}  // namespace compress::testing
