// One suite for every JobStore: SQLite (a file in a scratch folder) and
// PostgreSQL (a fresh schema of $COMPRESS_TEST_POSTGRES_URL, or of a
// throwaway cluster the test starts: tests/testing/postgres.h). Then what
// only PostgreSQL has: reconnecting, its errors, one server per schema.
#include "server/job_store.h"

#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/server.h"
#include "tests/testing/postgres.h"
#include "tests/testing/subprocess.h"
#include "tests/testing/temp_dir.h"

namespace compress::server {
namespace {

using compress::v1::Job;
using compress::v1::JobEvent;
using google::protobuf::util::MessageDifferencer;

// A job as the scheduler keeps it: each event continues last_sequence.
struct Draft {
  explicit Draft(const std::string& id, int64_t create_seconds = 1700000000) {
    job.set_id(id);
    job.set_tenant("tenant-a");
    job.set_request_id("request-" + id);
    job.set_state(compress::v1::QUEUED);
    job.mutable_create_time()->set_seconds(create_seconds);
    job.mutable_spec()->mutable_model()->set_path("models/llama");
    compress::v1::JobTask* task = job.add_tasks();
    task->set_index(0);
    task->set_kind(compress::v1::TASK_WHOLE);
    task->set_state(compress::v1::TASK_PENDING);
  }

  // `count` log events after the last one.
  std::vector<JobEvent> Events(int count) {
    std::vector<JobEvent> events;
    for (int i = 0; i < count; ++i) {
      JobEvent event;
      event.set_job_id(job.id());
      event.set_sequence(job.last_sequence() + 1);
      event.mutable_time()->set_seconds(1700000000 + event.sequence());
      event.mutable_log()->set_level("INFO");
      event.mutable_log()->set_text(absl::StrCat("line ", event.sequence(), " of ", job.id()));
      job.set_last_sequence(event.sequence());
      events.push_back(std::move(event));
    }
    return events;
  }

  StoredJob stored() const { return StoredJob{job}; }
  Job job;
};

std::vector<int64_t> Sequences(const std::vector<JobEvent>& events) {
  std::vector<int64_t> sequences;
  for (const JobEvent& e : events) sequences.push_back(e.sequence());
  return sequences;
}

std::vector<int64_t> Range(int64_t first, int64_t last) {
  std::vector<int64_t> range;
  for (int64_t s = first; s <= last; ++s) range.push_back(s);
  return range;
}

class JobStoreTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "postgres") {
      if (std::string why = testing::PostgresSkipReason(); !why.empty()) GTEST_SKIP() << why;
      absl::StatusOr<std::unique_ptr<testing::PostgresSchema>> schema =
          testing::PostgresSchema::Create();
      ASSERT_TRUE(schema.ok()) << schema.status();
      schema_ = std::move(*schema);
    }
    store_ = Open();
    ASSERT_NE(store_, nullptr);
  }

  std::unique_ptr<JobStore> Open() {
    absl::StatusOr<std::unique_ptr<JobStore>> store = GetParam() == "sqlite"
                                                          ? OpenSqliteJobStore(dir_.Sub("jobs.db"))
                                                          : OpenPostgresJobStore(schema_->url());
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? std::move(*store) : nullptr;
  }

  std::vector<Job> Load() {
    absl::StatusOr<std::vector<StoredJob>> stored = store_->LoadJobs();
    EXPECT_TRUE(stored.ok()) << stored.status();
    std::vector<Job> jobs;
    if (stored.ok()) {
      for (StoredJob& s : *stored) jobs.push_back(std::move(s.job));
    }
    return jobs;
  }

  std::vector<JobEvent> Read(const std::string& id, int64_t from = 1, int limit = 1 << 20) {
    absl::StatusOr<std::vector<JobEvent>> events = store_->ReadEvents(id, from, limit);
    EXPECT_TRUE(events.ok()) << events.status();
    return events.ok() ? *events : std::vector<JobEvent>{};
  }

  testing::TempDir dir_{"store"};
  std::unique_ptr<testing::PostgresSchema> schema_;
  std::unique_ptr<JobStore> store_;  // after schema_: closed before the schema is dropped
};

