// nn.Module.state_dict() and load_state_dict() for Python modules, walked from C++.
#pragma once

#include <torch/csrc/utils/pybind.h>

namespace zerockpt {

// Requires GIL. What module.state_dict(destination=destination, prefix=prefix,
// keep_vars=keep_vars) returns; `destination` must already be a mapping (the caller creates
// torch's default OrderedDict with `_metadata`).
pybind11::object state_dict(pybind11::handle module, pybind11::object destination,
                            pybind11::str prefix, pybind11::object keep_vars);

// Requires GIL. Benchmark aid: whether state_dict() pauses the cyclic GC while only C++
// allocates (the default); returns the previous setting.
bool set_gc_pause(bool on);

// Requires GIL. Benchmark floor: only the irreducible work of state_dict() for a tree of plain
// modules (keys, detached aliases or the tensors themselves, the OrderedDict, `_metadata`).
pybind11::object state_dict_floor(pybind11::handle module, bool keep_vars);

}  // namespace zerockpt
