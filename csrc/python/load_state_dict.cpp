// zerockpt._C.load_state_dict: torch's nn.Module.load_state_dict() walk, done from C++.
//
// Keys are grouped by module prefix once per level (torch filters the whole remaining dict for
// every child, which is quadratic). Each module then does what Module._load_from_state_dict
// does, in the same order, appending to the same missing/unexpected/error lists; modules that
// customise loading in Python (an overridden _load_from_state_dict, load pre-hooks, tensor
// subclasses) get torch's own call with the dict torch would pass them. From a file, tensors
// are not materialised: their bytes are queued into a LoadPlan that reads them straight into
// the parameters, run without the GIL before any Python code could observe the parameters.
// Requires GIL, except where it is released around LoadPlan::run and large copies.
#include "python/load_state_dict.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <variant>

#include "core/hash.h"
#include "python/interrupt.h"
#include "python/module_registry.h"
#include "torch/device_staging.h"
#include "torch/dtypes.h"
#include "torch/load_into.h"
#include "torch/tensor_views.h"
#include "zerockpt/errors.h"

namespace py = pybind11;

namespace zerockpt {
namespace {

constexpr uint64_t kReleaseGilBytes = 1ull << 20;

py::object steal(PyObject* obj) {
  if (!obj) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(obj);
}

py::object borrow(PyObject* obj) { return py::reinterpret_borrow<py::object>(obj); }

// UTF-8 text of a str, kept alive by the str itself; nullopt for strs holding lone surrogates
// (valid Python, not valid UTF-8), which callers encode with surrogatepass instead.
std::optional<std::string_view> utf8_if_valid(PyObject* str) {
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(str, &size);
  if (data) return std::string_view(data, static_cast<size_t>(size));
  if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) throw py::error_already_set();
  PyErr_Clear();
  return std::nullopt;
}

// Inverse of the surrogatepass encoding used for keys.
py::object make_str(std::string_view s) {
  return steal(PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "surrogatepass"));
}

// torch.Size.__repr__.
void append(const py::list& list, const py::object& item) {
  if (PyList_Append(list.ptr(), item.ptr()) != 0) throw py::error_already_set();
}

// Requires GIL. A warning that torch's load_state_dict emits, emitted from where torch emits
// it (zerockpt._torch_warnings): same category and text, module torch.nn.modules.module, so
// that filters written for torch's apply. `site`: "copy" (param.copy_), "meta" or "norm_meta"
// (the no-op copy into a meta parameter, called from Module.load_state_dict or from torch's norm
// layers' _load_from_state_dict).
void warn_as_torch(const std::string& message, bool deprecation, const char* site) {
  // Kept for the process (never decref'd: it may be used during interpreter exit).
  static PyObject* warn =
      py::object(py::module_::import("zerockpt._torch_warnings").attr("warn_as_torch"))
          .release()
          .ptr();
  PyObject* category = deprecation ? PyExc_DeprecationWarning : PyExc_UserWarning;
  py::handle function(warn);
  function(message, py::handle(category), site);
}

// Collects TORCH_WARN on this thread (e.g. copy_ casting complex to real, perhaps with the
// GIL released), for flush() to emit with the GIL held, each distinct warning once per flush.
class TorchWarnings : public c10::WarningHandler {
 public:
  void process(const c10::Warning& warning) override { pending_.push_back(warning); }
  // Requires GIL. Raises what a warnings filter turned into an error.
  void flush() {
    std::vector<c10::Warning> batch;
    batch.swap(pending_);
    std::vector<std::pair<std::string, bool>> seen;
    for (const c10::Warning& w : batch) {
      bool deprecation = std::holds_alternative<c10::Warning::DeprecationWarning>(w.type());
      // The text torch::PyWarningHandler gives it.
      std::string text = torch::processErrorMsg(w.msg());
      const c10::SourceLocation& where = w.source_location();
      if (!w.verbatim() && where.file != nullptr) {
        text += std::string(" (Triggered internally at ") + where.file + ":" +
                std::to_string(where.line) + ".)";
      }
      std::pair<std::string, bool> id{std::move(text), deprecation};
      if (std::find(seen.begin(), seen.end(), id) != seen.end()) continue;
      seen.push_back(id);
      warn_as_torch(id.first, deprecation, "copy");
    }
  }

 private:
  std::vector<c10::Warning> pending_;
};

// Refuses, naming `key`, what torch's own load would crash on or fail inside with "Internal
// error": a nested tensor (torch cannot even report its sizes) or a view larger than its storage
// (copy_ would read or write past it). Other kinds (zero tensors, subclasses, meta) are left to
// copy_, which loads from zero tensors and reports the rest as torch does. Returns whether `t`
// has no memory_problem at all (its bytes can be read or written in place).
bool check_loadable(std::string_view key, const at::Tensor& t, const char* role) {
  if (!t.defined() || t.is_meta()) return false;
  auto problem = memory_problem(t);
  if (!problem) return true;
  if (problem->type_error && !t.is_nested()) return false;
  std::string what = std::string(role) + " for key " + quote(std::string(key));
  if (problem->type_error) throw DtypeError(what + " " + problem->why);
  throw UsageError(what + " " + problem->why);
}

