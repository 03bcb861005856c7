// zerockpt._C.module_tensors: what save(module) stores, read from the module tree's registries.
//
// torch's state_dict() of a tree without Python customisation is fully determined by the
// registries: per module (in pre-order, a shared module once per path) a `_metadata` entry
// {"version": _version}, then the non-None parameters, then the non-None persistent buffers.
// This walk collects exactly those as C++ keys and at::Tensors (the tensors themselves: the
// writer detaches what it stores), and writes `_metadata` as the JSON text that
// encode_state_dict_metadata (python/zerockpt/_state.py) gives, so that the file is byte for byte
// the one save(state_dict(module)) writes. It gives up (the caller then takes the state-dict
// path) wherever that path could run Python code or would store something else; see
// module_stream.h. Requires GIL throughout; runs no Python code.
#include "python/module_stream.h"

#include <torch/csrc/autograd/python_variable.h>

#include <cstring>
#include <string_view>

#include "python/module_registry.h"
#include "torch/tensor_views.h"

namespace py = pybind11;

namespace zerockpt {
namespace {

// Deeper trees (or cyclic ones, where torch raises RecursionError) take the state-dict path.
constexpr int kMaxDepth = 200;

// The UTF-8 text of an exact str, or nullopt for other objects and strs with lone surrogates.
std::optional<std::string_view> exact_str_utf8(PyObject* obj) {
  if (!PyUnicode_CheckExact(obj)) return std::nullopt;
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj, &size);
  if (!data) {
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) throw py::error_already_set();
    PyErr_Clear();
    return std::nullopt;
  }
  return std::string_view(data, static_cast<size_t>(size));
}

// A registry name as state_dict() joins it: keys stay distinct only if no name is empty or
// holds a '.' (torch's register_* functions refuse both; a registry written directly may not).
std::optional<std::string_view> registry_name(PyObject* name) {
  std::optional<std::string_view> text = exact_str_utf8(name);
  if (!text || text->empty() || text->find('.') != std::string_view::npos) return std::nullopt;
  return text;
}

void append_hex4(std::string& out, uint32_t unit) {
  static const char kHex[] = "0123456789abcdef";
  out += "\\u";
  for (int shift = 12; shift >= 0; shift -= 4) out += kHex[(unit >> shift) & 0xf];
}

// Printable ASCII that json.dumps writes as is.
bool plain_json_char(unsigned char c) { return c >= 0x20 && c < 0x7f && c != '"' && c != '\\'; }

// The two-character JSON escape of `c`, or nullptr.
const char* short_escape(unsigned char c) {
  switch (c) {
    case '"':
      return "\\\"";
    case '\\':
      return "\\\\";
    case '\b':
      return "\\b";
    case '\f':
      return "\\f";
    case '\n':
      return "\\n";
    case '\r':
      return "\\r";
    case '\t':
      return "\\t";
    default:
      return nullptr;
  }
}

// `text` (valid UTF-8) as a JSON string, as Python's json.dumps writes it (ensure_ascii):
// printable ASCII but '"' and '\\' as is, the usual two-character escapes, and everything else
// as \uXXXX of its UTF-16 code units.
void append_json_string(std::string& out, std::string_view text) {
  out += '"';
  size_t i = 0;
  while (i < text.size()) {
    size_t run = i;
    while (run < text.size() && plain_json_char(static_cast<unsigned char>(text[run]))) ++run;
    out.append(text.data() + i, run - i);
    i = run;
    if (i == text.size()) break;
    auto c = static_cast<unsigned char>(text[i]);
    if (const char* escape = short_escape(c)) {
      out += escape;
      ++i;
      continue;
    }
    uint32_t cp = c;
    size_t len = 1;
    if (c >= 0xf0) {
      cp = c & 0x07;
      len = 4;
    } else if (c >= 0xe0) {
      cp = c & 0x0f;
      len = 3;
    } else if (c >= 0xc0) {
      cp = c & 0x1f;
      len = 2;
    }
    for (size_t k = 1; k < len && i + k < text.size(); ++k) {
      cp = (cp << 6) | (static_cast<unsigned char>(text[i + k]) & 0x3f);
    }
    i += len;
    if (cp >= 0x10000) {
      cp -= 0x10000;
      append_hex4(out, 0xd800 | (cp >> 10));
      append_hex4(out, 0xdc00 | (cp & 0x3ff));
    } else {
      append_hex4(out, cp);
    }
  }
  out += '"';
}

