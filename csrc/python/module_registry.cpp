#include "python/module_registry.h"

#include <torch/csrc/autograd/python_variable.h>

namespace py = pybind11;

namespace zerockpt {
namespace {

PyObject* intern(const char* s) {
  PyObject* out = PyUnicode_InternFromString(s);
  if (!out) throw py::error_already_set();
  return out;
}

// A new reference to getattr(obj, name); raises on failure.
PyObject* attr(PyObject* obj, const char* name) {
  PyObject* out = PyObject_GetAttrString(obj, name);
  if (!out) throw py::error_already_set();
  return out;
}

// getattr(cls, name, default) is not default: torch's own test for an overridden method.
bool overrides(PyTypeObject* type, PyObject* name, PyObject* base) {
  PyObject* found = PyObject_GetAttr(reinterpret_cast<PyObject*>(type), name);
  if (!found) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw py::error_already_set();
    PyErr_Clear();
    return false;
  }
  bool out = found != base;
  Py_DECREF(found);
  return out;
}

ModuleNames* make_names() {
  // Leaked on purpose: these live until the interpreter exits and must not be released after
  // it has finalised.
  auto* n = new ModuleNames();
  n->parameters = intern("_parameters");
  n->buffers = intern("_buffers");
  n->modules = intern("_modules");
  n->non_persistent = intern("_non_persistent_buffers_set");
  n->state_dict_hooks = intern("_state_dict_hooks");
  n->state_dict_pre_hooks = intern("_state_dict_pre_hooks");
  n->load_pre_hooks = intern("_load_state_dict_pre_hooks");
  n->load_post_hooks = intern("_load_state_dict_post_hooks");
  n->version = intern("_version");
  n->version_key = intern("version");
  n->metadata = intern("_metadata");
  n->state_dict = intern("state_dict");
  n->save_to_state_dict = intern("_save_to_state_dict");
  n->load_from_state_dict = intern("_load_from_state_dict");
  n->get_extra_state = intern("get_extra_state");
  n->set_extra_state = intern("set_extra_state");
  n->extra_state_suffix = intern("_extra_state");
  n->from_public_api = intern("_from_public_api");
  n->assign_key = intern("assign_to_params_buffers");
  n->detach = intern("detach");
  n->get = intern("get");
  n->dot = intern(".");
  n->empty = intern("");

  py::module_ module_mod = py::module_::import("torch.nn.modules.module");
  n->module_class = attr(module_mod.ptr(), "Module");
  n->incompatible_keys = attr(module_mod.ptr(), "_IncompatibleKeys");
  n->base_state_dict = PyObject_GetAttr(n->module_class, n->state_dict);
  n->base_save_to_state_dict = PyObject_GetAttr(n->module_class, n->save_to_state_dict);
  n->base_load_from_state_dict = PyObject_GetAttr(n->module_class, n->load_from_state_dict);
  n->base_get_extra_state = PyObject_GetAttr(n->module_class, n->get_extra_state);
  n->base_set_extra_state = PyObject_GetAttr(n->module_class, n->set_extra_state);
  if (!n->base_state_dict || !n->base_save_to_state_dict || !n->base_load_from_state_dict ||
      !n->base_get_extra_state || !n->base_set_extra_state) {
    throw py::error_already_set();
  }
  // Functions as defined in the classes' own dicts (None if a torch version lacks them).
  auto own_function = [](const char* module_name, const char* class_name, PyObject* name) {
    py::object cls = py::module_::import(module_name).attr(class_name);
    PyObject* dict = reinterpret_cast<PyTypeObject*>(cls.ptr())->tp_dict;
    PyObject* fn = dict ? PyDict_GetItemWithError(dict, name) : nullptr;
    if (!fn && PyErr_Occurred()) throw py::error_already_set();
    if (!fn) fn = Py_None;
    Py_INCREF(fn);
    return fn;
  };
  n->norm_load_from_state_dict =
      own_function("torch.nn.modules.batchnorm", "_NormBase", n->load_from_state_dict);
  n->instance_norm_load_from_state_dict =
      own_function("torch.nn.modules.instancenorm", "_InstanceNorm", n->load_from_state_dict);
  n->tensor_type = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  n->parameter_class = attr(py::module_::import("torch.nn.parameter").ptr(), "Parameter");
  n->parameter_type = reinterpret_cast<PyTypeObject*>(n->parameter_class);
  return n;
}

}  // namespace

