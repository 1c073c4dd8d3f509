// This process's resource use, from /proc (for the /metrics pages).
#pragma once

#include <cstdint>

namespace compress {

// Resident set size, from /proc/self/statm; 0 when unreadable.
int64_t ResidentMemoryBytes();
// User plus system CPU time so far, from /proc/self/stat; 0 when unreadable.
double ProcessCpuSeconds();

}  // namespace compress