TEST_P(JobStoreTest, ACommittedJobAndItsEventsReadBackAsWritten) {
  Draft draft("job-a");
  draft.job.set_message(std::string("bytes\0with a NUL and \xc3\xa9", 25));
  (*draft.job.mutable_spec()->mutable_labels())["team"] = "nlp";
  std::vector<JobEvent> events = draft.Events(3);
  ASSERT_TRUE(store_->Commit(draft.stored(), events).ok());

  std::vector<Job> jobs = Load();
  ASSERT_EQ(jobs.size(), 1u);
  EXPECT_TRUE(MessageDifferencer::Equals(jobs[0], draft.job)) << jobs[0].DebugString();
  std::vector<JobEvent> read = Read("job-a");
  ASSERT_EQ(read.size(), 3u);
  for (size_t i = 0; i < read.size(); ++i) {
    EXPECT_TRUE(MessageDifferencer::Equals(read[i], events[i])) << read[i].DebugString();
  }
}

TEST_P(JobStoreTest, ACommitReplacesTheJobsRow) {
  Draft draft("job-a");
  ASSERT_TRUE(store_->Commit(draft.stored(), draft.Events(1)).ok());
  draft.job.set_state(compress::v1::RUNNING);
  draft.job.mutable_tasks(0)->set_state(compress::v1::TASK_RUNNING);
  draft.job.mutable_tasks(0)->set_lease_id("lease-1");
  ASSERT_TRUE(store_->Commit(draft.stored(), draft.Events(1)).ok());
  // A commit with no events changes the job alone.
  draft.job.set_progress(0.5);
  ASSERT_TRUE(store_->Commit(draft.stored(), {}).ok());

  std::vector<Job> jobs = Load();
  ASSERT_EQ(jobs.size(), 1u);
  EXPECT_TRUE(MessageDifferencer::Equals(jobs[0], draft.job)) << jobs[0].DebugString();
  EXPECT_EQ(Sequences(Read("job-a")), Range(1, 2));
}

TEST_P(JobStoreTest, JobsLoadOldestFirstThenById) {
  Draft late("job-a", 300), early("job-c", 100), tie("job-b", 100);
  for (Draft* d : {&late, &early, &tie})
    ASSERT_TRUE(store_->Commit(d->stored(), d->Events(1)).ok());
  std::vector<Job> jobs = Load();
  ASSERT_EQ(jobs.size(), 3u);
  EXPECT_EQ(jobs[0].id(), "job-b");
  EXPECT_EQ(jobs[1].id(), "job-c");
  EXPECT_EQ(jobs[2].id(), "job-a");
}

TEST_P(JobStoreTest, EventsContinueTheSequenceAcrossCommits) {
  Draft draft("job-a");
  ASSERT_TRUE(store_->Commit(draft.stored(), draft.Events(3)).ok());
  ASSERT_TRUE(store_->Commit(draft.stored(), draft.Events(1)).ok());
  ASSERT_TRUE(store_->Commit(draft.stored(), draft.Events(5)).ok());
  EXPECT_EQ(Sequences(Read("job-a")), Range(1, 9));
}

TEST_P(JobStoreTest, AGapIsRefusedAndNothingOfTheCommitIsWritten) {
  Draft draft("job-a");
  ASSERT_TRUE(store_->Commit(draft.stored(), draft.Events(2)).ok());
  Draft stored = draft;
  draft.Events(1);  // event 3 never committed
  draft.job.set_state(compress::v1::RUNNING);
  absl::Status status = store_->Commit(draft.stored(), draft.Events(1));
  EXPECT_EQ(status.code(), absl::StatusCode::kAborted) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "job-a")) << status;

  std::vector<Job> jobs = Load();
  ASSERT_EQ(jobs.size(), 1u);
  EXPECT_TRUE(MessageDifferencer::Equals(jobs[0], stored.job)) << "the job's row was written";
  EXPECT_EQ(Sequences(Read("job-a")), Range(1, 2));
  // The log goes on from where it is.
  EXPECT_TRUE(store_->Commit(stored.stored(), stored.Events(1)).ok());
  EXPECT_EQ(Sequences(Read("job-a")), Range(1, 3));
}

