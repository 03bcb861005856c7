// The private extension module zerockpt._C. Converts Python arguments to C++ values with the
// GIL held, runs the torch layer without it, and converts results back.
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/device_lazy_init.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <optional>

#include "core/crc32c.h"
#include "core/dtype.h"
#include "core/file.h"
#include "core/parallel.h"
#include "python/errors.h"
#include "python/interrupt.h"
#include "python/load_state_dict.h"
#include "python/module_stream.h"
#include "python/state_dict.h"
#include "torch/async_save.h"
#include "torch/device_staging.h"
#include "torch/dtypes.h"
#include "torch/load_into.h"
#include "torch/options.h"
#include "torch/tensor_io.h"
#include "torch/tensor_views.h"
#include "zerockpt/errors.h"
#include "zerockpt/zerockpt.h"

namespace py = pybind11;

namespace zerockpt {
namespace {

std::string key_repr(PyObject* key) {
  py::str r = py::repr(py::handle(key));
  return std::string(r);
}

// Initializes the device's backend (CUDA context and lazy init) while the GIL is held, as
// torch's own Python entry points do, before threads without the GIL use it. Requires GIL.
void init_device(c10::Device device) { torch::utils::maybe_initialize_device(device); }

// Requires GIL.
NamedTensors named_tensors_from_dict(py::dict tensors) {
  NamedTensors out;
  out.reserve(tensors.size());
  PyObject* key;
  PyObject* value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(tensors.ptr(), &pos, &key, &value)) {
    if (!PyUnicode_Check(key)) {
      throw py::type_error("tensor names must be str, got " + std::string(Py_TYPE(key)->tp_name) +
                           " " + key_repr(key));
    }
    Py_ssize_t size = 0;
    const char* utf8 = PyUnicode_AsUTF8AndSize(key, &size);
    if (!utf8) throw py::error_already_set();
    std::string name(utf8, static_cast<size_t>(size));
    if (!THPVariable_Check(value)) {
      throw py::type_error("value for " + quote(name) + " must be a torch.Tensor, got " +
                           std::string(Py_TYPE(value)->tp_name));
    }
    out.emplace_back(std::move(name), THPVariable_Unpack(value));
  }
  return out;
}

// Requires GIL.
Metadata metadata_from_dict(const py::object& metadata) {
  Metadata out;
  if (metadata.is_none()) return out;
  if (!PyDict_Check(metadata.ptr())) {
    throw py::type_error("metadata must be a dict of str to str or None, got " +
                         std::string(Py_TYPE(metadata.ptr())->tp_name));
  }
  for (auto item : py::reinterpret_borrow<py::dict>(metadata)) {
    if (!PyUnicode_Check(item.first.ptr()) || !PyUnicode_Check(item.second.ptr())) {
      throw py::type_error("metadata must map str to str, got " + key_repr(item.first.ptr()) +
                           ": " + key_repr(item.second.ptr()));
    }
    out.emplace_back(item.first.cast<std::string>(), item.second.cast<std::string>());
  }
  return out;
}

// Requires GIL.
py::dict tensors_to_dict(const NamedTensors& tensors) {
  py::dict out;
  for (const auto& [name, t] : tensors) {
    py::object key = py::reinterpret_steal<py::object>(
        PyUnicode_DecodeUTF8(name.data(), static_cast<Py_ssize_t>(name.size()), "strict"));
    if (!key) throw py::error_already_set();
    // Aliases hold the same TensorImpl, so they wrap to the same Python tensor object.
    py::object value = py::reinterpret_steal<py::object>(THPVariable_Wrap(t));
    if (!value) throw py::error_already_set();
    if (PyDict_SetItem(out.ptr(), key.ptr(), value.ptr()) != 0) throw py::error_already_set();
  }
  return out;
}

// Requires GIL.
py::dict metadata_to_dict(const Metadata& metadata) {
  py::dict out;
  for (const auto& [key, value] : metadata) out[py::str(key)] = py::str(value);
  return out;
}

// The public option structs, so that one object crosses the binding per call (built by the
// package's _args.py) instead of a row of positional arguments. Requires GIL.
void bind_options(py::module_& m) {
  py::class_<SaveOptions>(m, "SaveOptions",
                          "zerockpt::SaveOptions (zerockpt/zerockpt.h): how save and save_async "
                          "write. Built by zerockpt._args.save_options.")
      .def(py::init<>())
      .def_readwrite("durable", &SaveOptions::durable)
      .def_readwrite("direct_io", &SaveOptions::direct_io)
      .def_readwrite("threads", &SaveOptions::threads)
      .def_readwrite("checksums", &SaveOptions::checksums)
      // A dict of str to str (None: none); anything else is a TypeError naming the entry.
      .def_property(
          "metadata", [](const SaveOptions& o) { return metadata_to_dict(o.metadata); },
          [](SaveOptions& o, const py::object& metadata) {
            o.metadata = metadata_from_dict(metadata);
          })
      .def_readwrite("staging_bytes", &SaveOptions::staging_bytes);
  py::class_<LoadOptions>(m, "LoadOptions",
                          "zerockpt::LoadOptions (zerockpt/zerockpt.h): how load reads. Built by "
                          "zerockpt._args.load_options.")
      .def(py::init<>())
      .def_readwrite("mmap", &LoadOptions::mmap)
      .def_readwrite("threads", &LoadOptions::threads)
      .def_readwrite("verify", &LoadOptions::verify)
      .def_readwrite("device", &LoadOptions::device)
      .def_readwrite("staging_bytes", &LoadOptions::staging_bytes);
}

// The arguments of save and save_async as C++ values. Requires GIL.
struct SaveArgs {
  // What module_tensors read from a module (kept alive by the caller's reference, immutable),
  // or else the converted dict.
  std::shared_ptr<const ModuleTensors> module;
  NamedTensors converted;
  Metadata own;
  WriteOptions options;
  const NamedTensors& entries() const { return module ? module->entries : converted; }
};

// `tensors`: a dict of str to tensors, or a _ModuleTensors (module_stream.h).
SaveArgs save_args(py::handle tensors, const SaveOptions& options, py::object own_metadata,
                   Progress* progress = nullptr) {
  SaveArgs args;
  args.module = module_tensors_of(tensors);
  if (!args.module) {
    if (!PyDict_Check(tensors.ptr())) {
      throw py::type_error("tensors must be a dict of str to tensors, got " +
                           std::string(Py_TYPE(tensors.ptr())->tp_name));
    }
    args.converted = named_tensors_from_dict(py::reinterpret_borrow<py::dict>(tensors));
  }
  args.own = metadata_from_dict(own_metadata);
  for (const auto& [key, value] : args.own) {
    if (key.rfind(kReservedPrefix, 0) != 0) throw py::value_error("not a reserved key: " + key);
  }
  args.options = write_options(options, progress);
  return args;
}

// Requires GIL for conversion; releases GIL for the write, taking it between chunks to check
// for Ctrl-C. `own` holds zerockpt's reserved metadata entries (each key must start with
// kReservedPrefix).
// `options` is a copy: another thread may change the Python object while the GIL is released.
void save_binding(py::object tensors, const std::string& path, SaveOptions options,
                  py::object own_metadata, std::shared_ptr<Progress> progress) {
  interruptible(std::move(progress), [&](Progress* counter) {
    SaveArgs args = save_args(tensors, options, own_metadata, counter);
    for (const auto& [name, t] : args.entries()) {
      if (!t.device().is_cpu()) init_device(t.device());
    }
    // Safe without the GIL: entries hold references to the tensors, and nothing below touches
    // Python objects.
    py::gil_scoped_release no_gil;
    save_tensors(args.entries(), path, options.metadata, args.options, args.own);
  });
}

// Requires GIL for conversion; releases GIL while waiting for the save in flight and copying.
// No progress counter: the call returns once the snapshot is copied, before the bytes that a
// counter would count are written; no staging_bytes: the snapshot is one buffer of the whole
// state, not a bounded pool of chunks.
std::shared_ptr<PendingSave> save_async_binding(
    py::object tensors, const std::string& path, SaveOptions options, py::object own_metadata,
    std::vector<std::pair<std::string, std::string>> write_files,
    std::vector<std::string> remove_files) {
  SaveArgs args = save_args(tensors, options, own_metadata);
  bool any_steps = !write_files.empty() || !remove_files.empty();
  AfterCommit after{any_steps ? path : "", std::move(write_files), std::move(remove_files)};
  // Safe without the GIL: as in save(); the background thread only reads the snapshot.
  py::gil_scoped_release no_gil;
  return save_tensors_async(args.entries(), path, options.metadata, args.options, args.own,
                            std::move(after));
}

void bind_async(py::module_& m) {
  py::class_<PendingSave, std::shared_ptr<PendingSave>>(m, "_PendingSave")
      .def_property_readonly("path", &PendingSave::path)
      .def("done", &PendingSave::done)
      // Releases GIL while waiting, taking it every 50 ms for Ctrl-C (which leaves the save
      // going). None: no limit. True when done.
      .def(
          "wait",
          [](const PendingSave& p, std::optional<double> timeout) {
            return wait_interruptibly([&](double seconds) { return p.wait(seconds); },
                                      timeout ? std::max(0.0, *timeout) : -1.0);
          },
          py::arg("timeout"))
      // Releases GIL while waiting, as wait(None); raises the save's error (translated like
      // save's).
      .def("result", [](const PendingSave& p) {
        wait_interruptibly([&](double seconds) { return p.wait(seconds); }, -1.0);
        if (std::exception_ptr error = p.error()) std::rethrow_exception(error);
      });
  // Releases GIL (a few system calls). Raises the OSError a save to `path` would raise for its
  // destination (core/file.h check_destination) before writing anything; returns the path
  // that would be replaced (symbolic links resolved).
  m.def(
      "check_destination",
      [](const std::string& path) {
        py::gil_scoped_release no_gil;  // C++ strings only
        return check_destination(path).target;
      },
      py::arg("path"));
  // Releases GIL. Commits the complete file `staged` as `path`, as a save commits its own.
  m.def(
      "replace_file",
      [](const std::string& staged, const std::string& path) {
        py::gil_scoped_release no_gil;  // C++ strings only
        replace_file(staged, path);
      },
      py::arg("staged"), py::arg("path"));
  // Requires GIL (no I/O). Raises what save() would raise for the first unsavable tensor.
  m.def(
      "check_savable",
      [](py::dict tensors) {
        for (const auto& [name, t] : named_tensors_from_dict(tensors)) check_savable(name, t);
      },
      py::arg("tensors"));
  m.def("save_async", &save_async_binding, py::arg("tensors"), py::arg("path"), py::arg("options"),
        py::arg("own_metadata") = py::none(),
        py::arg("write_files") = std::vector<std::pair<std::string, std::string>>(),
        py::arg("remove_files") = std::vector<std::string>());
  // Releases GIL.
  m.def(
      "after_commit",
      [](std::vector<std::pair<std::string, std::string>> write_files,
         std::vector<std::string> remove_files, bool durable, std::string check_file) {
        AfterCommit after{std::move(check_file), std::move(write_files), std::move(remove_files)};
        py::gil_scoped_release no_gil;
        run_after_commit(after, durable);
      },
      py::arg("write_files"), py::arg("remove_files"), py::arg("durable"),
      py::arg("check_file") = "");
  m.def(
      "wait_async_saves",
      [] {
        py::gil_scoped_release no_gil;
        wait_for_async_saves();
      },
      "Blocks (GIL released) until no save_async is in flight.");
  m.def(
      "snapshot_stats",
      [] {
        SnapshotStats s = snapshot_stats();
        return py::make_tuple(s.capacity, s.allocations, s.pinned, s.in_flight);
      },
      "(capacity, allocations, pinned, in_flight) of save_async's snapshot buffer.");
  m.def(
      "release_snapshot_buffer",
      [] {
        py::gil_scoped_release no_gil;
        release_snapshot_buffer();
      },
      "Waits for the save in flight, then frees save_async's snapshot buffer.");
}

// Releases GIL for open (`open_file()`), parse and reads (taking it between chunks to check
// for Ctrl-C); requires it to build the dicts. Returns the tensors, the metadata entries
// zerockpt reserves (kReservedPrefix keys), whether the file stores checksums and the offset
// where the file ends. With a device other than the CPU (or the CPU while the staging testing
// aid is on), the tensors are new tensors there, filled through staging.
template <typename Open>
py::tuple load_file(Open open_file, const LoadOptions& options,
                    std::shared_ptr<Progress> progress) {
  NamedTensors loaded;
  Metadata own;
  bool has_checksums = false;
  uint64_t end = 0;
  const bool staged = !options.device.is_cpu() || stage_host_tensors();
  if (!options.device.is_cpu()) init_device(options.device);
  interruptible(std::move(progress), [&](Progress* counter) {
    // Safe without the GIL: only C++ and ATen objects are created here.
    py::gil_scoped_release no_gil;
    CheckpointFile file = open_file();
    loaded = staged ? load_to_device(file, options.device, options.threads, options.verify,
                                     options.staging_bytes, counter)
                    : file.load_all(options.mmap, options.threads, options.verify, counter);
    for (const auto& [key, value] : file.file().header().metadata) {
      if (key.rfind(kReservedPrefix, 0) == 0) own.emplace_back(key, value);
      if (key == kChecksumKey) has_checksums = true;
    }
    end = file.file().image_end();
  });
  return py::make_tuple(tensors_to_dict(loaded), metadata_to_dict(own), has_checksums, end);
}

// load_file() of the file `path` (the last item of the result dropped).
// `options` is a copy: another thread may change the Python object while the GIL is released.
py::tuple load_binding(const std::string& path, LoadOptions options,
                       std::shared_ptr<Progress> progress) {
  py::tuple out = load_file([&] { return CheckpointFile(path); }, options, std::move(progress));
  return py::make_tuple(out[0], out[1], out[2]);
}

// load_file() of the file at offset `base` of the open regular file `fd` (see SafetensorsFile).
py::tuple load_fd(int fd, uint64_t base, const std::string& name, bool exact_size,
                  LoadOptions options, std::shared_ptr<Progress> progress) {
  return load_file(
      [&] { return CheckpointFile(std::make_shared<SafetensorsFile>(fd, base, name, exact_size)); },
      options, std::move(progress));
}

// A sequential sink that hands each run of bytes to the Python callable `write` (a binary file
// object's write) as a read-only memoryview of tensor or staging memory, released once write
// returns, and that rewrites the header through `rewrite_prefix(bytes)`. Requires GIL to
// construct and destroy; takes it for each call.
class PythonSink : public WriteSink {
 public:
  PythonSink(py::object write, py::object rewrite_prefix, std::string name)
      : write_(std::move(write)), rewrite_(std::move(rewrite_prefix)), name_(std::move(name)) {}
  bool sequential() const override { return true; }
  void write(const uint8_t* src, uint64_t size, uint64_t offset) override {
    if (offset != next_) {
      throw UsageError(name_ + ": out-of-order write at offset " + std::to_string(offset));
    }
    py::gil_scoped_acquire gil;
    uint64_t done = 0;
    while (done < size) {
      // Bounded views: some writers (raw files) take at most about 2 GiB per call.
      uint64_t n = std::min<uint64_t>(size - done, 1ull << 30);
      auto view = py::reinterpret_steal<py::object>(
          PyMemoryView_FromMemory(reinterpret_cast<char*>(const_cast<uint8_t*>(src + done)),
                                  static_cast<Py_ssize_t>(n), PyBUF_READ));
      if (!view) throw py::error_already_set();
      py::object written;
      try {
        written = write_(view);
      } catch (...) {
        view.attr("release")();
        throw;
      }
      // The memory is not the writer's to keep: a view it held on to now raises on access.
      view.attr("release")();
      // None: the writer took it all (torch.save ignores the result too); raw files may take
      // less and say so.
      uint64_t took = n;
      if (!written.is_none()) {
        auto count = written.cast<long long>();
        if (count <= 0 || static_cast<uint64_t>(count) > n) {
          throw IoError(EIO, name_,
                        "write() returned " + std::to_string(count) + " for " + std::to_string(n) +
                            " bytes at offset " + std::to_string(offset + done));
        }
        took = static_cast<uint64_t>(count);
      }
      done += took;
    }
    next_ += size;
  }
  void rewrite_prefix(const std::string& prefix) override {
    py::gil_scoped_acquire gil;
    rewrite_(py::bytes(prefix));
  }