// One state-dict entry: a Python value, or a file tensor whose bytes have not been read.
struct Entry {
  py::object key;
  std::string_view name;                 // UTF-8 of key, valid while key lives
  py::object value;                      // set for dict sources and materialised file tensors
  const TensorRecord* record = nullptr;  // file tensor still to be read (value unset)
};

using Entries = std::vector<Entry*>;

// Positions of names appended in order (the first of equal names wins, as in a dict). A module
// has few children and tensors as a rule: a linear search, with a hash index past kLinear.
class NameIndex {
 public:
  void clear() {
    names_.clear();
    map_.clear();
  }
  size_t size() const { return names_.size(); }
  std::string_view name(size_t i) const { return names_[i]; }

  void push_back(std::string_view name) {
    names_.push_back(name);
    if (names_.size() == kLinear + 1) {
      for (size_t i = 0; i < names_.size(); ++i) map_.emplace(names_[i], i);
    } else if (names_.size() > kLinear + 1) {
      map_.emplace(name, names_.size() - 1);
    }
  }

  std::optional<size_t> find(std::string_view name) const {
    if (names_.size() <= kLinear) {
      for (size_t i = 0; i < names_.size(); ++i) {
        if (names_[i] == name) return i;
      }
      return std::nullopt;
    }
    auto it = map_.find(name);
    if (it == map_.end()) return std::nullopt;
    return it->second;
  }

 private:
  static constexpr size_t kLinear = 16;
  std::vector<std::string_view> names_;
  SeededMap<std::string_view, size_t> map_;  // past kLinear names
};

// A module's entries split by what follows its prefix: a local name, or a child's name. One
// per depth of the walk, reused module after module (clear() keeps the vectors' memory).
class Partition {
 public:
  std::vector<std::pair<std::string_view, Entry*>> local;  // rest has no '.'
  // Entries in order with their local index (>= 0) or ~group index (< 0).
  std::vector<std::pair<Entry*, long>> order;

  void clear() {
    local.clear();
    local_names_.clear();
    order.clear();
    for (size_t g = 0; g < group_names_.size(); ++g) groups_[g].clear();
    group_names_.clear();
  }

  // Adds the entries under `prefix` (after clear()). `all_under`: every entry's name is known
  // to start with prefix (a parent's group), so only what follows it is read.
  void fill(const Entries& entries, std::string_view prefix, bool all_under) {
    order.reserve(entries.size());
    for (Entry* e : entries) {
      if (!all_under &&
          (e->name.size() < prefix.size() || e->name.compare(0, prefix.size(), prefix) != 0)) {
        continue;
      }
      std::string_view rest = e->name.substr(prefix.size());
      size_t dot = rest.find('.');
      if (dot == std::string_view::npos) {
        order.emplace_back(e, static_cast<long>(local.size()));
        local.emplace_back(rest, e);
        local_names_.push_back(rest);
        continue;
      }
      size_t g = group_of(rest.substr(0, dot));
      groups_[g].push_back(e);
      order.emplace_back(e, ~static_cast<long>(g));
    }
  }

  // The local entry named `name`, or nullptr.
  Entry* find_local(std::string_view name) const {
    auto i = local_names_.find(name);
    return i ? local[*i].second : nullptr;
  }

  // Groups: the entries under "<child>.", per child name, in order of first appearance.
  size_t group_count() const { return group_names_.size(); }
  std::string_view group_name(size_t g) const { return group_names_.name(g); }
  const Entries& group(size_t g) const { return groups_[g]; }
  // The group of the child named `child`, if it has entries.
  std::optional<size_t> find_group(std::string_view child) const {
    return group_names_.find(child);
  }

 private:
  // The group of `child`, a new one if it has none yet.
  size_t group_of(std::string_view child) {
    size_t count = group_names_.size();
    // Keys of one child come one after another as a rule: the last group first.
    if (count != 0 && group_names_.name(count - 1) == child) return count - 1;
    if (auto g = group_names_.find(child)) return *g;
    group_names_.push_back(child);
    if (groups_.size() == count) groups_.emplace_back();
    return count;
  }

  NameIndex local_names_;  // of `local`
  NameIndex group_names_;
  std::vector<Entries> groups_;  // [0, group_count()) in use; the rest keep their memory
};

// Holds its name and value, as torch's local_state dict does: hooks, assign and set_extra_state
// may replace or drop registry entries while the module is loaded.
struct LocalTensor {
  LocalTensor(PyObject* name_, std::string_view name_utf8_, PyObject* value_)
      : name(name_),
        name_utf8(name_utf8_),
        value(value_),
        hold_name(borrow(name_)),
        hold_value(borrow(value_)) {}
  void set_value(PyObject* v) {
    hold_value = borrow(v);
    value = v;
  }
  PyObject* name;
  std::string_view name_utf8;  // valid while `name` lives
  PyObject* value;
  py::object hold_name;
  py::object hold_value;
};

// A module's prefix as a str, made on first use: "" for the root, else its key + ".".
class LazyPrefix {
 public:
  LazyPrefix(PyObject* key, bool root) : key_(key), root_(root) {}
  PyObject* get() {
    if (!str_) {
      str_ = root_ ? borrow(module_names().empty) : steal(concat(key_, module_names().dot));
    }
    return str_.ptr();
  }

 private:
  PyObject* key_;
  bool root_;
  py::object str_;
};