const ModuleNames& module_names() {
  static ModuleNames* names = make_names();
  return *names;
}

const ClassTraits& ClassTraitsCache::get(PyTypeObject* type) {
  auto it = cache_.find(type);
  if (it != cache_.end()) return it->second;
  const ModuleNames& n = module_names();
  ClassTraits t;
  t.custom_state_dict = overrides(type, n.state_dict, n.base_state_dict);
  t.custom_save = overrides(type, n.save_to_state_dict, n.base_save_to_state_dict);
  t.extra_state_getter = overrides(type, n.get_extra_state, n.base_get_extra_state);
  t.custom_load = overrides(type, n.load_from_state_dict, n.base_load_from_state_dict);
  if (t.custom_load && n.norm_load_from_state_dict != Py_None &&
      n.instance_norm_load_from_state_dict != Py_None) {
    // Every definition along the MRO (what super() calls reach) must be one of torch's.
    t.versioned_norm_load = true;
    PyObject* mro = type->tp_mro;
    for (Py_ssize_t i = 0; mro && i < PyTuple_GET_SIZE(mro); ++i) {
      PyObject* dict = reinterpret_cast<PyTypeObject*>(PyTuple_GET_ITEM(mro, i))->tp_dict;
      PyObject* fn = dict ? PyDict_GetItemWithError(dict, n.load_from_state_dict) : nullptr;
      if (!fn && PyErr_Occurred()) throw py::error_already_set();
      if (fn && fn != n.norm_load_from_state_dict && fn != n.instance_norm_load_from_state_dict &&
          fn != n.base_load_from_state_dict) {
        t.versioned_norm_load = false;
        break;
      }
    }
    if (!mro) t.versioned_norm_load = false;
  }
  t.extra_state_setter = overrides(type, n.set_extra_state, n.base_set_extra_state);
  return cache_.emplace(type, t).first->second;
}

PyObject* ModuleView::instance_attr(PyObject* name) const {
  PyObject* out = PyDict_GetItemWithError(dict, name);
  if (!out && PyErr_Occurred()) throw py::error_already_set();
  return out;
}

Py_ssize_t ModuleView::hook_count(PyObject* name) const {
  PyObject* hooks = instance_attr(name);
  if (!hooks || !PyDict_Check(hooks)) return -1;
  return PyDict_GET_SIZE(hooks);
}

bool read_module(PyObject* module, ModuleView& view) {
  const ModuleNames& n = module_names();
  Py_XDECREF(view.dict);
  view.dict = PyObject_GenericGetDict(module, nullptr);
  if (!view.dict) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw py::error_already_set();
    PyErr_Clear();
    return false;
  }
  view.parameters = view.instance_attr(n.parameters);
  view.buffers = view.instance_attr(n.buffers);
  view.modules = view.instance_attr(n.modules);
  view.non_persistent = view.instance_attr(n.non_persistent);
  // Exact types only: torch reads registries through their methods (items(), `in`), which an
  // OrderedDict (move_to_end) or a subclass may answer otherwise than PyDict_Next/PySet_Contains.
  return view.parameters && PyDict_CheckExact(view.parameters) && view.buffers &&
         PyDict_CheckExact(view.buffers) && view.modules && PyDict_CheckExact(view.modules) &&
         view.non_persistent &&
         (PySet_CheckExact(view.non_persistent) || PyFrozenSet_CheckExact(view.non_persistent));
}

PyObject* metadata_key(PyObject* prefix) {
  Py_ssize_t len = PyUnicode_GET_LENGTH(prefix);
  if (len == 0) {
    Py_INCREF(prefix);
    return prefix;
  }
  PyObject* out = PyUnicode_Substring(prefix, 0, len - 1);
  if (!out) throw py::error_already_set();
  return out;
}

PyObject* concat(PyObject* a, PyObject* b) {
  PyObject* out = PyUnicode_Concat(a, b);
  if (!out) throw py::error_already_set();
  return out;
}

bool is_plain_tensor(PyObject* obj) {
  const ModuleNames& n = module_names();
  PyTypeObject* t = Py_TYPE(obj);
  return t == n.tensor_type || t == n.parameter_type;
}

}  // namespace zerockpt