 private:
  py::object write_;
  py::object rewrite_;
  std::string name_;
  uint64_t next_ = 0;
};

// save() into a sink rather than a file; returns the bytes written. `make_sink(size)` is called
// with the GIL held once the plan (and so the size) is known. Releases GIL as save() does.
template <typename MakeSink>
uint64_t save_to_sink(py::object tensors, const std::string& name, const SaveOptions& options,
                      py::object own_metadata, std::shared_ptr<Progress> progress,
                      MakeSink make_sink) {
  uint64_t size = 0;
  interruptible(std::move(progress), [&](Progress* counter) {
    SaveArgs args = save_args(tensors, options, own_metadata, counter);
    for (const auto& [entry, t] : args.entries()) {
      if (!t.device().is_cpu()) init_device(t.device());
    }
    SavePlan plan;
    {
      // Safe without the GIL: entries hold references to the tensors; C++ and ATen work only.
      py::gil_scoped_release no_gil;
      plan = plan_save(args.entries(), name, options.metadata, args.options, args.own);
    }
    std::unique_ptr<WriteSink> sink = make_sink(plan.layout.file_size());
    {
      // Safe without the GIL: as above; a Python sink takes it for its own calls.
      py::gil_scoped_release no_gil;
      size = save_tensors_to(std::move(plan), *sink, name, args.options);
    }
  });
  return size;
}

// Saves at offset `base` of the open file `fd` (pwrite; no fsync, no rename). Releases GIL.
// Only options' metadata, threads, checksums and staging_bytes apply (durability is the
// caller's).
uint64_t save_fd(py::object tensors, int fd, uint64_t base, const std::string& name,
                 SaveOptions options, py::object own_metadata, std::shared_ptr<Progress> progress) {
  options.durable = false;
  options.direct_io = false;
  return save_to_sink(tensors, name, options, own_metadata, std::move(progress),
                      [&](uint64_t) { return std::make_unique<FdSink>(fd, base, name); });
}

// A sink that keeps only the final header: the checksums of a first pass over the tensors.
class ChecksumSink : public WriteSink {
 public:
  void write(const uint8_t*, uint64_t, uint64_t) override {}
  void rewrite_prefix(const std::string& prefix) override { prefix_ = prefix; }
  const std::string& prefix() const { return prefix_; }