TEST_P(JobStoreTest, ADuplicateIsRefusedAndNothingOfTheCommitIsWritten) {
  Draft draft("job-a");
  std::vector<JobEvent> committed = draft.Events(2);
  ASSERT_TRUE(store_->Commit(draft.stored(), committed).ok());
  Draft stale = draft;
  stale.job.set_last_sequence(1);  // a writer that missed event 2
  stale.job.set_state(compress::v1::CANCELLED);
  std::vector<JobEvent> events = stale.Events(2);  // 2 and 3
  events[0].mutable_log()->set_text("the other event 2");
  absl::Status status = store_->Commit(stale.stored(), events);
  EXPECT_EQ(status.code(), absl::StatusCode::kAborted) << status;

  std::vector<Job> jobs = Load();
  ASSERT_EQ(jobs.size(), 1u);
  EXPECT_EQ(jobs[0].state(), compress::v1::QUEUED);
  std::vector<JobEvent> read = Read("job-a");
  EXPECT_EQ(Sequences(read), Range(1, 2));
  ASSERT_EQ(read.size(), 2u);
  EXPECT_TRUE(MessageDifferencer::Equals(read[1], committed[1])) << read[1].DebugString();
}

TEST_P(JobStoreTest, ABatchWithAHoleInsideIsRefusedAndTheNewJobIsNotCreated) {
  Draft draft("job-a");
  std::vector<JobEvent> events = draft.Events(4);
  events.erase(events.begin() + 2);  // 1, 2, 4
  absl::Status status = store_->Commit(draft.stored(), events);
  EXPECT_EQ(status.code(), absl::StatusCode::kAborted) << status;
  EXPECT_TRUE(Load().empty());
  EXPECT_TRUE(Read("job-a").empty());
  // A new job's log starts at 1.
  Draft late("job-b");
  std::vector<JobEvent> from_two = late.Events(2);
  from_two.erase(from_two.begin());
  EXPECT_EQ(store_->Commit(late.stored(), from_two).code(), absl::StatusCode::kAborted);
}

TEST_P(JobStoreTest, AnEventOfAnotherJobIsRefused) {
  Draft a("job-a"), b("job-b");
  absl::Status status = store_->Commit(a.stored(), b.Events(1));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_TRUE(Load().empty());
}

TEST_P(JobStoreTest, ReadEventsPagesInOrder) {
  Draft draft("job-a"), other("job-b");
  for (int commit = 0; commit < 25; ++commit) {
    ASSERT_TRUE(store_->Commit(draft.stored(), draft.Events(10)).ok());
    ASSERT_TRUE(store_->Commit(other.stored(), other.Events(1)).ok());
  }
  std::vector<int64_t> seen;
  int pages = 0;
  for (int64_t from = 1;; ++pages) {
    std::vector<JobEvent> page = Read("job-a", from, 100);
    if (page.empty()) break;
    EXPECT_LE(page.size(), 100u);
    for (const JobEvent& e : page) {
      EXPECT_EQ(e.job_id(), "job-a");
      seen.push_back(e.sequence());
    }
    from = page.back().sequence() + 1;
  }
  EXPECT_EQ(pages, 3);
  EXPECT_EQ(seen, Range(1, 250));
  EXPECT_EQ(Sequences(Read("job-a", 245, 100)), Range(245, 250));
  EXPECT_EQ(Sequences(Read("job-a", 17, 3)), Range(17, 19));
  EXPECT_TRUE(Read("job-a", 251, 100).empty());
  EXPECT_TRUE(Read("job-a", 1, 0).empty());
  EXPECT_EQ(Sequences(Read("job-a", 0, 2)), Range(1, 2));
  EXPECT_TRUE(Read("no-such-job").empty());
  EXPECT_EQ(Sequences(Read("job-b")), Range(1, 25));
}

TEST_P(JobStoreTest, ManyJobsKeepTheirOwnLogs) {
  constexpr int kJobs = 200;
  std::vector<Draft> drafts;
  for (int i = 0; i < kJobs; ++i)
    drafts.emplace_back(absl::StrCat("job-", 1000 + i), 1700000000 + i);
  for (int round = 0; round < 2; ++round) {
    for (Draft& d : drafts) ASSERT_TRUE(store_->Commit(d.stored(), d.Events(1 + round)).ok());
  }
  std::vector<Job> jobs = Load();
  ASSERT_EQ(jobs.size(), static_cast<size_t>(kJobs));
  for (int i = 0; i < kJobs; ++i) {
    EXPECT_TRUE(MessageDifferencer::Equals(jobs[i], drafts[i].job)) << i;
    std::vector<JobEvent> events = Read(drafts[i].job.id());
    EXPECT_EQ(Sequences(events), Range(1, 3));
    for (const JobEvent& e : events) EXPECT_EQ(e.job_id(), drafts[i].job.id());
  }
}

