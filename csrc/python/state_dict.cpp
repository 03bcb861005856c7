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

bool pause_gc = true;  // set_gc_pause: benchmarks measure the walk with the GC running

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
    RecursionGuard depth;
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
    py::object version = version_of(module, view);
    if (PyDict_SetItem(local_metadata.ptr(), n.version_key, version.ptr()) != 0) {
      throw py::error_already_set();
    }
    if (PyObject* metadata = metadata_of(destination.ptr())) {
      set_item(metadata, metadata_key, local_metadata.ptr());
    }
    if (pre_hooks > 0) {
      for_each_hook(module, n.state_dict_pre_hooks, [&](PyObject* hook) {
        steal(PyObject_CallFunctionObjArgs(hook, module, prefix, keep_vars_, nullptr));
      });
    }
    if (traits.custom_save || view.instance_attr(n.save_to_state_dict)) {
      PythonScope scope(*this);
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
    PythonScope scope(*this);
    py::object method = steal(PyObject_GetAttr(module, module_names().state_dict));
    py::dict kwargs;
    kwargs["destination"] = destination;
    kwargs["prefix"] = borrow(prefix);
    kwargs["keep_vars"] = borrow(keep_vars_);
    py::tuple args(0);
    return steal(PyObject_Call(method.ptr(), args.ptr(), kwargs.ptr()));
  }

  // module._version: an int found in the instance dict or the class (no descriptor can run)
  // is read directly; anything else is Python's getattr.
  py::object version_of(PyObject* module, const ModuleView& view) {
    const ModuleNames& n = module_names();
    PyObject* in_class = _PyType_Lookup(Py_TYPE(module), n.version);  // borrowed
    if (in_class && PyLong_CheckExact(in_class)) {
      PyObject* own = view.instance_attr(n.version);
      return borrow(own ? own : in_class);
    }
    PythonScope scope(*this);
    return steal(PyObject_GetAttr(module, n.version));
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

 public:
  // Python's cyclic GC stays off while only this walk allocates (each detached alias and
  // `_metadata` entry counts towards a collection, and the collections it triggers traverse
  // the young objects and, every few calls, the whole heap with the model in it). It is back
  // on, as the caller had it, whenever Python code runs (hooks, overrides, subclasses'
  // detach, a destination that is not a dict), and when the walk ends.
  struct GcPause {
    explicit GcPause(bool want) : paused(want && pause_gc && PyGC_Disable() == 1) {}
    ~GcPause() {
      if (paused) PyGC_Enable();
    }
    GcPause(const GcPause&) = delete;
    GcPause& operator=(const GcPause&) = delete;
    bool paused;
  };

 private:
  // Scope of a call into Python: invalidates cached Python state and resumes the GC.
  class PythonScope {
   public:
    explicit PythonScope(StateDictWalk& walk) : walk_(walk) {
      walk_.python_called();
      if (walk_.gc_ && walk_.gc_->paused) PyGC_Enable();
    }
    ~PythonScope() {
      if (walk_.gc_ && walk_.gc_->paused) PyGC_Disable();
    }
    PythonScope(const PythonScope&) = delete;
    PythonScope& operator=(const PythonScope&) = delete;

   private:
    StateDictWalk& walk_;
  };

  static bool plain_mapping(PyObject* obj) {
    return PyDict_CheckExact(obj) || Py_TYPE(obj) == &PyODict_Type;
  }

  template <typename Fn>
  void for_each_hook(PyObject* module, PyObject* hooks_name, Fn&& fn) {
    PythonScope scope(*this);
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
      PythonScope scope(*this);
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
      PythonScope scope(*this);
      detached = steal(PyObject_CallMethodNoArgs(tensor, module_names().detach));
    }
    set_item(destination, key.ptr(), detached.ptr());
  }

  void set_item(PyObject* destination, PyObject* key, PyObject* value) {
    int rc;
    if (PyDict_CheckExact(destination)) {
      rc = PyDict_SetItem(destination, key, value);
    } else if (Py_TYPE(destination) == &PyODict_Type) {
      rc = PyObject_SetItem(destination, key, value);
    } else {
      PythonScope scope(*this);
      rc = PyObject_SetItem(destination, key, value);
    }
    if (rc != 0) throw py::error_already_set();
  }

  ClassTraitsCache traits_;
  PyObject* keep_vars_;
  py::object keep_vars_obj_;
  bool keep_ = false;
  py::object metadata_;
  PyObject* metadata_owner_ = nullptr;
  bool metadata_valid_ = false;

 public:
  GcPause* gc_ = nullptr;
};

}  // namespace

