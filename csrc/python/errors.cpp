#include "python/errors.h"

#include "zerockpt/errors.h"

namespace py = pybind11;

namespace zerockpt {
namespace {

PyObject* g_format_error = nullptr;
PyObject* g_checksum_error = nullptr;

void raise_os_error(const IoError& e) {
  py::object filename = py::reinterpret_steal<py::object>(
      PyUnicode_DecodeFSDefaultAndSize(e.path().data(), static_cast<Py_ssize_t>(e.path().size())));
  if (!filename) throw py::error_already_set();
  // OSError(errno, strerror, filename) picks the subclass: FileNotFoundError, IsADirectoryError...
  py::tuple args = py::make_tuple(e.err(), e.detail(), filename);
  PyErr_SetObject(PyExc_OSError, args.ptr());
}

// Creates zerockpt.<name> deriving from `base` and adds it to `m`. Requires GIL.
PyObject* add_exception(py::module_& m, const char* name, const char* doc, PyObject* base) {
  std::string qualified = std::string("zerockpt.") + name;
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, base, nullptr);
  if (!type) throw py::error_already_set();
  m.add_object(name, py::handle(type));
  return type;
}

}  // namespace

void register_errors(py::module_& m) {
  g_format_error = add_exception(m, "FormatError",
                                 "The file is not a valid safetensors checkpoint. The message "
                                 "names the file and the tensor, key or offset at fault.",
                                 PyExc_ValueError);
  g_checksum_error = add_exception(
      m, "ChecksumError",
      "Tensor bytes in the file do not match their stored CRC-32C: the file was corrupted after "
      "it was written. The message names the file and every tensor that fails.",
      g_format_error);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ChecksumError& e) {
      PyErr_SetString(g_checksum_error, e.what());
    } catch (const FormatError& e) {
      PyErr_SetString(g_format_error, e.what());
    } catch (const IoError& e) {
      raise_os_error(e);
    } catch (const DtypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const UsageError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const Cancelled& e) {
      PyErr_SetString(PyExc_KeyboardInterrupt, e.what());
    }
  });
}

}  // namespace zerockpt
