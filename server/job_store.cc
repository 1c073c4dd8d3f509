#include "server/job_store.h"

#include "absl/strings/str_cat.h"

namespace compress::server {

absl::Status CheckEventsContinue(const std::string& job_id, int64_t last_stored_sequence,
                                 const std::vector<compress::v1::JobEvent>& events) {
  int64_t expected = last_stored_sequence + 1;
  for (const compress::v1::JobEvent& event : events) {
    if (event.job_id() != job_id) {
      return absl::InvalidArgumentError(absl::StrCat("job store: an event of job '", event.job_id(),
                                                     "' committed with job ", job_id));
    }
    if (event.sequence() != expected) {
      return absl::AbortedError(absl::StrCat(
          "job store: event ", event.sequence(), " of ", job_id, " does not continue its log (",
          event.sequence() < expected ? "a duplicate" : "a gap", ": the next is ", expected,
          "); another server writing the same store?"));
    }
    ++expected;
  }
  return absl::OkStatus();
}

}  // namespace compress::server