 private:
  std::string prefix_;
};

// Saves through `write`, in order, on this thread. With checksums, `rewrite_prefix(bytes)`
// (which seeks back) completes the header at the end; without it (None: the object cannot
// seek back) a first pass over the tensors computes them, and the header goes out complete.
// Releases GIL but for the calls of `write` and `rewrite_prefix`.
uint64_t save_stream(py::object tensors, py::object write, py::object rewrite_prefix,
                     const std::string& name, SaveOptions options, py::object own_metadata,
                     std::shared_ptr<Progress> progress) {
  uint64_t size = 0;
  options.durable = false;
  options.direct_io = false;
  options.threads = 0;
  interruptible(std::move(progress), [&](Progress* counter) {
    SaveArgs args = save_args(tensors, options, own_metadata, counter);
    for (const auto& [entry, t] : args.entries()) {
      if (!t.device().is_cpu()) init_device(t.device());
    }
    PythonSink sink(write, rewrite_prefix, name);
    const bool first_pass = options.checksums && rewrite_prefix.is_none();
    {
      // Safe without the GIL: entries hold references to the tensors; C++ and ATen work only,
      // and the sink takes the GIL for its own calls.
      py::gil_scoped_release no_gil;
      SavePlan plan = plan_save(args.entries(), name, options.metadata, args.options, args.own);
      if (first_pass) {
        ChecksumSink first;
        save_tensors_to(plan, first, name, args.options);
        plan.layout.prefix = first.prefix();
        plan.layout.checksum_offset = Layout::kNoChecksums;  // nothing left to fill in
      }
      args.options.threads = 1;
      size = save_tensors_to(std::move(plan), sink, name, args.options);
    }
  });
  return size;
}

// The file as a new bytes object, written into it without the GIL (nothing else refers to it
// yet). Releases GIL as save() does.
py::bytes save_bytes(py::object tensors, SaveOptions options, py::object own_metadata,
                     std::shared_ptr<Progress> progress) {
  py::object out;
  options.durable = false;
  options.direct_io = false;
  save_to_sink(tensors, "<bytes>", options, own_metadata, std::move(progress), [&](uint64_t size) {
    out = py::reinterpret_steal<py::object>(
        PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(size)));
    if (!out) throw py::error_already_set();
    auto* dst = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(out.ptr()));
    return std::make_unique<MemorySink>(dst);
  });
  return py::reinterpret_steal<py::bytes>(out.release());
}

