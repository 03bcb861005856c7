// Ctrl-C during long calls that run on the caller's thread with the GIL released: the work
// stays on that thread (its torch thread-local state: grad mode, dispatch modes, current
// stream), and signals are checked between its chunks.
#pragma once

#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

#include "core/io_engine.h"

namespace zerockpt {

// One binding call's Progress (the caller's, or a new one) and, on the main thread, a
// ProgressPoll that reacquires the GIL between chunks (at most every kPollInterval) to run
// PyErr_CheckSignals(). An exception from a signal handler (KeyboardInterrupt) cancels the
// Progress, so the call stops at its next chunk having committed nothing, and is kept for
// raise_if_signalled(). Requires GIL to construct, raise and destroy; one thread.
class SignalWatch {
 public:
  explicit SignalWatch(std::shared_ptr<Progress> progress);
  SignalWatch(const SignalWatch&) = delete;
  SignalWatch& operator=(const SignalWatch&) = delete;
  Progress* progress() const { return progress_.get(); }
  // Throws the signal handler's exception, if one was raised. Requires GIL.
  void raise_if_signalled();

 private:
  std::shared_ptr<Progress> progress_;
  std::optional<pybind11::error_already_set> raised_;
  std::optional<ProgressPoll> poll_;
};

// call(progress) under a SignalWatch: what it returns, or the signal handler's exception in
// place of the Cancelled (or any other error) that stopped it. Requires GIL; `call` releases
// it for its work.
template <typename Call>
auto interruptible(std::shared_ptr<Progress> progress, Call&& call) {
  SignalWatch watch(std::move(progress));
  try {
    if constexpr (std::is_void_v<decltype(call(watch.progress()))>) {
      call(watch.progress());
      watch.raise_if_signalled();
    } else {
      auto result = call(watch.progress());
      watch.raise_if_signalled();
      return result;
    }
  } catch (...) {
    watch.raise_if_signalled();
    throw;
  }
}

// Waits until wait(seconds) returns true, calling it without the GIL for slices of
// ProgressPoll::kPollInterval (or less, up to `seconds`; negative: no limit) and checking for
// signals after each: a handler's exception propagates (a signal that came during the wait
// wins over its end), and what was awaited goes on. Returns whether wait() returned true.
// Requires GIL.
template <typename Wait>
bool wait_interruptibly(Wait&& wait, double seconds) {
  using Clock = std::chrono::steady_clock;
  const std::chrono::duration<double> slice = ProgressPoll::kPollInterval;
  const auto deadline = Clock::now() + std::chrono::duration<double>(std::max(0.0, seconds));
  while (true) {
    double step = slice.count();
    if (seconds >= 0) {
      step = std::min(step, std::chrono::duration<double>(deadline - Clock::now()).count());
    }
    bool done;
    {
      pybind11::gil_scoped_release no_gil;  // `wait` touches no Python object
      done = wait(std::max(0.0, step));
    }
    if (PyErr_CheckSignals() != 0) throw pybind11::error_already_set();
    if (done) return true;
    if (seconds >= 0 && Clock::now() >= deadline) return false;
  }
}

}  // namespace zerockpt