// ++depth for its lifetime.
class Deeper {
 public:
  explicit Deeper(size_t& depth) : depth_(depth) { ++depth_; }
  ~Deeper() { --depth_; }
  Deeper(const Deeper&) = delete;
  Deeper& operator=(const Deeper&) = delete;

 private:
  size_t& depth_;
};

class LoadWalk {
 public:
  // `assign` is stored into each module's local metadata as given, as torch does.
  // Warnings of copy_ and the meta no-op go out through `warnings` (may be null: at once).
  void set_warnings(TorchWarnings* warnings) { warnings_ = warnings; }

  LoadWalk(py::object metadata, py::object assign, std::shared_ptr<CheckpointFile> file,
           unsigned threads, Progress* progress, uint64_t staging_bytes)
      : metadata_(std::move(metadata)),
        assign_(std::move(assign)),
        file_(std::move(file)),
        progress_(progress),
        threads_(threads),
        staging_bytes_(staging_bytes) {
    int truth = PyObject_IsTrue(assign_.ptr());
    if (truth < 0) throw py::error_already_set();
    assign_set_ = truth == 1;
    if (file_) plan_.emplace(*file_, threads, progress, staging_bytes);
  }

  Entry* new_entry() { return &arena_.emplace_back(); }

  // Bytes to group and match names by: UTF-8, or for strs with lone surrogates their
  // surrogatepass encoding (still prefix-free by code point), kept here.
  std::string_view key_text(PyObject* str) {
    if (auto text = utf8_if_valid(str)) return *text;
    py::object bytes = steal(PyUnicode_AsEncodedString(str, "utf-8", "surrogatepass"));
    return texts_.emplace_back(PyBytes_AS_STRING(bytes.ptr()),
                               static_cast<size_t>(PyBytes_GET_SIZE(bytes.ptr())));
  }

  // Loads `module`, whose prefix is in path_ (its text, as key_text gives it: "" for the
  // root, else "<metadata_key>."). `given`: the entries under it (the caller's; read only).
  void load(PyObject* module, const Entries& given, PyObject* metadata_key, bool root) {
    RecursionGuard depth;
    const ModuleNames& n = module_names();
    py::object hold_module = borrow(module);
    py::object local_metadata = metadata_for(metadata_key);
    ModuleView view;
    // Modules without torch's registries in their instance dict (TorchScript modules keep
    // wrappers there) go through torch's code and generic attribute access throughout.
    const bool readable = read_module(module, view);
    const ClassTraits& traits = traits_.get(Py_TYPE(module));
    // The prefix as a str, made only for what needs one (torch's loader, missing keys).
    LazyPrefix prefix{metadata_key, root};
    const size_t prefix_size = path_.size();
    std::string_view prefix_utf8(path_);  // valid until the children extend path_

    const bool custom_load =
        traits.custom_load && !(traits.versioned_norm_load && current_version(local_metadata));
    bool delegate = !readable || custom_load || view.instance_attr(n.load_from_state_dict) ||
                    view.hook_count(n.load_pre_hooks) != 0;
    if (depth_ == partitions_.size()) {
      partitions_.emplace_back();
      local_states_.emplace_back();
    }
    Partition& parts = partitions_[depth_];
    std::vector<LocalTensor>& local_state = local_states_[depth_];
    Deeper deeper(depth_);
    parts.clear();
    local_state.clear();
    if (!delegate) delegate = !collect_local_state(view, local_state);
    const Entries* entries = &given;
    Entries edited;  // what torch's loader (its hooks) left in the dict, when delegated
    if (!delegate) {
      parts.fill(*entries, prefix_utf8, /*all_under=*/!root);
      for (const auto& [name, e] : parts.local) {
        if (!e->record && !is_plain_tensor(e->value.ptr())) delegate = true;
      }
    }
    if (delegate) {
      check_delegated(readable ? &view : nullptr, *entries, prefix_utf8);
      edited = call_torch_loader(module, *entries, prefix.get(), local_metadata, root);
      entries = &edited;
      parts.clear();
      parts.fill(*entries, prefix_utf8, /*all_under=*/false);
    } else {
      // Through a norm layer's override, torch's meta warning comes from its super() call.
      meta_site_ = traits.custom_load ? "norm_meta" : "meta";
      load_local(module, view, traits, parts, local_state, prefix, local_metadata);
    }

    // Children, each with the entries under "<prefix><name>." (grouped once, above).
    const Entries none;
    for_each_child(module, readable ? view.modules : nullptr, [&](PyObject* name, PyObject* child) {
      std::string_view name_utf8 = key_text(name);
      path_.resize(prefix_size);
      path_.append(name_utf8);
      // The child's key: the name itself under the root, else decoded from its text (what
      // concatenating the strs gives: key_text encodes code point by code point).
      py::object child_key = root ? borrow(name) : make_str(path_);
      path_.push_back('.');
      // Each child reads its own group: what its hooks edit is a dict of its own
      // (call_torch_loader), as torch gives each child a filtered copy.
      auto g = parts.find_group(name_utf8);
      load(child, g ? parts.group(*g) : none, child_key.ptr(), false);
    });
    path_.resize(prefix_size);

    if (!readable || view.hook_count(n.load_post_hooks) != 0) run_post_hooks(module);
  }

