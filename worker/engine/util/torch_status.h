// The one adapter from LibTorch exceptions to absl::Status. Every engine
// function that returns a Status and calls ATen wraps its body in
// CatchTorchErrors, so no c10::Error crosses a module boundary.
#pragma once

#include <c10/util/Exception.h>

#include <exception>
#include <new>
#include <string>
#include <type_traits>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace compress::engine {

// Runs `body` (returning absl::Status or absl::StatusOr<T>) and converts any
// exception it throws into INTERNAL (RESOURCE_EXHAUSTED for out of memory),
// prefixed with `context` (e.g. the tensor name).
template <typename Body>
auto CatchTorchErrors(absl::string_view context, Body&& body) -> decltype(body()) {
  try {
    return std::forward<Body>(body)();
  } catch (const c10::OutOfMemoryError& e) {
    return absl::ResourceExhaustedError(
        absl::StrCat(context, ": out of device memory: ", e.what_without_backtrace()));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(context, ": LibTorch: ", e.what_without_backtrace()));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(context, ": out of memory"));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(context, ": ", e.what()));
  } catch (...) {
    return absl::InternalError(absl::StrCat(context, ": unknown exception"));
  }
}

}  // namespace compress::engine