TEST_P(JobStoreTest, EverythingSurvivesReopeningTheStore) {
  Draft draft("job-a");
  ASSERT_TRUE(store_->Commit(draft.stored(), draft.Events(3)).ok());
  store_.reset();
  store_ = Open();
  ASSERT_NE(store_, nullptr);
  std::vector<Job> jobs = Load();
  ASSERT_EQ(jobs.size(), 1u);
  EXPECT_TRUE(MessageDifferencer::Equals(jobs[0], draft.job));
  EXPECT_EQ(Sequences(Read("job-a")), Range(1, 3));
  // The reopened store still knows where the log ends.
  Draft stale = draft;
  stale.job.set_last_sequence(2);
  EXPECT_EQ(store_->Commit(stale.stored(), stale.Events(1)).code(), absl::StatusCode::kAborted);
  EXPECT_TRUE(store_->Commit(draft.stored(), draft.Events(1)).ok());
  EXPECT_EQ(Sequences(Read("job-a")), Range(1, 4));
}

TEST_P(JobStoreTest, DeletingAJobRemovesItAndItsEventsOnly) {
  Draft doomed("job-a");
  Draft kept("job-b");
  ASSERT_TRUE(store_->Commit(doomed.stored(), doomed.Events(3)).ok());
  ASSERT_TRUE(store_->Commit(kept.stored(), kept.Events(2)).ok());
  ASSERT_TRUE(store_->DeleteJob("job-a").ok());
  std::vector<Job> jobs = Load();
  ASSERT_EQ(jobs.size(), 1u);
  EXPECT_EQ(jobs[0].id(), "job-b");
  EXPECT_TRUE(Read("job-a").empty());
  EXPECT_EQ(Sequences(Read("job-b")), Range(1, 2));
  // Again, and an id never stored: nothing to do, not an error.
  EXPECT_TRUE(store_->DeleteJob("job-a").ok());
  EXPECT_TRUE(store_->DeleteJob("job-never").ok());
  // Gone for good, and the id starts a fresh log if used again.
  store_.reset();
  store_ = Open();
  ASSERT_NE(store_, nullptr);
  ASSERT_EQ(Load().size(), 1u);
  Draft reborn("job-a");
  EXPECT_TRUE(store_->Commit(reborn.stored(), reborn.Events(1)).ok());
  EXPECT_EQ(Sequences(Read("job-a")), Range(1, 1));
}

TEST_P(JobStoreTest, LargeJobsAndEventsRoundTrip) {
  Draft draft("job-a");
  std::string big(2 << 20, 'x');
  for (size_t i = 0; i < big.size(); i += 4096) big[i] = '\0';
  draft.job.set_message(big);
  std::vector<JobEvent> events = draft.Events(2);
  events[1].mutable_log()->set_text(big);
  ASSERT_TRUE(store_->Commit(draft.stored(), events).ok());
  std::vector<Job> jobs = Load();
  ASSERT_EQ(jobs.size(), 1u);
  EXPECT_EQ(jobs[0].message(), big);
  std::vector<JobEvent> read = Read("job-a");
  ASSERT_EQ(read.size(), 2u);
  EXPECT_EQ(read[1].log().text(), big);
}

TEST_P(JobStoreTest, ConcurrentCommitsFromThreadsLoseNothing) {
  constexpr int kThreads = 6, kJobsPerThread = 4, kCommits = 15;
  std::atomic<int> failures{0};
  std::atomic<bool> writing{true};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<Draft> drafts;
      for (int j = 0; j < kJobsPerThread; ++j) drafts.emplace_back(absl::StrCat("job-", t, "-", j));
      for (int c = 0; c < kCommits; ++c) {
        for (Draft& d : drafts) {
          if (!store_->Commit(d.stored(), d.Events(1 + c % 3)).ok()) ++failures;
        }
      }
    });
  }
  // Readers alongside the writers.
  std::thread reader([&] {
    while (writing) {
      if (!store_->LoadJobs().ok() || !store_->ReadEvents("job-0-0", 1, 50).ok()) ++failures;
    }
  });
  for (std::thread& t : threads) t.join();
  writing = false;
  reader.join();
  EXPECT_EQ(failures.load(), 0);
  // 15 commits of 1, 2, 3, 1, 2, 3 ... events: 30 per job.
  EXPECT_EQ(Load().size(), static_cast<size_t>(kThreads * kJobsPerThread));
  for (int t = 0; t < kThreads; ++t) {
    for (int j = 0; j < kJobsPerThread; ++j) {
      EXPECT_EQ(Sequences(Read(absl::StrCat("job-", t, "-", j))), Range(1, 30));
    }
  }
}