  // fn(name, child) for each child that is not None, in registration order: from the
  // registry dict when given, else from `module._modules.items()`.
  template <typename Fn>
  void for_each_child(PyObject* module, PyObject* modules, Fn&& fn) {
    if (modules) {
      for_each_item(modules, [&](PyObject* name, PyObject* child) {
        if (child != Py_None) fn(name, child);
      });
      return;
    }
    py::object registry = steal(PyObject_GetAttr(module, module_names().modules));
    py::object items = steal(PyObject_CallMethod(registry.ptr(), "items", nullptr));
    py::object it = steal(PyObject_GetIter(items.ptr()));
    while (PyObject* item_raw = PyIter_Next(it.ptr())) {
      py::object item = steal(item_raw);
      if (!PyTuple_Check(item.ptr()) || PyTuple_GET_SIZE(item.ptr()) != 2) {
        throw py::type_error("_modules.items() must yield (name, module) pairs");
      }
      PyObject* child = PyTuple_GET_ITEM(item.ptr(), 1);
      if (child != Py_None) fn(PyTuple_GET_ITEM(item.ptr(), 0), child);
    }
    if (PyErr_Occurred()) throw py::error_already_set();
  }

  // check_loadable for what torch's code will copy in a module it loads: the dict values of its
  // own keys and its registered tensors (when `view` can be read).
  void check_delegated(const ModuleView* view, const Entries& entries, std::string_view prefix) {
    for (const Entry* e : entries) {
      if (!e->value || !THPVariable_Check(e->value.ptr())) continue;
      if (e->name.substr(0, prefix.size()) != prefix) continue;
      if (e->name.find('.', prefix.size()) != std::string_view::npos) continue;
      check_loadable(e->name, THPVariable_Unpack(e->value.ptr()), "the value");
    }
    if (!view) return;
    for (PyObject* registry : {view->parameters, view->buffers}) {
      PyObject* name;
      PyObject* value;
      Py_ssize_t pos = 0;
      while (PyDict_Next(registry, &pos, &name, &value)) {
        if (!THPVariable_Check(value) || !PyUnicode_Check(name)) continue;
        std::string key = std::string(prefix) + std::string(key_text(name));
        check_loadable(key, THPVariable_Unpack(value), "the model's tensor");
      }
    }
  }

  // Runs queued file reads (releases GIL).
  void flush() {
    if (!plan_ || plan_->empty()) return;
    // Safe without the GIL: the plan holds C++ references to the target tensors and the file.
    py::gil_scoped_release no_gil;
    plan_->run();
  }

  py::list missing_keys;
  py::list unexpected_keys;
  py::list error_msgs;