// Requires GIL (no I/O). The size of the header that the 8-byte `prefix` announces; FormatError
// naming `name` if no safetensors header can be that long.
uint64_t header_length(const py::bytes& prefix, const std::string& name) {
  std::string p = prefix;
  if (p.size() != 8) throw py::value_error("the prefix is 8 bytes");
  return checked_header_size(reinterpret_cast<const uint8_t*>(p.data()), UINT64_MAX, name);
}

// Requires GIL (parses the header: no I/O). The size of the whole file whose first bytes (the
// prefix and the header it announces) are `head`, as the header describes it; FormatError
// naming `name` if the header is invalid.
uint64_t image_size(const py::bytes& head, const std::string& name) {
  std::string h = head;
  uint64_t n = h.size() < 8 ? 0 : header_length(py::bytes(h.substr(0, 8)), name);
  if (h.size() != 8 + n) throw py::value_error("head must be the prefix and the whole header");
  Header header = parse_header(h.data() + 8, n, UINT64_MAX, name, /*exact_size=*/false);
  CheckpointFile::check_header(header, name);
  return header.data_start + header.data_size;
}

void bind_progress(py::module_& m) {
  py::class_<Progress, std::shared_ptr<Progress>>(
      m, "Progress",
      "Bytes written, read or checked by the calls it is passed to, polled from another "
      "thread for a progress bar; cancel() stops them at their next chunk (KeyboardInterrupt).")
      .def(py::init<uint64_t>(), py::arg("total") = 0)
      .def_property_readonly("total", &Progress::total)
      .def_property_readonly("done", &Progress::done)
      .def_property_readonly("cancelled", &Progress::cancelled)
      .def("cancel", &Progress::cancel);
}

