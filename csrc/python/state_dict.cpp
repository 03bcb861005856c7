// zerockpt._C.state_dict: torch's nn.Module.state_dict() walk, done from C++.
//
// Per module, in torch's order: the `_metadata` entry, state-dict pre-hooks, parameters, then
// persistent buffers, then `_extra_state`, then children depth-first, then post-hooks. Anything a
// class customises in Python (an overridden state_dict, _save_to_state_dict or get_extra_state,
// hooks) is called exactly where torch calls it, so the result is the same object for object.
// Requires GIL throughout: every step reads or builds Python objects.
#include "python/state_dict.h"

#include <torch/csrc/autograd/python_variable.h>

#include "python/module_registry.h"
#include "torch/tensor_views.h"

namespace py = pybind11;

namespace zerockpt {
namespace {

py::object steal(PyObject* obj) {
  if (!obj) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(obj);
}

py::object borrow(PyObject* obj) { return py::reinterpret_borrow<py::object>(obj); }

class StateDictWalk {
 public:
  // `keep_vars` is passed to hooks and overrides as given (torch does not convert it to bool).
  explicit StateDictWalk(py::object keep_vars)
      : keep_vars_(keep_vars.ptr()), keep_vars_obj_(std::move(keep_vars)) {
    int truth = PyObject_IsTrue(keep_vars_);
    if (truth < 0) throw py::error_already_set();
    keep_ = truth == 1;
  }

  // What `module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)`
  // returns, computed the way torch computes it.
  // `metadata_key` is prefix[:-1] (passed down: a child's is its parent's prefix + name).
  py::object walk(PyObject* module, py::object destination, PyObject* prefix,
                  PyObject* metadata_key) {
    const ModuleNames& n = module_names();
    ModuleView view;
    const ClassTraits& traits = traits_.get(Py_TYPE(module));
    Py_ssize_t pre_hooks = -1;
    Py_ssize_t post_hooks = -1;  // only to check the registry; hooks may add post-hooks
    if (!traits.custom_state_dict && read_module(module, view) &&
        !view.instance_attr(n.state_dict)) {
      pre_hooks = view.hook_count(n.state_dict_pre_hooks);
      post_hooks = view.hook_count(n.state_dict_hooks);
    }
    if (pre_hooks < 0 || post_hooks < 0) return delegate(module, destination, prefix);

    py::object local_metadata = steal(PyDict_New());
    py::object version = steal(PyObject_GetAttr(module, n.version));
    if (PyDict_SetItem(local_metadata.ptr(), n.version_key, version.ptr()) != 0) {
      throw py::error_already_set();
    }
    if (PyObject* metadata = metadata_of(destination.ptr())) {
      if (PyObject_SetItem(metadata, metadata_key, local_metadata.ptr()) != 0) {
        throw py::error_already_set();
      }
    }
    if (pre_hooks > 0) {
      for_each_hook(module, n.state_dict_pre_hooks, [&](PyObject* hook) {
        steal(PyObject_CallFunctionObjArgs(hook, module, prefix, keep_vars_, nullptr));
      });
    }
    if (traits.custom_save || view.instance_attr(n.save_to_state_dict)) {
      python_called();
      steal(PyObject_CallMethodObjArgs(module, n.save_to_state_dict, destination.ptr(), prefix,
                                       keep_vars_, nullptr));
    } else {
      save_local(module, view, destination.ptr(), prefix, traits.extra_state_getter);
    }

    for_each_item(view.modules, [&](PyObject* name, PyObject* child) {
      if (child == Py_None) return;
      py::object child_key = steal(concat(prefix, name));
      py::object child_prefix = steal(concat(child_key.ptr(), n.dot));
      walk(child, destination, child_prefix.ptr(), child_key.ptr());
    });

    if (view.hook_count(n.state_dict_hooks) != 0) {  // read now: pre-hooks may have added some
      for_each_hook(module, n.state_dict_hooks, [&](PyObject* hook) {
        py::object result = steal(PyObject_CallFunctionObjArgs(
            hook, module, destination.ptr(), prefix, local_metadata.ptr(), nullptr));
        if (!from_public_api(hook)) {
          if (!result.is_none()) destination = result;
        } else if (!result.is_none()) {
          PyErr_SetString(PyExc_RuntimeError, "state_dict post-hook must return None");
          throw py::error_already_set();
        }
      });
    }
    return destination;
  }