// An empty dict (hook registries: anything else takes the state-dict path).
bool empty_dict(PyObject* obj) { return obj && PyDict_Check(obj) && PyDict_GET_SIZE(obj) == 0; }

class ModuleStream {
 public:
  // Adds `module` (reached as `prefix`, "" or "<path>.") and its subtree; false to give up.
  bool visit(PyObject* module, std::string& prefix, int depth) {
    const ModuleNames& n = module_names();
    if (depth > kMaxDepth) return false;
    const ClassTraits& traits = traits_.get(Py_TYPE(module));
    if (traits.custom_state_dict || traits.custom_save || traits.extra_state_getter) return false;
    ModuleView view;
    if (!read_module(module, view)) return false;
    PyObject* pre_hooks = view.instance_attr(n.state_dict_pre_hooks);
    PyObject* post_hooks = view.instance_attr(n.state_dict_hooks);
    // Each registry is an object of its own, on a large model most likely not in the cache:
    // ask for all of them at once rather than one after another.
    for (PyObject* obj : {pre_hooks, post_hooks, view.parameters, view.buffers, view.modules}) {
      if (obj) __builtin_prefetch(obj);
    }
    if (view.instance_attr(n.state_dict) || view.instance_attr(n.save_to_state_dict) ||
        !empty_dict(pre_hooks) || !empty_dict(post_hooks)) {
      return false;
    }
    if (!add_metadata(module, view, prefix)) return false;

    PyObject* name;
    PyObject* value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(view.parameters, &pos, &name, &value)) {
      if (value != Py_None && !add_tensor(prefix, name, value)) return false;
    }
    pos = 0;
    while (PyDict_Next(view.buffers, &pos, &name, &value)) {
      if (value == Py_None) continue;
      if (!PyUnicode_CheckExact(name)) return false;  // before hashing it: no Python code
      int non_persistent = PySet_Contains(view.non_persistent, name);
      if (non_persistent < 0) throw py::error_already_set();
      if (non_persistent) continue;
      // A buffer named as a parameter would replace its value in the dict, keeping its place.
      PyObject* param = PyDict_GetItemWithError(view.parameters, name);
      if (param || PyErr_Occurred()) {
        if (PyErr_Occurred()) throw py::error_already_set();
        if (param != Py_None) return false;
      }
      if (!add_tensor(prefix, name, value)) return false;
    }

    const size_t base = prefix.size();
    pos = 0;
    while (PyDict_Next(view.modules, &pos, &name, &value)) {
      if (value == Py_None) continue;
      std::optional<std::string_view> child = registry_name(name);
      if (!child) return false;
      prefix.append(child->data(), child->size());
      prefix += '.';
      bool ok = visit(value, prefix, depth + 1);
      prefix.resize(base);
      if (!ok) return false;
    }
    return true;
  }

  ModuleTensors finish() {
    ModuleTensors out;
    out.entries = std::move(entries_);
    metadata_ += '}';
    out.metadata_json = std::move(metadata_);
    return out;
  }

 private:
  // `_metadata[prefix[:-1]] = {"version": module._version}`, when _version is an int that
  // state_dict() reads without running code (in the instance dict or the class, no descriptor).
  bool add_metadata(PyObject* module, const ModuleView& view, const std::string& prefix) {
    const ModuleNames& n = module_names();
    PyObject* version = _PyType_Lookup(Py_TYPE(module), n.version);  // borrowed
    if (!version || !PyLong_CheckExact(version)) return false;
    if (PyObject* own = view.instance_attr(n.version)) version = own;
    if (!PyLong_CheckExact(version)) return false;
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(version, &overflow);
    if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (overflow != 0) return false;
    metadata_ += metadata_.empty() ? "{" : ", ";
    append_json_string(metadata_,
                       std::string_view(prefix).substr(0, prefix.empty() ? 0 : prefix.size() - 1));
    metadata_ += ": {\"version\": ";
    metadata_ += std::to_string(value);
    metadata_ += '}';
    return true;
  }

  bool add_tensor(const std::string& prefix, PyObject* name, PyObject* value) {
    std::optional<std::string_view> text = registry_name(name);
    if (!text || !is_plain_tensor(value)) return false;
    const at::Tensor& t = THPVariable_Unpack(value);
    // Other kinds of tensors (sparse, nested, wrappers) are detached by the dispatcher on the
    // state-dict path: they take it.
    if (typeid(*t.unsafeGetTensorImpl()) != typeid(c10::TensorImpl) || t.layout() != at::kStrided) {
      return false;
    }
    std::string key;
    key.reserve(prefix.size() + text->size());
    key.append(prefix).append(text->data(), text->size());
    // A top-level "__metadata__" makes the state dict nested state (structure.py).
    if (prefix.empty() && key == "__metadata__") return false;
    entries_.emplace_back(std::move(key), t);
    return true;
  }

  ClassTraitsCache traits_;
  NamedTensors entries_;
  std::string metadata_;
};

