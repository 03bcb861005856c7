// nn.Module.load_state_dict() for Python modules, walked from C++.
#pragma once

#include <torch/csrc/utils/pybind.h>

#include <memory>

#include "torch/tensor_io.h"

namespace zerockpt {

// Requires GIL (released for file I/O and large copies). Loads `source` (an exact dict or
// OrderedDict with str keys) or, if `file` is set, that file's tensors into `module` as
// torch's Module.load_state_dict does, up to the final error check. Returns
// (missing_keys, unexpected_keys, error_msgs), or None if a key is not a str (the caller then
// uses torch's own code). `progress` (may be null) counts the bytes read from `file`; Ctrl-C
// stops the load between chunks (SignalWatch);
// `staging_bytes` bounds the host memory used to fill device parameters (0: default).
pybind11::object load_state_dict(pybind11::handle module, pybind11::object source,
                                 pybind11::object metadata, pybind11::object assign,
                                 std::shared_ptr<CheckpointFile> file, unsigned threads,
                                 std::shared_ptr<Progress> progress = nullptr,
                                 uint64_t staging_bytes = 0);

}  // namespace zerockpt