 private:
  // The subtree is handed to torch: this module customises state_dict or lacks the registries.
  py::object delegate(PyObject* module, const py::object& destination, PyObject* prefix) {
    python_called();
    py::object method = steal(PyObject_GetAttr(module, module_names().state_dict));
    py::dict kwargs;
    kwargs["destination"] = destination;
    kwargs["prefix"] = borrow(prefix);
    kwargs["keep_vars"] = borrow(keep_vars_);
    py::tuple args(0);
    return steal(PyObject_Call(method.ptr(), args.ptr(), kwargs.ptr()));
  }

  // destination._metadata if the destination has one (borrowed, cached until Python code that
  // could change it runs), else nullptr.
  PyObject* metadata_of(PyObject* destination) {
    if (!metadata_valid_ || metadata_owner_ != destination) {
      metadata_ = py::object();
      PyObject* m = PyObject_GetAttr(destination, module_names().metadata);
      if (!m) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw py::error_already_set();
        PyErr_Clear();
      } else {
        metadata_ = steal(m);
      }
      metadata_owner_ = destination;
      metadata_valid_ = true;
    }
    return metadata_.ptr();
  }

  void python_called() { metadata_valid_ = false; }

  template <typename Fn>
  void for_each_hook(PyObject* module, PyObject* hooks_name, Fn&& fn) {
    python_called();
    // Iterate as torch does (`for hook in self.<hooks>.values()`), so a hook that changes the
    // dict, or a module that lost it, gets the same error.
    py::object hooks = steal(PyObject_GetAttr(module, hooks_name));
    py::object values = steal(PyObject_CallMethod(hooks.ptr(), "values", nullptr));
    py::object it = steal(PyObject_GetIter(values.ptr()));
    while (PyObject* hook = PyIter_Next(it.ptr())) {
      py::object hold = steal(hook);
      fn(hook);
    }
    if (PyErr_Occurred()) throw py::error_already_set();
  }

  static bool from_public_api(PyObject* hook) {
    PyObject* flag = PyObject_GetAttr(hook, module_names().from_public_api);
    if (!flag) {
      if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw py::error_already_set();
      PyErr_Clear();
      return false;
    }
    int truth = PyObject_IsTrue(flag);
    Py_DECREF(flag);
    if (truth < 0) throw py::error_already_set();
    return truth == 1;
  }

  // Module._save_to_state_dict.
  void save_local(PyObject* module, const ModuleView& view, PyObject* destination, PyObject* prefix,
                  bool extra_state) {
    // put() may run Python (detach of a tensor subclass).
    for_each_item(view.parameters, [&](PyObject* name, PyObject* value) {
      if (value != Py_None) put(destination, prefix, name, value);
    });
    py::object hold_non_persistent = borrow(view.non_persistent);
    for_each_item(view.buffers, [&](PyObject* name, PyObject* value) {
      if (value == Py_None) return;
      int non_persistent = PySet_Contains(view.non_persistent, name);
      if (non_persistent < 0) throw py::error_already_set();
      if (!non_persistent) put(destination, prefix, name, value);
    });
    if (extra_state) {
      python_called();
      const ModuleNames& n = module_names();
      py::object key = steal(concat(prefix, n.extra_state_suffix));
      py::object state = steal(PyObject_CallMethodNoArgs(module, n.get_extra_state));
      set_item(destination, key.ptr(), state.ptr());
    }
  }

  void put(PyObject* destination, PyObject* prefix, PyObject* name, PyObject* tensor) {
    py::object hold = borrow(tensor);
    py::object key = steal(concat(prefix, name));
    if (keep_) {
      set_item(destination, key.ptr(), tensor);
      return;
    }
    py::object detached;
    if (is_plain_tensor(tensor)) {
      detached = steal(THPVariable_Wrap(detach_shared(THPVariable_Unpack(tensor))));
    } else {
      python_called();
      detached = steal(PyObject_CallMethodNoArgs(tensor, module_names().detach));
    }
    set_item(destination, key.ptr(), detached.ptr());
  }

  static void set_item(PyObject* destination, PyObject* key, PyObject* value) {
    int rc = PyDict_CheckExact(destination) ? PyDict_SetItem(destination, key, value)
                                            : PyObject_SetItem(destination, key, value);
    if (rc != 0) throw py::error_already_set();
  }

  ClassTraitsCache traits_;
  PyObject* keep_vars_;
  py::object keep_vars_obj_;
  bool keep_ = false;
  py::object metadata_;
  PyObject* metadata_owner_ = nullptr;
  bool metadata_valid_ = false;
};

}  // namespace

py::object state_dict(py::handle module, py::object destination, py::str prefix,
                      py::object keep_vars) {
  StateDictWalk walk(keep_vars);
  py::object key = py::reinterpret_steal<py::object>(metadata_key(prefix.ptr()));
  return walk.walk(module.ptr(), std::move(destination), prefix.ptr(), key.ptr());
}

}  // namespace zerockpt