// Facts about tensors from the one table or computation that save and load use too.
void bind_tensor_facts(py::module_& m) {
  // Requires GIL. The torch dtype of a format dtype name ("F32"), from the one dtype table;
  // None where torch has none (or the format defines no such name).
  m.def(
      "torch_dtype",
      [](const std::string& format_dtype) -> py::object {
        std::optional<Dtype> dtype = parse_dtype(format_dtype);
        std::optional<c10::ScalarType> scalar = dtype ? to_scalar_type(*dtype) : std::nullopt;
        if (!scalar) return py::none();
        return py::reinterpret_borrow<py::object>(
            reinterpret_cast<PyObject*>(torch::getTHPDtype(*scalar)));
      },
      py::arg("format_dtype"));
  // Requires GIL. torch's "Error(s) in loading state_dict for ..." text, or b"" if none. Bytes
  // in and out: keys may hold lone surrogates, which the caller encodes (and the result
  // decodes) with surrogatepass.
  m.def(
      "load_state_dict_message",
      [](const std::string& module_name, const std::vector<std::string>& missing_keys,
         const std::vector<std::string>& unexpected_keys, const std::vector<std::string>& errors,
         bool strict) {
        return py::bytes(
            load_state_dict_message(module_name, missing_keys, unexpected_keys, errors, strict));
      },
      py::arg("module_name"), py::arg("missing_keys"), py::arg("unexpected_keys"),
      py::arg("errors"), py::arg("strict"));
  // Requires GIL (no I/O). (alias_of, group) per tensor, as find_memory_sharing computes them:
  // the first earlier tensor it is the same view of (or -1), and the first tensor of its group
  // of views with overlapping bytes.
  m.def(
      "memory_sharing",
      [](const std::vector<at::Tensor>& tensors) {
        MemorySharing sharing = find_memory_sharing(tensors);
        return py::make_tuple(sharing.alias_of, sharing.group);
      },
      py::arg("tensors"));
}