 private:
  // Whether torch's norm layers' migrations are no-ops for this entry: local_metadata is a dict
  // whose "version" is an int >= 2 (what they test with `.get("version", None)`).
  static bool current_version(const py::object& local_metadata) {
    if (!PyDict_CheckExact(local_metadata.ptr())) return false;
    PyObject* version = PyDict_GetItemWithError(local_metadata.ptr(), module_names().version_key);
    if (!version) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return false;
    }
    if (!PyLong_CheckExact(version)) return false;
    int overflow = 0;
    long value = PyLong_AsLongAndOverflow(version, &overflow);
    if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
    return overflow > 0 || (overflow == 0 && value >= 2);
  }

  // metadata.get(prefix[:-1], {}), with assign_to_params_buffers set as torch sets it.
  py::object metadata_for(PyObject* key) {
    py::object out;
    if (metadata_.is_none()) {
      out = steal(PyDict_New());
    } else if (PyDict_CheckExact(metadata_.ptr()) || PyODict_CheckExact(metadata_.ptr())) {
      PyObject* found = PyDict_GetItemWithError(metadata_.ptr(), key);
      if (!found && PyErr_Occurred()) throw py::error_already_set();
      out = found ? borrow(found) : steal(PyDict_New());
    } else {
      py::object empty = steal(PyDict_New());
      out = steal(PyObject_CallMethodObjArgs(metadata_.ptr(), module_names().get, key, empty.ptr(),
                                             nullptr));
    }
    if (assign_set_ && PyObject_SetItem(out.ptr(), module_names().assign_key, assign_.ptr()) != 0) {
      throw py::error_already_set();
    }
    return out;
  }

  // {k: v for k, v in chain(_parameters.items(), persistent buffers) if v is not None}; false
  // if any of them is not a plain tensor (torch's code handles those).
  bool collect_local_state(const ModuleView& view, std::vector<LocalTensor>& out) {
    PyObject* name;
    PyObject* value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(view.parameters, &pos, &name, &value)) {
      if (value == Py_None) continue;
      if (!is_plain_tensor(value) || !PyUnicode_Check(name)) return false;
      out.emplace_back(name, key_text(name), value);
    }
    size_t params = out.size();
    pos = 0;
    while (PyDict_Next(view.buffers, &pos, &name, &value)) {
      if (value == Py_None) continue;
      int non_persistent = PySet_Contains(view.non_persistent, name);
      if (non_persistent < 0) throw py::error_already_set();
      if (non_persistent) continue;
      if (!is_plain_tensor(value) || !PyUnicode_Check(name)) return false;
      std::string_view n = key_text(name);
      bool replaced = false;
      for (size_t i = 0; i < params; ++i) {
        if (out[i].name_utf8 == n) {  // a dict merge keeps the first position, last value
          out[i].set_value(value);
          replaced = true;
        }
      }
      if (!replaced) out.emplace_back(name, n, value);
    }
    return true;
  }

  // Module._load_from_state_dict for a module without Python customisation.
  void load_local(PyObject* module, const ModuleView& view, const ClassTraits& traits,
                  const Partition& parts, const std::vector<LocalTensor>& local_state,
                  LazyPrefix& prefix, const py::object& local_metadata) {
    const ModuleNames& n = module_names();
    bool assign = assign_requested(local_metadata);
    for (const LocalTensor& t : local_state) {
      Entry* e = parts.find_local(t.name_utf8);
      if (!e) {
        append(missing_keys, steal(concat(prefix.get(), t.name)));
        continue;
      }
      load_tensor(module, t, *e, assign);
    }

    std::string_view extra = "_extra_state";
    Entry* extra_entry = parts.find_local(extra);
    if (traits.extra_state_setter) {
      if (extra_entry) {
        flush();
        py::object value = materialise(*extra_entry);
        steal(PyObject_CallMethodObjArgs(module, n.set_extra_state, value.ptr(), nullptr));
      } else {
        append(missing_keys, steal(concat(prefix.get(), n.extra_state_suffix)));
      }
    } else if (extra_entry) {
      append(unexpected_keys, extra_entry->key);
    }

    // Unexpected: local names that are not parameters or persistent buffers, and keys under a
    // name that is not a child (a child registered as None counts as one).
    std::vector<bool> group_is_child(parts.group_count(), false);
    if (parts.group_count() != 0) mark_children(view.modules, parts, group_is_child);
    for (const auto& [e, where] : parts.order) {
      if (where >= 0) {
        std::string_view name = parts.local[static_cast<size_t>(where)].first;
        if (name == extra) continue;
        bool known = false;
        for (const LocalTensor& t : local_state) known = known || t.name_utf8 == name;
        if (!known) append(unexpected_keys, e->key);
      } else if (!group_is_child[static_cast<size_t>(~where)]) {
        append(unexpected_keys, e->key);
      }
    }
  }

  // is_child[g] = `name in modules` for each group's child name.
  void mark_children(PyObject* modules, const Partition& parts, std::vector<bool>& is_child) {
    // By the names' text while every key is an exact str (which compares by value and nothing
    // else); otherwise dict membership, as torch tests it.
    PyObject* name;
    PyObject* child;
    Py_ssize_t pos = 0;
    while (PyDict_Next(modules, &pos, &name, &child)) {
      if (!PyUnicode_CheckExact(name)) {
        for (size_t g = 0; g < parts.group_count(); ++g) {
          py::object key = make_str(parts.group_name(g));
          int has = PyDict_Contains(modules, key.ptr());
          if (has < 0) throw py::error_already_set();
          is_child[g] = has == 1;
        }
        return;
      }
      if (auto g = parts.find_group(key_text(name))) is_child[*g] = true;
    }
  }

  bool assign_requested(const py::object& local_metadata) {
    PyObject* flag;
    py::object hold;
    if (PyDict_Check(local_metadata.ptr())) {
      flag = PyDict_GetItemWithError(local_metadata.ptr(), module_names().assign_key);
      if (!flag && PyErr_Occurred()) throw py::error_already_set();
    } else {
      hold = steal(PyObject_CallMethodObjArgs(local_metadata.ptr(), module_names().get,
                                              module_names().assign_key, Py_False, nullptr));
      flag = hold.ptr();
    }
    if (!flag) return false;
    int truth = PyObject_IsTrue(flag);
    if (truth < 0) throw py::error_already_set();
    return truth == 1;
  }

  // One parameter or buffer: the body of torch's loop over local_state.
  void load_tensor(PyObject* module, const LocalTensor& t, Entry& e, bool assign) {
    const at::Tensor& param = THPVariable_Unpack(t.value);
    // Whether param and input have memory of their own (memory_problem), computed once here.
    bool param_sound = check_loadable(e.name, param, "the model's tensor");
    bool input_sound = false;
    const bool from_file = e.record && !e.value;
    std::vector<int64_t> file_shape;
    at::Tensor input;
    py::object input_obj;
    if (from_file) {
      file_shape = torch_sizes(*e.record, file_->file().path());
      // Backward compatibility as in torch: a (1,) value loads into a 0-dim tensor.
      if (param.dim() == 0 && file_shape.size() == 1 && file_shape[0] == 1) file_shape.clear();
    } else {
      input_obj = e.value;
      input = THPVariable_Unpack(input_obj.ptr());
      input_sound = check_loadable(e.name, input, "the value");
      if (param.dim() == 0 && input.dim() == 1 && input.size(0) == 1) {
        input = input.select(0, 0);  // input_param[0]
        input_obj = steal(THPVariable_Wrap(input));
        input_sound = !memory_problem(input);
      }
    }
    c10::IntArrayRef input_shape = from_file ? c10::IntArrayRef(file_shape) : input.sizes();
    if (input_shape != param.sizes()) {
      append(error_msgs,
             make_str(size_mismatch_message(std::string(e.name), input_shape, param.sizes())));
      return;
    }
    if (param.is_meta() && (from_file || !input.is_meta()) && !assign) {
      std::string msg = "for " + std::string(e.name) +
                        ": copying from a non-meta parameter in the checkpoint to a meta "
                        "parameter in the current model, which is a no-op. (Did you mean to "
                        "pass `assign=True` to assign items in the state dictionary to their "
                        "corresponding key in the module instead of copying them in place?)";
      if (warnings_) warnings_->flush();  // earlier warnings first, as torch emits them
      warn_as_torch(msg, /*deprecation=*/false, meta_site_);
      // A warnings filter is Python code, which may have changed the tensors.
      param_sound = !memory_problem(param);
      input_sound = input.defined() && !memory_problem(input);
    }
    if (from_file && !assign && !param.is_inference() && !converts_complex(*e.record, param) &&
        (param.is_meta() || param_sound) &&
        at::has_internal_overlap(param) != at::MemOverlap::Yes) {
      if (plan_->conflicts(param)) flush();
      plan_->add(param, *e.record);
      param.unsafeGetTensorImpl()->bump_version();  // once, as copy_ does
      return;
    }
    if (from_file) {
      flush();
      input_obj = materialise(e);
      input = THPVariable_Unpack(input_obj.ptr());
      if (param.dim() == 0 && input.dim() == 1) {
        input = input.select(0, 0);
        input_obj = steal(THPVariable_Wrap(input));
      }
      input_sound = !memory_problem(input);
    }
    if (assign) {
      assign_tensor(module, t, e, input_obj);
    } else {
      copy_tensor(t, e, param, input, input_obj, param_sound, input_sound);
    }
  }

  // Casting complex to real warns once per process inside copy_: keep it on this thread,
  // where the warning reaches Python.
  static bool converts_complex(const TensorRecord& r, const at::Tensor& param) {
    auto stored = to_scalar_type(r.dtype);
    return stored && at::isComplexType(*stored) && !param.is_complex();
  }

  // `param_sound`, `input_sound`: neither has a memory_problem.
  void copy_tensor(const LocalTensor& t, const Entry& e, const at::Tensor& param,
                   const at::Tensor& input, const py::object& input_obj, bool param_sound,
                   bool input_sound) {
    if (plan_ && !plan_->empty() && plan_->conflicts(param)) flush();
    static const std::string kWhat = "loading a state dict";
    if (progress_) progress_->check(kWhat);
    try {
      c10::AutoGradMode no_grad(false);
      if (progress_) progress_->add(static_cast<uint64_t>(input.numel()) * input.element_size());
      const bool sound = param_sound && input_sound;
      if (stages_copy(param, input, sound)) {
        {
          // Safe without the GIL: both tensors are held by C++ references.
          py::gil_scoped_release no_gil;
          copy_host_to_device(param, input, threads_, staging_bytes_);
        }
        param.unsafeGetTensorImpl()->bump_version();  // once, as copy_ does
      } else if (!copy_plain(param, input, sound)) {
        uint64_t nbytes = static_cast<uint64_t>(param.numel()) * param.element_size();
        if (nbytes >= kReleaseGilBytes) {
          // Safe without the GIL: both tensors are held by C++ references.
          py::gil_scoped_release no_gil;
          param.copy_(input);
        } else {
          param.copy_(input);
        }
      }
    } catch (const std::exception&) {
      // Let torch raise its own exception, so the message quotes the same ex.args.
      c10::AutoGradMode no_grad(false);
      py::object result = py::reinterpret_steal<py::object>(
          PyObject_CallMethod(t.value, "copy_", "O", input_obj.ptr()));
      if (result) return;  // cannot happen unless the C++ failure was transient
      record_copy_error(e, THPVariable_Unpack(t.value), input);
    }
    if (warnings_) warnings_->flush();
  }

  // Device parameters take dense host tensors (a file's mapped tensors, from a sharded
  // checkpoint or a loaded dict) through the pinned staging pool, not copy_'s transfer from
  // pageable memory. Plain tensors of equal shape only; copy_ keeps every other case.
  // `sound`: neither dst nor src has a memory_problem.
  static bool stages_copy(const at::Tensor& dst, const at::Tensor& src, bool sound) {
    if (!is_staged(dst) || !src.is_cpu() || src.numel() == 0 || dst.sizes() != src.sizes() ||
        !src.is_contiguous() || src.is_conj() || src.is_neg() || dst.is_inference() ||
        (src.is_complex() && !dst.is_complex()) || !default_dispatch_state() ||
        typeid(*dst.unsafeGetTensorImpl()) != typeid(c10::TensorImpl) ||
        typeid(*src.unsafeGetTensorImpl()) != typeid(c10::TensorImpl) ||
        at::has_internal_overlap(dst) == at::MemOverlap::Yes || src.is_pinned() || !sound) {
      return false;
    }
    // A host target (only when host staging is on) may not overlap the source: chunks of it
    // are written before later ones are read.
    return !dst.is_cpu() || at::get_overlap_status(dst, src) == at::MemOverlapStatus::No;
  }

  // memcpy for same-dtype contiguous CPU tensors, which is what copy_ does for them.
  static bool copy_plain(const at::Tensor& dst, const at::Tensor& src, bool sound) {
    if (!dst.is_cpu() || !src.is_cpu() || dst.scalar_type() != src.scalar_type() ||
        !dst.is_contiguous() || !src.is_contiguous() || dst.is_conj() || src.is_conj() ||
        dst.is_neg() || src.is_neg() || dst.is_inference() || !default_dispatch_state() ||
        typeid(*dst.unsafeGetTensorImpl()) != typeid(c10::TensorImpl) ||
        typeid(*src.unsafeGetTensorImpl()) != typeid(c10::TensorImpl) || !sound) {
      return false;
    }
    size_t nbytes = static_cast<size_t>(dst.numel()) * dst.element_size();
    if (nbytes >= kReleaseGilBytes) return false;  // copy_ is multi-threaded for big tensors
    auto d = reinterpret_cast<uintptr_t>(dst.const_data_ptr());
    auto s = reinterpret_cast<uintptr_t>(src.const_data_ptr());
    if (nbytes && d < s + nbytes && s < d + nbytes) return false;  // copy_ checks overlaps
    if (nbytes) std::memcpy(dst.mutable_data_ptr(), src.const_data_ptr(), nbytes);
    dst.unsafeGetTensorImpl()->bump_version();
    return true;
  }

  // The pending Python exception (an Exception, else re-raised) as torch reports it.
  void record_copy_error(const Entry& e, const at::Tensor& param, const at::Tensor& input,
                         const char* action = "copying") {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) throw py::error_already_set();
    py::error_already_set err;
    py::object args = err.value().attr("args");
    append(error_msgs, make_str(copy_error_message(action, std::string(e.name), param.sizes(),
                                                   input.sizes(), py::str(py::repr(args)))));
  }

  // torch's assign=True branch: keep Parameter-ness and requires_grad, then setattr.
  void assign_tensor(PyObject* module, const LocalTensor& t, const Entry& e, py::object input_obj) {
    flush();
    const ModuleNames& n = module_names();
    const at::Tensor& param = THPVariable_Unpack(t.value);
    at::Tensor input = THPVariable_Unpack(input_obj.ptr());
    c10::AutoGradMode no_grad(false);
    bool ok = true;
    if (Py_TYPE(t.value) == n.parameter_type) {
      int is_param = PyObject_IsInstance(input_obj.ptr(), n.parameter_class);
      if (is_param < 0) throw py::error_already_set();
      PyObject* requires_grad = param.requires_grad() ? Py_True : Py_False;
      if (!is_param) {
        py::dict kwargs;
        kwargs["requires_grad"] = borrow(requires_grad);
        py::tuple args = py::make_tuple(input_obj);
        PyObject* wrapped = PyObject_Call(n.parameter_class, args.ptr(), kwargs.ptr());
        if (wrapped) {
          input_obj = steal(wrapped);
        } else {
          ok = false;
        }
      } else {
        PyObject* r = PyObject_CallMethod(input_obj.ptr(), "requires_grad_", "O", requires_grad);
        ok = r != nullptr;
        Py_XDECREF(r);
      }
    }
    if (ok) ok = PyObject_SetAttr(module, t.name, input_obj.ptr()) == 0;
    if (!ok) record_copy_error(e, param, input);
  }

  // The Python tensor for an entry (file tensors: a zero-copy view of the mapping; aliases
  // share one tensor, as zerockpt.load returns them).
  py::object materialise(Entry& e) {
    if (!e.value) {
      auto it = materialised_.find(e.record);
      if (it == materialised_.end()) {
        at::Tensor t;
        {
          py::gil_scoped_release no_gil;  // maps the file; C++ only
          t = file_->tensor(*e.record, /*mmap=*/true);
        }
        it = materialised_.emplace(e.record, steal(THPVariable_Wrap(t))).first;
      }
      e.value = it->second;
      e.record = nullptr;  // from now on the tensor object is the source (hooks may edit it)
    }
    return e.value;
  }

  // Hands this module to torch's Module._load_from_state_dict (or its override) with the dict
  // torch would pass, and returns that dict's entries afterwards (hooks may have edited it).
  Entries call_torch_loader(PyObject* module, const Entries& entries, PyObject* prefix,
                            const py::object& local_metadata, bool root) {
    flush();
    const ModuleNames& n = module_names();
    py::object local;
    if (root) {
      local = steal(PyObject_CallNoArgs(reinterpret_cast<PyObject*>(&PyODict_Type)));
      if (!metadata_.is_none() && PyObject_SetAttr(local.ptr(), n.metadata, metadata_.ptr()) != 0) {
        throw py::error_already_set();
      }
    } else {
      local = steal(PyDict_New());
    }
    for (Entry* e : entries) {
      if (PyObject_SetItem(local.ptr(), e->key.ptr(), materialise(*e).ptr()) != 0) {
        throw py::error_already_set();
      }
    }
    steal(PyObject_CallMethodObjArgs(module, n.load_from_state_dict, local.ptr(), prefix,
                                     local_metadata.ptr(), Py_True, missing_keys.ptr(),
                                     unexpected_keys.ptr(), error_msgs.ptr(), nullptr));
    return entries_of(local, entries);
  }

  // The entries of `local` in its order; the old entries when nothing was added, removed,
  // reordered or replaced.
  Entries entries_of(const py::object& local, const Entries& before) {
    Entries out;
    py::object it = steal(PyObject_GetIter(local.ptr()));
    bool same = true;
    size_t i = 0;
    while (PyObject* key_raw = PyIter_Next(it.ptr())) {
      py::object key = steal(key_raw);
      py::object value = steal(PyObject_GetItem(local.ptr(), key.ptr()));
      if (i >= before.size() || before[i]->key.ptr() != key.ptr() ||
          before[i]->value.ptr() != value.ptr()) {
        same = false;
      }
      ++i;
      if (!PyUnicode_Check(key.ptr())) {
        PyErr_Format(PyExc_AttributeError, "'%.100s' object has no attribute 'startswith'",
                     Py_TYPE(key.ptr())->tp_name);
        throw py::error_already_set();
      }
      Entry* e = new_entry();
      e->key = key;
      e->name = key_text(key.ptr());
      e->value = value;
      out.push_back(e);
    }
    if (PyErr_Occurred()) throw py::error_already_set();
    if (same && i == before.size()) return before;
    return out;
  }

  void run_post_hooks(PyObject* module) {
    flush();
    const ModuleNames& n = module_names();
    py::object incompatible = steal(PyObject_CallFunctionObjArgs(
        n.incompatible_keys, missing_keys.ptr(), unexpected_keys.ptr(), nullptr));
    py::object hooks = steal(PyObject_GetAttr(module, n.load_post_hooks));
    py::object values = steal(PyObject_CallMethod(hooks.ptr(), "values", nullptr));
    py::object it = steal(PyObject_GetIter(values.ptr()));
    while (PyObject* hook_raw = PyIter_Next(it.ptr())) {
      py::object hook = steal(hook_raw);
      py::object out =
          steal(PyObject_CallFunctionObjArgs(hook.ptr(), module, incompatible.ptr(), nullptr));
      if (!out.is_none()) {
        PyErr_SetString(PyExc_AssertionError,
                        "Hooks registered with ``register_load_state_dict_post_hook`` are not "
                        "expected to return new values, if incompatible_keys need to be "
                        "modified, it should be done inplace.");
        throw py::error_already_set();
      }
    }
    if (PyErr_Occurred()) throw py::error_already_set();
  }

  py::object metadata_;
  py::object assign_;
  bool assign_set_ = false;
  std::shared_ptr<CheckpointFile> file_;
  Progress* progress_;  // may be null
  unsigned threads_;
  uint64_t staging_bytes_;
  std::optional<LoadPlan> plan_;
  ClassTraitsCache traits_;
  const char* meta_site_ = "meta";
  std::deque<Entry> arena_;
  std::deque<std::string> texts_;
  std::string path_;  // the prefix of the module being loaded, as key_text gives it
  // Per depth of the walk (a deque: references stay valid as it grows).
  size_t depth_ = 0;
  std::deque<Partition> partitions_;
  std::deque<std::vector<LocalTensor>> local_states_;
  std::unordered_map<const TensorRecord*, py::object> materialised_;
  TorchWarnings* warnings_ = nullptr;
};

