// Ctrl-C during long calls that run on the caller's thread with the GIL released: the work
// stays on that thread (its torch thread-local state: grad mode, dispatch modes, current
// stream), and signals are checked between its chunks.
#pragma once

#include <torch/csrc/utils/pybind.h>

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

}  // namespace zerockpt