TEST_P(JobStoreTest, RacingWritersOfOneJobNeverLeaveAGapOrADuplicate) {
  Draft first("job-a");
  ASSERT_TRUE(store_->Commit(first.stored(), first.Events(1)).ok());
  constexpr int kThreads = 4, kTries = 40;
  std::atomic<int> won{0}, other_errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kTries; ++i) {
        // Each writer appends after the last event it sees; the losers of a
        // race are refused.
        absl::StatusOr<std::vector<JobEvent>> seen = store_->ReadEvents("job-a", 1, 1 << 20);
        if (!seen.ok()) {
          ++other_errors;
          continue;
        }
        Draft draft = first;
        draft.job.set_last_sequence(static_cast<int64_t>(seen->size()));
        absl::Status status = store_->Commit(draft.stored(), draft.Events(1));
        if (status.ok()) {
          ++won;
        } else if (status.code() != absl::StatusCode::kAborted) {
          ++other_errors;
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(other_errors.load(), 0);
  EXPECT_GE(won.load(), kTries);
  EXPECT_EQ(Sequences(Read("job-a")), Range(1, 1 + won.load()));
}

INSTANTIATE_TEST_SUITE_P(Stores, JobStoreTest, ::testing::Values("sqlite", "postgres"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// ------------------------------------------------------------ PostgreSQL only

class PostgresJobStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::string why = testing::PostgresSkipReason(); !why.empty()) GTEST_SKIP() << why;
    absl::StatusOr<std::unique_ptr<testing::PostgresSchema>> schema =
        testing::PostgresSchema::Create();
    ASSERT_TRUE(schema.ok()) << schema.status();
    schema_ = std::move(*schema);
  }

  std::unique_ptr<JobStore> Open(absl::Duration lock_wait = absl::Seconds(15)) {
    absl::StatusOr<std::unique_ptr<JobStore>> store =
        OpenPostgresJobStore(schema_->url(), lock_wait);
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? std::move(*store) : nullptr;
  }

  std::unique_ptr<testing::PostgresSchema> schema_;
};

TEST_F(PostgresJobStoreTest, ReconnectsWhenTheDatabaseEndsItsSession) {
  std::unique_ptr<JobStore> store = Open();
  ASSERT_NE(store, nullptr);
  Draft draft("job-a");
  ASSERT_TRUE(store->Commit(draft.stored(), draft.Events(1)).ok());

  ASSERT_TRUE(schema_->TerminateSessions().ok());
  absl::Status status = store->Commit(draft.stored(), draft.Events(1));
  EXPECT_TRUE(status.ok()) << status;
  ASSERT_TRUE(schema_->TerminateSessions().ok());
  absl::StatusOr<std::vector<StoredJob>> jobs = store->LoadJobs();
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_EQ(jobs->size(), 1u);
  ASSERT_TRUE(schema_->TerminateSessions().ok());
  absl::StatusOr<std::vector<JobEvent>> events = store->ReadEvents("job-a", 1, 10);
  ASSERT_TRUE(events.ok()) << events.status();
  EXPECT_EQ(Sequences(*events), Range(1, 2));
}

