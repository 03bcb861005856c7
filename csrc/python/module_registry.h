// Reading a Python nn.Module's registries from C++: the instance dict entries torch keeps
// (_parameters, _buffers, _modules, _non_persistent_buffers_set, hook dicts) and whether the
// module's class customises state-dict saving or loading in Python. Requires GIL throughout.
#pragma once

#include <torch/csrc/utils/pybind.h>

#include <unordered_map>

namespace zerockpt {

// Interned attribute names and torch.nn.Module's own methods, fetched once.
struct ModuleNames {
  PyObject* parameters;            // "_parameters"
  PyObject* buffers;               // "_buffers"
  PyObject* modules;               // "_modules"
  PyObject* non_persistent;        // "_non_persistent_buffers_set"
  PyObject* state_dict_hooks;      // "_state_dict_hooks"
  PyObject* state_dict_pre_hooks;  // "_state_dict_pre_hooks"
  PyObject* load_pre_hooks;        // "_load_state_dict_pre_hooks"
  PyObject* load_post_hooks;       // "_load_state_dict_post_hooks"
  PyObject* version;               // "_version"
  PyObject* version_key;           // "version"
  PyObject* metadata;              // "_metadata"
  PyObject* state_dict;            // "state_dict"
  PyObject* save_to_state_dict;    // "_save_to_state_dict"
  PyObject* load_from_state_dict;  // "_load_from_state_dict"
  PyObject* get_extra_state;       // "get_extra_state"
  PyObject* set_extra_state;       // "set_extra_state"
  PyObject* extra_state_suffix;    // "_extra_state"
  PyObject* from_public_api;       // "_from_public_api"
  PyObject* assign_key;            // "assign_to_params_buffers"
  PyObject* detach;                // "detach"
  PyObject* get;                   // "get"
  PyObject* dot;                   // "."
  PyObject* empty;                 // ""
  // torch.nn.Module's implementations, to tell overrides apart.
  PyObject* module_class;
  PyObject* base_state_dict;
  PyObject* base_save_to_state_dict;
  PyObject* base_load_from_state_dict;
  PyObject* base_get_extra_state;
  PyObject* base_set_extra_state;
  // torch's norm layers' _load_from_state_dict overrides (_NormBase's, _InstanceNorm's): they
  // only migrate state dicts stored before version 2, then call Module's.
  PyObject* norm_load_from_state_dict;
  PyObject* instance_norm_load_from_state_dict;
  // Exact Python types of plain tensors (torch.Tensor, nn.Parameter).
  PyTypeObject* tensor_type;
  PyTypeObject* parameter_type;
  PyObject* parameter_class;
  PyObject* incompatible_keys;  // torch.nn.modules.module._IncompatibleKeys
};

// Requires GIL. Initialised on first use; the objects are kept for the process's lifetime.
const ModuleNames& module_names();

// What a module's class overrides of torch.nn.Module's state-dict machinery.
struct ClassTraits {
  bool custom_state_dict = false;   // state_dict overridden: hand the subtree to torch
  bool custom_save = false;         // _save_to_state_dict overridden: call it
  bool extra_state_getter = false;  // get_extra_state overridden: store _extra_state
  bool custom_load = false;         // _load_from_state_dict overridden: call it
  // custom_load only through torch's norm layers (every _load_from_state_dict in the MRO is
  // _NormBase's, _InstanceNorm's or Module's): for a stored version >= 2, Module's alone runs.
  bool versioned_norm_load = false;
  bool extra_state_setter = false;  // set_extra_state overridden
};

// Per-call cache of ClassTraits by exact type (classes may be patched between calls).
class ClassTraitsCache {
 public:
  const ClassTraits& get(PyTypeObject* type);

 private:
  std::unordered_map<PyTypeObject*, ClassTraits> cache_;
};

// The torch registries of one module, borrowed from its instance dict.
struct ModuleView {
  PyObject* dict = nullptr;  // the instance __dict__ (owned reference)
  PyObject* parameters = nullptr;
  PyObject* buffers = nullptr;
  PyObject* modules = nullptr;
  PyObject* non_persistent = nullptr;
  ModuleView() = default;
  ModuleView(const ModuleView&) = delete;
  ModuleView& operator=(const ModuleView&) = delete;
  ~ModuleView() { Py_XDECREF(dict); }
  // Instance-level entry of `name` (borrowed) or nullptr.
  PyObject* instance_attr(PyObject* name) const;
  // Number of entries of a hook dict, or -1 if it is missing or not a dict.
  Py_ssize_t hook_count(PyObject* name) const;
};

// Fills `view` from `module`; false if the module lacks torch's registries in the expected
// form (exact dicts and an exact set), in which case callers hand it to torch. Raises on Python
// errors.
bool read_module(PyObject* module, ModuleView& view);

// prefix[:-1] as torch computes it (drops the last code point, "" stays ""). New reference.
PyObject* metadata_key(PyObject* prefix);

// a + b as a new str. New reference.
PyObject* concat(PyObject* a, PyObject* b);

// Calls fn(key, value) for each item of the dict `dict`, as `for k, v in dict.items()` would: the
// dict and each item are held while `fn` runs (a hook may drop or replace the registry), and a
// change of its size raises RuntimeError("dictionary changed size during iteration"), as Python
// does at the loop's next step.
template <typename Fn>
void for_each_item(PyObject* dict, Fn&& fn) {
  auto hold_dict = pybind11::reinterpret_borrow<pybind11::object>(dict);
  const Py_ssize_t size = PyDict_GET_SIZE(dict);
  Py_ssize_t pos = 0;
  PyObject* key;
  PyObject* value;
  while (true) {
    if (PyDict_GET_SIZE(dict) != size) {
      PyErr_SetString(PyExc_RuntimeError, "dictionary changed size during iteration");
      throw pybind11::error_already_set();
    }
    if (!PyDict_Next(dict, &pos, &key, &value)) break;
    auto hold_key = pybind11::reinterpret_borrow<pybind11::object>(key);
    auto hold_value = pybind11::reinterpret_borrow<pybind11::object>(value);
    fn(key, value);
  }
}

// One level of a recursive module walk, counted as Python counts calls: a tree deeper than the
// recursion limit (a cyclic one) raises torch's RecursionError instead of overflowing the stack.
class RecursionGuard {
 public:
  RecursionGuard() {
    if (Py_EnterRecursiveCall(" while calling a Python object") != 0) {
      throw pybind11::error_already_set();
    }
  }
  ~RecursionGuard() { Py_LeaveRecursiveCall(); }
  RecursionGuard(const RecursionGuard&) = delete;
  RecursionGuard& operator=(const RecursionGuard&) = delete;
};

// True for objects whose exact type is torch.Tensor or nn.Parameter.
bool is_plain_tensor(PyObject* obj);

}  // namespace zerockpt