void bind_file(py::module_& m) {
  py::class_<CheckpointFile, std::shared_ptr<CheckpointFile>>(m, "_File")
      // Releases GIL: opening reads and validates the header.
      .def(py::init([](const std::string& path) {
             py::gil_scoped_release no_gil;
             return std::make_shared<CheckpointFile>(path);
           }),
           py::arg("path"))
      .def_property_readonly("path", [](const CheckpointFile& f) { return f.file().path(); })
      .def_property_readonly("file_size",
                             [](const CheckpointFile& f) { return f.file().file_size(); })
      .def_property_readonly("data_start",
                             [](const CheckpointFile& f) { return f.file().header().data_start; })
      // Requires GIL.
      .def("keys", [](const CheckpointFile& f) { return f.names(); })
      // Requires GIL.
      .def("metadata",
           [](const CheckpointFile& f) {
             py::dict out;
             for (const auto& [k, v] : f.file().header().metadata) out[py::str(k)] = py::str(v);
             return out;
           })
      // Requires GIL. (dtype name, shape, begin, end, alias target or None); KeyError if absent.
      .def(
          "info",
          [](const CheckpointFile& f, const std::string& name) {
            const TensorRecord* r = f.find(name);
            if (!r) throw py::key_error(name);
            const std::string* target = f.alias_target(name);
            return py::make_tuple(dtype_name(r->dtype), r->shape, r->begin, r->end,
                                  target ? py::object(py::str(*target)) : py::object(py::none()));
          },
          py::arg("name"))
      // Releases GIL while checking (taking it between chunks to check for Ctrl-C). (has
      // checksums, names of stored tensors that fail); with `raise_on_failure` a failure is a
      // ChecksumError naming them instead.
      .def(
          "verify",
          [](CheckpointFile& f, unsigned threads, bool raise_on_failure,
             std::shared_ptr<Progress> progress) {
            VerifyResult result;
            interruptible(std::move(progress), [&](Progress* counter) {
              py::gil_scoped_release no_gil;  // only C++ work below
              result = f.file().verify(threads, counter);
              if (raise_on_failure) f.file().raise_on_failure(result);
            });
            std::vector<std::string> failed;
            for (size_t i : result.failed) failed.push_back(f.file().header().tensors[i].name);
            return py::make_tuple(result.has_checksums, failed);
          },
          py::arg("threads"), py::arg("raise_on_failure"), py::arg("progress") = nullptr)
      // Releases GIL while mapping or reading the tensor's bytes.
      .def(
          "get_tensor",
          [](CheckpointFile& f, const std::string& name, bool mmap) {
            const TensorRecord* r = f.find(name);
            if (!r) throw py::key_error(name);
            at::Tensor t;
            {
              py::gil_scoped_release no_gil;  // only C++/ATen work below
              t = f.tensor(*r, mmap);
            }
            return t;
          },
          py::arg("name"), py::arg("mmap") = true);
}