TEST_F(PostgresJobStoreTest, ADatabaseRestartIsUnavailableWhileDownThenTransparent) {
  testing::PostgresCluster* cluster = testing::TestPostgresCluster();
  if (cluster == nullptr)
    GTEST_SKIP() << "restarts only a cluster the test started (COMPRESS_TEST_POSTGRES_URL is set)";
  std::unique_ptr<JobStore> store = Open();
  ASSERT_NE(store, nullptr);
  Draft draft("job-a");
  ASSERT_TRUE(store->Commit(draft.stored(), draft.Events(2)).ok());

  ASSERT_TRUE(cluster->Stop().ok());
  Draft down = draft;
  absl::Status status = store->Commit(down.stored(), down.Events(1));
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "127.0.0.1")) << status;
  EXPECT_EQ(store->ReadEvents("job-a", 1, 10).status().code(), absl::StatusCode::kUnavailable);

  ASSERT_TRUE(cluster->Restart().ok()) << cluster->Log();
  status = store->Commit(draft.stored(), draft.Events(1));
  EXPECT_TRUE(status.ok()) << status;
  absl::StatusOr<std::vector<JobEvent>> events = store->ReadEvents("job-a", 1, 10);
  ASSERT_TRUE(events.ok()) << events.status();
  EXPECT_EQ(Sequences(*events), Range(1, 3));
}

TEST_F(PostgresJobStoreTest, ASecondServerOnTheSameSchemaIsRefusedUntilTheFirstCloses) {
  std::unique_ptr<JobStore> first = Open();
  ASSERT_NE(first, nullptr);
  absl::StatusOr<std::unique_ptr<JobStore>> second =
      OpenPostgresJobStore(schema_->url(), absl::Milliseconds(300));
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition) << second.status();
  EXPECT_TRUE(absl::StrContains(second.status().message(), schema_->name())) << second.status();
  EXPECT_TRUE(absl::StrContains(second.status().message(), "application '" + schema_->name()))
      << second.status();
  first.reset();
  EXPECT_NE(Open(), nullptr);
}

TEST_F(PostgresJobStoreTest, AnUnreadableUrlIsInvalidArgument) {
  absl::StatusOr<std::unique_ptr<JobStore>> store =
      OpenPostgresJobStore("postgresql://localhost/jobs?no_such_option=1");
  EXPECT_EQ(store.status().code(), absl::StatusCode::kInvalidArgument) << store.status();
  EXPECT_TRUE(absl::StrContains(store.status().message(), "no_such_option")) << store.status();
}

TEST_F(PostgresJobStoreTest, AnUnreachableDatabaseIsUnavailableAndNamedWithoutItsPassword) {
  const int port = testing::PickFreePort();
  absl::StatusOr<std::unique_ptr<JobStore>> store = OpenPostgresJobStore(absl::StrCat(
      "postgresql://compress:secret-word@127.0.0.1:", port, "/jobs?connect_timeout=3"));
  EXPECT_EQ(store.status().code(), absl::StatusCode::kUnavailable) << store.status();
  EXPECT_TRUE(absl::StrContains(store.status().message(),
                                absl::StrCat("compress@127.0.0.1:", port, "/jobs")))
      << store.status();
  EXPECT_FALSE(absl::StrContains(store.status().message(), "secret-word")) << store.status();
}

TEST_F(PostgresJobStoreTest, AMissingDatabaseIsNamed) {
  absl::StatusOr<std::unique_ptr<JobStore>> store =
      OpenPostgresJobStore(schema_->url() + "&dbname=no_such_database");
  EXPECT_EQ(store.status().code(), absl::StatusCode::kUnavailable) << store.status();
  EXPECT_TRUE(absl::StrContains(store.status().message(), "no_such_database")) << store.status();
}

TEST_F(PostgresJobStoreTest, ASearchPathWithoutASchemaIsFailedPrecondition) {
  absl::StatusOr<std::unique_ptr<JobStore>> store =
      OpenPostgresJobStore(schema_->url() + "&options=-csearch_path%3Dno_such_schema");
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition) << store.status();
  EXPECT_TRUE(absl::StrContains(store.status().message(), "search_path")) << store.status();
}

TEST(ServerStoreFlagTest, AnUnknownStoreIsRefusedWithoutEchoingTheUrl) {
  testing::TempDir dir("store-flag");
  ServerConfig config;
  config.listen = "127.0.0.1:0";
  config.metrics_listen = "";
  config.data_dir = dir.Sub("data");
  config.model_roots = {dir.path()};
  config.store = "mysql://compress:secret-word@db/jobs";
  CompressServer server(config);
  absl::Status status = server.Start();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "--store")) << status;
  EXPECT_FALSE(absl::StrContains(status.message(), "secret-word")) << status;
}

}  // namespace
}  // namespace compress::server
