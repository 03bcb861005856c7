#include "core/parallel.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace zerockpt {

unsigned default_threads() {
  unsigned hw = std::thread::hardware_concurrency();
  return std::max(1u, std::min(hw == 0 ? 1u : hw, 8u));
}

void parallel_for(size_t n, unsigned threads, const std::function<void(size_t)>& fn) {
  if (n == 0) return;
  size_t workers = std::min<size_t>(std::max(1u, threads), n);
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mu;
  auto work = [&]() {
    while (!failed.load(std::memory_order_relaxed)) {
      size_t i = next.fetch_add(1);
      if (i >= n) return;
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu);
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  try {
    for (size_t t = 1; t < workers; ++t) pool.emplace_back(work);
  } catch (const std::system_error&) {
    // Could not start another thread: the ones running (and this one) finish the loop.
  }
  work();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace zerockpt