// The staging directory of a sharded save (core/file.h), and the directory operations around it.
void bind_staging(py::module_& m) {
  py::class_<StagingDirectory>(m, "_StagingDirectory")
      // Releases GIL: creating it removes stale ones and creates and locks the directory.
      .def(py::init([](const std::string& parent, const std::string& name) {
             py::gil_scoped_release no_gil;
             return std::make_unique<StagingDirectory>(parent, name);
           }),
           py::arg("parent"), py::arg("name"))
      .def_property_readonly("path", &StagingDirectory::path)
      .def("file", &StagingDirectory::file, py::arg("name"))
      // Releases GIL: renames and fsyncs. Ctrl-C is seen only once it returns, so a commit
      // is never stopped half way (new shards under an old index).
      .def("commit", &StagingDirectory::commit, py::arg("names"), py::arg("durable"),
           py::call_guard<py::gil_scoped_release>())
      // Releases GIL.
      .def("close", &StagingDirectory::remove, py::call_guard<py::gil_scoped_release>());
  // Releases GIL.
  m.def("make_directories", &make_directories, py::arg("path"), py::arg("durable"),
        py::call_guard<py::gil_scoped_release>());
  m.def("_remove_stale_staging_directories", &remove_stale_staging_directories,
        py::arg("directory"), py::call_guard<py::gil_scoped_release>());
}

// Private hooks for the tests of error paths and resource accounting.
void bind_testing_aids(py::module_& m) {
  static const std::pair<const char*, FaultOp> kOps[] = {{"write", FaultOp::kWrite},
                                                         {"read", FaultOp::kRead},
                                                         {"fsync", FaultOp::kFsync},
                                                         {"rename", FaultOp::kRename},
                                                         {"fallocate", FaultOp::kFallocate}};
  m.def(
      "_inject_fault",
      [](const std::string& op, int err, uint64_t after) {
        for (const auto& [name, value] : kOps) {
          if (op == name) return inject_fault(value, err, after);
        }
        throw py::value_error("unknown fault operation " + quote(op));
      },
      py::arg("op"), py::arg("errno"), py::arg("after") = 0,
      "Makes system calls of kind `op` (write, read, fsync, rename, fallocate) fail with `errno` "
      "after the first `after` of them, until _clear_faults(). Testing aid.");
  m.def("_clear_faults", &clear_faults);
  m.def("_delay_chunks", &set_chunk_delay, py::arg("seconds"),
        "Makes every chunk of work (and every Ctrl-C check), save_async's background writes "
        "included, wait `seconds` first (0: off), so that a test can interrupt a call mid-way. "
        "Testing aid.");
  m.def(
      "_staging_stats",
      [] {
        auto s = StagingBuffer::stats();
        return py::make_tuple(s.live_buffers, s.live_bytes, s.idle_bytes);
      },
      "(buffers in use, their bytes, idle pooled bytes) of the staging pool. Testing aid.");
  m.def("_remove_stale_temp_files", &remove_stale_temp_files, py::arg("directory"));
  m.def("_stage_host_tensors", &set_stage_host_tensors, py::arg("on"),
        "While on, CPU tensors take the device staging paths (save, load, load_state_dict), "
        "so the pipeline runs without a device. Testing aid.");
  m.def("_staging_host_tensors", &stage_host_tensors);
  m.def(
      "_device_staging_stats",
      [] {
        StagingStats s = last_staging_stats();
        py::dict out;
        out["buffers"] = s.buffers;
        out["pinned"] = s.pinned;
        out["chunks"] = s.chunks;
        out["bytes"] = s.bytes;
        out["copies"] = s.copies;
        out["max_in_use"] = s.max_in_use;
        out["in_use"] = s.in_use;
        out["order"] = s.order;
        return out;
      },
      "What the last staged save or load did with its pool of host buffers. Testing aid.");
  m.attr("CHUNK_BYTES") = kChunkBytes;
  m.attr("DEFAULT_STAGING_BYTES") = kDefaultStagingBytes;
}

}  // namespace
}  // namespace zerockpt

