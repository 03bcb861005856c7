// save(module) without a state dict: module.state_dict()'s entries and `_metadata`, read from
// the registries straight into the writer's entries, with no Python object per tensor.
// Requires GIL throughout.
#pragma once

#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>

#include "torch/tensor_io.h"

namespace zerockpt {

// What save(state_dict(module)) would store for a module tree: the entries in state_dict()'s
// order (the registries' own tensors: the writer detaches what it stores) and the state dict's
// `_metadata` as the JSON text save() stores under kStateDictMetadataKey. Immutable once made.
struct ModuleTensors {
  NamedTensors entries;
  std::string metadata_json;
};

// Requires GIL. The ModuleTensors of `module`, or nullopt where the tree holds anything that
// torch's state_dict() would hand to Python code (hooks, overridden state_dict,
// _save_to_state_dict or get_extra_state, tensor subclasses, a dispatch mode) or that the
// state-dict path stores differently (a name that is not a plain str, holds '.' or lone
// surrogates, or repeats a key; a `_version` that is not an int): the caller then saves
// state_dict(module) as before. Runs no Python code.
std::optional<ModuleTensors> module_tensors(pybind11::handle module);

// Requires GIL. The ModuleTensors that `obj` holds (a zerockpt._C._ModuleTensors), or null.
std::shared_ptr<const ModuleTensors> module_tensors_of(pybind11::handle obj);

// Requires GIL. Binds _ModuleTensors, module_tensors and the testing aid _count_tensor_objects.
void bind_module_stream(pybind11::module_& m);

}  // namespace zerockpt
