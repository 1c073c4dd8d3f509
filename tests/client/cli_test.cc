#include "client/cli.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace compress::client {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

EnvLookup FakeEnv(std::map<std::string, std::string> values) {
  return [values](const std::string& name) -> std::optional<std::string> {
    auto it = values.find(name);
    if (it == values.end()) return std::nullopt;
    return it->second;
  };
}

std::string ParseError(const std::vector<std::string>& args) {
  absl::StatusOr<ParsedArgs> parsed = ParseArgs(args);
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(parsed.status().message());
}

TEST(ParseArgsTest, VerbPositionalsAndOptions) {
  absl::StatusOr<ParsedArgs> parsed =
      ParseArgs({"--server", "host:1", "submit", "--model=models/llama", "--bits", "3", "--label",
                 "a=1", "--label", "b=2", "--asym", "--priority", "-5"});
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->verb, "submit");
  EXPECT_TRUE(parsed->positionals.empty());
  EXPECT_EQ(parsed->Value("model"), "models/llama");
  EXPECT_EQ(parsed->Value("bits"), "3");
  EXPECT_EQ(parsed->Value("priority"), "-5");  // a negative number is a value, not an option
  EXPECT_THAT(parsed->Values("label"), ElementsAre("a=1", "b=2"));
  EXPECT_TRUE(parsed->Has("asym"));
  EXPECT_FALSE(parsed->Has("sym"));
  EXPECT_EQ(parsed->global.server, "host:1");
  EXPECT_FALSE(parsed->global.timeout.has_value());
}

TEST(ParseArgsTest, TheLastValueWins) {
  absl::StatusOr<ParsedArgs> parsed = ParseArgs({"submit", "--bits", "3", "--bits", "8"});
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->Value("bits"), "8");
}

TEST(ParseArgsTest, GlobalsComeFromFlagsThenEnvironmentThenDefaults) {
  absl::StatusOr<ParsedArgs> defaults = ParseArgs({"list"}, FakeEnv({}));
  ASSERT_TRUE(defaults.ok());
  EXPECT_EQ(defaults->global.server, "127.0.0.1:50051");
  EXPECT_EQ(defaults->global.token, "");

  EnvLookup env = FakeEnv({{"COMPRESS_SERVER", "env:2"}, {"COMPRESS_TOKEN", "env-token"}});
  absl::StatusOr<ParsedArgs> from_env = ParseArgs({"list"}, env);
  ASSERT_TRUE(from_env.ok());
  EXPECT_EQ(from_env->global.server, "env:2");
  EXPECT_EQ(from_env->global.token, "env-token");

  absl::StatusOr<ParsedArgs> from_flags =
      ParseArgs({"list", "--server", "flag:3", "--token=t", "--timeout", "2.5"}, env);
  ASSERT_TRUE(from_flags.ok());
  EXPECT_EQ(from_flags->global.server, "flag:3");
  EXPECT_EQ(from_flags->global.token, "t");
  EXPECT_EQ(from_flags->global.timeout, absl::Milliseconds(2500));
}

TEST(ParseArgsTest, Help) {
  absl::StatusOr<ParsedArgs> help = ParseArgs({"--help"});
  ASSERT_TRUE(help.ok());
  EXPECT_EQ(help->verb, "help");
  EXPECT_TRUE(help->positionals.empty());

  absl::StatusOr<ParsedArgs> verb_help = ParseArgs({"fetch", "--help"});
  ASSERT_TRUE(verb_help.ok());
  EXPECT_EQ(verb_help->verb, "help");
  EXPECT_THAT(verb_help->positionals, ElementsAre("fetch"));

  absl::StatusOr<ParsedArgs> help_verb = ParseArgs({"help", "watch"});
  ASSERT_TRUE(help_verb.ok());
  EXPECT_THAT(help_verb->positionals, ElementsAre("watch"));
}

TEST(ParseArgsTest, ErrorsNameTheProblem) {
  EXPECT_THAT(ParseError({}), HasSubstr("no verb given"));
  EXPECT_THAT(ParseError({"frobnicate"}), HasSubstr("unknown verb \"frobnicate\""));
  EXPECT_THAT(ParseError({"submit", "--bitz", "4"}), HasSubstr("unknown option --bitz"));
  EXPECT_THAT(ParseError({"get", "j-1", "--bits", "4"}),
              HasSubstr("--bits is not an option of get"));
  EXPECT_THAT(ParseError({"get"}), HasSubstr("get takes JOB, got 0 arguments"));
  EXPECT_THAT(ParseError({"get", "a", "b"}), HasSubstr("got 2 arguments"));
  EXPECT_THAT(ParseError({"list", "extra"}), HasSubstr("list takes no arguments"));
  EXPECT_THAT(ParseError({"submit", "--model"}), HasSubstr("--model needs a value"));
  EXPECT_THAT(ParseError({"submit", "--watch=yes"}), HasSubstr("--watch takes no value"));
  EXPECT_THAT(ParseError({"list", "--timeout", "soon"}), HasSubstr("--timeout wants"));
  EXPECT_THAT(ParseError({"help", "nope"}), HasSubstr("help takes one verb"));
}

TEST(ParseArgsTest, DoubleDashEndsOptions) {
  absl::StatusOr<ParsedArgs> parsed = ParseArgs({"get", "--", "--odd-job-id"});
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_THAT(parsed->positionals, ElementsAre("--odd-job-id"));
}

TEST(HelpTextTest, ListsEveryVerbWithAnExample) {
  const std::string help = HelpText();
  for (const std::string& verb : VerbNames()) {
    EXPECT_THAT(help, HasSubstr("  " + verb + " ")) << verb;
    EXPECT_THAT(help, HasSubstr("compressctl " + verb)) << verb;
  }
  EXPECT_THAT(help, HasSubstr("--server ADDR"));
  EXPECT_THAT(help, HasSubstr("Exit codes"));
}

TEST(HelpTextTest, VerbHelpListsItsOptions) {
  const std::string help = HelpText("submit");
  EXPECT_THAT(help, HasSubstr("Usage: compressctl submit [OPTIONS]"));
  for (const char* option : {"--recipe FILE", "--model PATH", "--bits N", "--group-size N", "--sym",
                             "--asym", "--output LIST", "--label KEY=VALUE", "--watch"}) {
    EXPECT_THAT(help, HasSubstr(option)) << option;
  }
  EXPECT_THAT(HelpText("fetch"), HasSubstr("Usage: compressctl fetch JOB [OPTIONS]"));
}

}  // namespace
}  // namespace compress::client