PYBIND11_MODULE(_C, m) {
  using namespace zerockpt;
  m.doc() = "zerockpt's private C++ core. Use the zerockpt package instead.";
  register_errors(m);
  bind_progress(m);
  bind_options(m);
  bind_file(m);
  bind_tensor_facts(m);
  bind_staging(m);
  bind_async(m);
  bind_module_stream(m);
  m.def("save", &save_binding, py::arg("tensors"), py::arg("path"), py::arg("options"),
        py::arg("own_metadata") = py::none(), py::arg("progress") = nullptr);
  m.def("load", &load_binding, py::arg("path"), py::arg("options"), py::arg("progress") = nullptr);
  m.def("load_fd", &load_fd, py::arg("fd"), py::arg("base"), py::arg("name"), py::arg("exact_size"),
        py::arg("options"), py::arg("progress") = nullptr);
  m.def("save_fd", &save_fd, py::arg("tensors"), py::arg("fd"), py::arg("base"), py::arg("name"),
        py::arg("options"), py::arg("own_metadata") = py::none(), py::arg("progress") = nullptr);
  m.def("save_stream", &save_stream, py::arg("tensors"), py::arg("write"),
        py::arg("rewrite_prefix"), py::arg("name"), py::arg("options"),
        py::arg("own_metadata") = py::none(), py::arg("progress") = nullptr);
  m.def("save_bytes", &save_bytes, py::arg("tensors"), py::arg("options"),
        py::arg("own_metadata") = py::none(), py::arg("progress") = nullptr);
  m.def("header_length", &header_length, py::arg("prefix"), py::arg("name"));
  m.def("image_size", &image_size, py::arg("head"), py::arg("name"));
  m.def(
      "_crc32c",
      [](const py::bytes& data, uint32_t crc, bool portable) {
        char* ptr = nullptr;
        Py_ssize_t size = 0;
        if (PyBytes_AsStringAndSize(data.ptr(), &ptr, &size) != 0) throw py::error_already_set();
        auto n = static_cast<size_t>(size);
        return portable ? crc32c_portable(ptr, n, crc) : crc32c(ptr, n, crc);
      },
      py::arg("data"), py::arg("crc") = 0, py::arg("portable") = false,
      "CRC-32C of a buffer (testing aid; `portable` forces the table-driven implementation).");
  m.def("_crc32c_combine", &crc32c_combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("len_b"));
  m.attr("CRC32C_BACKEND") = crc32c_backend();
  bind_testing_aids(m);
  m.attr("CHECKSUM_KEY") = kChecksumKey;
  m.def("default_threads", &default_threads);
  m.def("state_dict",
        static_cast<py::object (*)(py::handle, py::object, py::str, py::object)>(&state_dict),
        py::arg("module"), py::arg("destination"), py::arg("prefix"), py::arg("keep_vars"));
  m.def("_state_dict_floor", &state_dict_floor, py::arg("module"), py::arg("keep_vars"),
        "Benchmark aid: only the irreducible work of state_dict() for plain modules.");
  m.def("_state_dict_gc_pause", &set_gc_pause, py::arg("on"),
        "Benchmark aid: whether state_dict() pauses the cyclic GC while only C++ allocates "
        "(default True); returns the previous setting.");
  // `options`: threads and staging_bytes (a file is read straight into the parameters).
  m.def(
      "load_state_dict",
      [](py::object module, py::object source, py::object metadata, py::object assign,
         std::shared_ptr<CheckpointFile> file, const LoadOptions& options,
         std::shared_ptr<Progress> progress) {
        return load_state_dict(std::move(module), std::move(source), std::move(metadata),
                               std::move(assign), std::move(file), options.threads,
                               std::move(progress), options.staging_bytes);
      },
      py::arg("module"), py::arg("source"), py::arg("metadata"), py::arg("assign"), py::arg("file"),
      py::arg("options"), py::arg("progress") = nullptr);
  m.attr("FORMAT_VERSION") = kFormatVersion;
  m.attr("RESERVED_PREFIX") = kReservedPrefix;
  m.attr("STATE_DICT_METADATA_KEY") = kStateDictMetadataKey;
}
