// FUZZ_CHECK(condition, message): an invariant of a parser's result. A
// broken one aborts, which libFuzzer reports as a crash and saves the input.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/status/status.h"

#define FUZZ_CHECK(condition, message)                                                           \
  do {                                                                                           \
    if (!(condition)) {                                                                          \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK(%s) failed: %s\n", __FILE__, __LINE__, #condition, \
                   std::string(message).c_str());                                                \
      std::abort();                                                                              \
    }                                                                                            \
  } while (0)

// A parser may refuse its input, but only as INVALID_ARGUMENT.
#define FUZZ_CHECK_REFUSAL(status)                                                                 \
  FUZZ_CHECK((status).code() == absl::StatusCode::kInvalidArgument && !(status).message().empty(), \
             (status).ToString())
