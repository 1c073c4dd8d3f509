// Where the deployment files live, and the metrics the dashboards use that no
// process exports yet. Shared by deploy_test and prometheus_test.
#pragma once

#include <string>
#include <vector>

namespace compress::testing {

inline const std::string kDeployDir = DEPLOY_DIR;  // <source>/deploy
inline const std::string kDockerDir = DOCKER_DIR;  // <source>/docker
inline const std::string kSourceDir = SOURCE_DIR;

// Server-side metrics that need server/scheduler.cc to set them. Panels that
// use them (the job dashboard's "State" and "Progress of the job") are
// built already; prometheus_test requires them to return NO data until then,
// and deploy_test fails once the server declares one, so whoever wires a
// metric removes it from here and the panel is checked like every other.
//   compress_job_state{job_id, state}   1 for the job's current state (0 or
//       absent for the others), while the job is not final.
//   compress_job_progress_ratio{job_id} the job's progress across all its
//       tasks, 0..1, from the progress events the scheduler receives.
inline const std::vector<std::string> kMetricsNotYetExported = {
    "compress_job_state",
    "compress_job_progress_ratio",
};

}  // namespace compress::testing
