#include "python/interrupt.h"

namespace py = pybind11;

namespace zerockpt {
namespace {

// Python runs signal handlers on the main thread only; elsewhere there is nothing to poll.
// Requires GIL.
bool on_main_thread() {
  try {
    py::object main = py::module_::import("threading").attr("main_thread")();
    return py::int_(PyThread_get_thread_ident()).equal(main.attr("ident"));
  } catch (py::error_already_set&) {
    return false;  // threading torn down (interpreter exit): no handler would run anyway
  }
}

}  // namespace

SignalWatch::SignalWatch(std::shared_ptr<Progress> progress)
    : progress_(progress ? std::move(progress) : std::make_shared<Progress>()) {
  if (!on_main_thread()) return;
  poll_.emplace([this] {
    // Runs on this object's thread between chunks, where it holds none of zerockpt's locks, so
    // taking the GIL waits only for Python code; the handlers run as between bytecodes.
    py::gil_scoped_acquire gil;
    if (raised_ || PyErr_CheckSignals() == 0) return false;
    raised_.emplace();  // takes the handler's exception out of the error indicator
    return true;
  });
}

void SignalWatch::raise_if_signalled() {
  if (!raised_) return;
  py::error_already_set raised = std::move(*raised_);
  raised_.reset();
  throw raised;
}

}  // namespace zerockpt