// Counts the Python tensor objects created while _count_tensor_objects runs: the allocation
// functions of torch.Tensor and nn.Parameter are replaced meanwhile. The originals are kept for
// good, since classes derived meanwhile inherit the counting ones.
bool counting = false;
int64_t tensor_objects = 0;
allocfunc tensor_alloc = nullptr;
allocfunc parameter_alloc = nullptr;

PyObject* counting_tensor_alloc(PyTypeObject* type, Py_ssize_t items) {
  if (counting) ++tensor_objects;
  return tensor_alloc(type, items);
}

PyObject* counting_parameter_alloc(PyTypeObject* type, Py_ssize_t items) {
  if (counting) ++tensor_objects;
  return parameter_alloc(type, items);
}

}  // namespace

std::optional<ModuleTensors> module_tensors(py::handle module) {
  // A dispatch mode (or inference mode) sees the state-dict path's detach calls.
  if (!default_dispatch_state()) return std::nullopt;
  ModuleStream stream;
  std::string prefix;
  if (!stream.visit(module.ptr(), prefix, 0)) return std::nullopt;
  return stream.finish();
}

std::shared_ptr<const ModuleTensors> module_tensors_of(py::handle obj) {
  if (!py::isinstance<ModuleTensors>(obj)) return nullptr;
  return obj.cast<std::shared_ptr<ModuleTensors>>();
}

void bind_module_stream(py::module_& m) {
  py::class_<ModuleTensors, std::shared_ptr<ModuleTensors>>(
      m, "_ModuleTensors",
      "What save(module) stores, taken from the registries (module_tensors); the save "
      "functions take it in place of a dict of tensors.")
      .def("__len__", [](const ModuleTensors& s) { return s.entries.size(); })
      // Requires GIL. The state dict's `_metadata` as save() stores it (JSON).
      .def_property_readonly("metadata",
                             [](const ModuleTensors& s) { return py::str(s.metadata_json); })
      // Requires GIL. The flat dict save(state_dict(module)) would write: detached aliases.
      .def("state_dict", [](const ModuleTensors& s) {
        py::dict out;
        for (const auto& [name, t] : s.entries) {
          py::object value = py::reinterpret_steal<py::object>(THPVariable_Wrap(detach_shared(t)));
          if (!value) throw py::error_already_set();
          out[py::str(name)] = value;
        }
        return out;
      });
  // Requires GIL.
  m.def(
      "module_tensors",
      [](py::handle module) -> py::object {
        std::optional<ModuleTensors> out = module_tensors(module);
        if (!out) return py::none();
        return py::cast(std::make_shared<ModuleTensors>(std::move(*out)));
      },
      py::arg("module"),
      "What save(module) stores, read from the registries without a state dict; None where "
      "the tree needs the state-dict path (hooks, overrides, subclasses, odd names).");
  // Requires GIL.
  m.def(
      "_count_tensor_objects",
      [](py::object fn) {
        auto* tensor = reinterpret_cast<PyTypeObject*>(THPVariableClass);
        PyTypeObject* parameter = module_names().parameter_type;
        if (counting) throw py::value_error("_count_tensor_objects does not nest");
        if (!tensor_alloc) {
          tensor_alloc = tensor->tp_alloc;
          parameter_alloc = parameter->tp_alloc;
        }
        tensor->tp_alloc = counting_tensor_alloc;
        parameter->tp_alloc = counting_parameter_alloc;
        counting = true;
        tensor_objects = 0;
        auto restore = [&] {
          counting = false;
          tensor->tp_alloc = tensor_alloc;
          parameter->tp_alloc = parameter_alloc;
        };
        py::object result;
        try {
          result = fn();
        } catch (...) {
          restore();
          throw;
        }
        restore();
        return py::make_tuple(result, tensor_objects);
      },
      py::arg("fn"),
      "Runs fn() and returns (its result, the number of torch.Tensor and nn.Parameter objects "
      "allocated meanwhile, subclasses defined before the call excepted). Testing aid.");
}

}  // namespace zerockpt