// load_state_dict's work, on the caller's thread. Requires GIL.
py::object walk_into(py::handle module, const py::object& source, py::object metadata,
                     const py::object& assign, const std::shared_ptr<CheckpointFile>& file,
                     unsigned threads, Progress* progress, uint64_t staging_bytes,
                     TorchWarnings* warnings) {
  LoadWalk walk(std::move(metadata), assign, file, threads, progress, staging_bytes);
  walk.set_warnings(warnings);
  Entries entries;
  if (file) {
    for (const std::string& name : file->names()) {
      Entry* e = walk.new_entry();
      e->key = make_str(name);
      e->name = walk.key_text(e->key.ptr());
      e->record = file->find(name);
      entries.push_back(e);
    }
  } else {
    // Exact dicts and OrderedDicts, in iteration order; anything else the caller copies into
    // an OrderedDict first, as torch does.
    py::object it = steal(PyObject_GetIter(source.ptr()));
    while (PyObject* key_raw = PyIter_Next(it.ptr())) {
      py::object key = steal(key_raw);
      if (!PyUnicode_Check(key.ptr())) return py::none();  // torch's code handles these
      PyObject* value = PyDict_GetItemWithError(source.ptr(), key.ptr());
      if (!value) {
        if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, key.ptr());
        throw py::error_already_set();
      }
      Entry* e = walk.new_entry();
      e->key = key;
      e->name = walk.key_text(key.ptr());
      e->value = borrow(value);
      entries.push_back(e);
    }
    if (PyErr_Occurred()) throw py::error_already_set();
  }
  walk.load(module.ptr(), entries, module_names().empty, /*root=*/true);
  walk.flush();
  warnings->flush();
  return py::make_tuple(walk.missing_keys, walk.unexpected_keys, walk.error_msgs);
}

}  // namespace

py::object load_state_dict(py::handle module, py::object source, py::object metadata,
                           py::object assign, std::shared_ptr<CheckpointFile> file,
                           unsigned threads, std::shared_ptr<Progress> progress,
                           uint64_t staging_bytes) {
  TorchWarnings warnings;
  c10::WarningUtils::WarningHandlerGuard guard(&warnings);
  try {
    if (file) check_torch_dtypes(*file);
    return interruptible(std::move(progress), [&](Progress* counter) -> py::object {
      return walk_into(module, source, std::move(metadata), assign, file, threads, counter,
                       staging_bytes, &warnings);
    });
  } catch (...) {
    // The warnings that came before the error are still shown; a failure to show them (a
    // filter turning one into an error) does not replace the error in flight.
    try {
      warnings.flush();
    } catch (const py::error_already_set&) {
    }
    throw;
  }
}

}  // namespace zerockpt
