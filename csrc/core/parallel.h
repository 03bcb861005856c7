// A fork-safe parallel loop: threads are created per call (tens of microseconds, small next to
// the I/O they run), so no pool survives into a forked child. Thread-safe.
#pragma once

#include <cstddef>
#include <functional>

namespace zerockpt {

// min(hardware threads, 8), at least 1: I/O beyond that gains nothing on one file.
unsigned default_threads();

// Runs fn(i) for every i in [0, n) on up to `threads` threads, the caller's included. After
// the first exception no new indices start; it is rethrown once every thread has stopped.
void parallel_for(size_t n, unsigned threads, const std::function<void(size_t)>& fn);

}  // namespace zerockpt