bool set_gc_pause(bool on) {
  bool was = pause_gc;
  pause_gc = on;
  return was;
}

py::object state_dict(py::handle module, py::object destination, py::str prefix,
                      py::object keep_vars) {
  StateDictWalk walk(keep_vars);
  py::object key = py::reinterpret_steal<py::object>(metadata_key(prefix.ptr()));
  StateDictWalk::GcPause gc(PyDict_CheckExact(destination.ptr()) ||
                            Py_TYPE(destination.ptr()) == &PyODict_Type);
  walk.gc_ = &gc;
  return walk.walk(module.ptr(), std::move(destination), prefix.ptr(), key.ptr());
}

// --- The floor: only the irreducible work of a state_dict ------------------------------------
//
// For benchmarks: the same keys, a detached alias of each tensor (the tensor itself with
// keep_vars), the same OrderedDict and `_metadata` entries, for a tree of plain modules (no
// hooks, overrides or subclasses are looked for: the caller chooses a
// tree that has none). Anything a real walk does beyond this is overhead.
namespace {

void floor_walk(PyObject* module, PyObject* destination, PyObject* metadata, PyObject* prefix,
                PyObject* key, bool keep) {
  const ModuleNames& n = module_names();
  py::object dict = steal(PyObject_GenericGetDict(module, nullptr));
  PyObject* parameters = PyDict_GetItem(dict.ptr(), n.parameters);
  PyObject* buffers = PyDict_GetItem(dict.ptr(), n.buffers);
  PyObject* modules = PyDict_GetItem(dict.ptr(), n.modules);
  PyObject* non_persistent = PyDict_GetItem(dict.ptr(), n.non_persistent);
  if (!parameters || !buffers || !modules || !non_persistent) {
    throw std::runtime_error("not a plain module");
  }
  py::object local = steal(PyDict_New());
  py::object version = steal(PyObject_GetAttr(module, n.version));
  if (PyDict_SetItem(local.ptr(), n.version_key, version.ptr()) != 0 ||
      PyObject_SetItem(metadata, key, local.ptr()) != 0) {
    throw py::error_already_set();
  }
  for (PyObject* registry : {parameters, buffers}) {
    Py_ssize_t pos = 0;
    PyObject* name;
    PyObject* tensor;
    while (PyDict_Next(registry, &pos, &name, &tensor)) {
      if (tensor == Py_None) continue;
      if (registry == buffers && PySet_GET_SIZE(non_persistent) > 0 &&
          PySet_Contains(non_persistent, name) == 1) {
        continue;
      }
      py::object full = steal(PyUnicode_Concat(prefix, name));
      py::object value = keep ? borrow(tensor)
                              : steal(THPVariable_Wrap(detach_shared(THPVariable_Unpack(tensor))));
      if (PyObject_SetItem(destination, full.ptr(), value.ptr()) != 0) {
        throw py::error_already_set();
      }
    }
  }
  Py_ssize_t pos = 0;
  PyObject* name;
  PyObject* child;
  while (PyDict_Next(modules, &pos, &name, &child)) {
    if (child == Py_None) continue;
    py::object child_key = steal(PyUnicode_Concat(prefix, name));
    py::object child_prefix = steal(PyUnicode_Concat(child_key.ptr(), n.dot));
    floor_walk(child, destination, metadata, child_prefix.ptr(), child_key.ptr(), keep);
  }
}

}  // namespace

py::object state_dict_floor(py::handle module, bool keep_vars) {
  static PyObject* ordered_dict =
      py::object(py::module_::import("collections").attr("OrderedDict")).release().ptr();
  py::object destination = steal(PyObject_CallNoArgs(ordered_dict));
  py::object metadata = steal(PyObject_CallNoArgs(ordered_dict));
  if (PyObject_SetAttr(destination.ptr(), module_names().metadata, metadata.ptr()) != 0) {
    throw py::error_already_set();
  }
  int was_enabled = PyGC_Disable();  // the floor pays no cyclic-GC passes
  try {
    floor_walk(module.ptr(), destination.ptr(), metadata.ptr(), module_names().empty,
               module_names().empty, keep_vars);
  } catch (...) {
    if (was_enabled) PyGC_Enable();
    throw;
  }
  if (was_enabled) PyGC_Enable();
  return destination;
}

}  // namespace zerockpt
