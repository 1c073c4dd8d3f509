// RETURN_IF_ERROR / ASSIGN_OR_RETURN: Debian's Abseil (20220623) has none.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define COMPRESS_CONCAT_INNER_(a, b) a##b
#define COMPRESS_CONCAT_(a, b) COMPRESS_CONCAT_INNER_(a, b)

#define RETURN_IF_ERROR(expr)                     \
  do {                                            \
    ::absl::Status compress_status_ = (expr);     \
    if (!compress_status_.ok()) return compress_status_; \
  } while (0)

#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(COMPRESS_CONCAT_(compress_statusor_, __LINE__), lhs, expr)

#define ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                           \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()
