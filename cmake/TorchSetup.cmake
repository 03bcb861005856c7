# Defines the imported target `torch` (headers + c10, torch_cpu, torch) and TORCH_PYTHON_LIBRARY
# for the torch that ${Python_EXECUTABLE} imports, never another one.
#
# The paths come from torch.utils.cpp_extension, as for any CPU-only extension, and the ABI flag
# from torch._C._GLIBCXX_USE_CXX11_ABI. We deliberately do not call find_package(Torch) on a
# Python torch: on the CUDA wheels its config searches for a CUDA toolkit that our users do not
# have and that we do not need (zerockpt has no CUDA sources; device work goes through c10's
# device-generic stream and event API, resolved at run time).
#
# A plain libtorch distribution (no Python) is still found through its CMake package: pass
# -DTorch_DIR=/path/to/libtorch/share/cmake/Torch. A parent project that already has a `torch`
# target keeps its own.
if(TARGET torch)
  return()
endif()
if(Torch_DIR)
  find_package(Torch CONFIG REQUIRED)
  find_library(TORCH_PYTHON_LIBRARY torch_python PATHS "${TORCH_INSTALL_PREFIX}/lib" NO_DEFAULT_PATH)
  return()
endif()
if(NOT Python_EXECUTABLE)
  find_package(Python 3.10 REQUIRED COMPONENTS Interpreter)
endif()

# One line each: version, include dirs, library dirs (|-separated), C++11 ABI flag.
set(_zerockpt_torch_query [=[
import sys
try:
    import torch
    import torch.utils.cpp_extension as ext
except Exception as exc:
    sys.exit(f"cannot import torch: {exc!r}")
print(torch.__version__)
print("|".join(ext.include_paths()))
print("|".join(ext.library_paths()))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
]=])
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "${_zerockpt_torch_query}"
  OUTPUT_VARIABLE _zerockpt_torch_out
  ERROR_VARIABLE _zerockpt_torch_err
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _zerockpt_torch_rc)
if(NOT _zerockpt_torch_rc EQUAL 0)
  message(FATAL_ERROR
    "zerockpt builds against an installed torch, but '${Python_EXECUTABLE}' cannot import it:\n"
    "${_zerockpt_torch_err}\n"
    "Install torch first, then build with: pip install --no-build-isolation .")
endif()
string(REGEX MATCHALL "[^\n]+" _zerockpt_torch_out "${_zerockpt_torch_out}")
list(GET _zerockpt_torch_out 0 Torch_VERSION)
list(GET _zerockpt_torch_out 1 TORCH_INCLUDE_DIRS)
list(GET _zerockpt_torch_out 2 _zerockpt_torch_libdirs)
list(GET _zerockpt_torch_out 3 _zerockpt_torch_abi)
string(REPLACE "|" ";" TORCH_INCLUDE_DIRS "${TORCH_INCLUDE_DIRS}")
string(REPLACE "|" ";" _zerockpt_torch_libdirs "${_zerockpt_torch_libdirs}")
list(GET _zerockpt_torch_libdirs 0 _zerockpt_torch_libdir)
get_filename_component(TORCH_INSTALL_PREFIX "${_zerockpt_torch_libdir}" DIRECTORY)

# Link by name, as torch.utils.cpp_extension does: c10, torch_cpu, torch (and torch_python for
# the Python module only). No CUDA library is needed: the device code is device-generic.
set(TORCH_LIBRARIES "")
foreach(_lib c10 torch_cpu torch)
  find_library(TORCH_${_lib}_LIBRARY ${_lib} PATHS ${_zerockpt_torch_libdirs} NO_DEFAULT_PATH)
  if(NOT TORCH_${_lib}_LIBRARY)
    message(FATAL_ERROR "zerockpt: lib${_lib} not found in ${_zerockpt_torch_libdirs}")
  endif()
  list(APPEND TORCH_LIBRARIES "${TORCH_${_lib}_LIBRARY}")
endforeach()
find_library(TORCH_PYTHON_LIBRARY torch_python PATHS ${_zerockpt_torch_libdirs} NO_DEFAULT_PATH)

set(TORCH_CXX_FLAGS "-D_GLIBCXX_USE_CXX11_ABI=${_zerockpt_torch_abi}")
add_library(torch INTERFACE IMPORTED GLOBAL)
set_target_properties(torch PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${TORCH_INCLUDE_DIRS}"
  INTERFACE_LINK_LIBRARIES "${TORCH_LIBRARIES}"
  INTERFACE_COMPILE_DEFINITIONS "_GLIBCXX_USE_CXX11_ABI=${_zerockpt_torch_abi}"
  INTERFACE_COMPILE_FEATURES cxx_std_20)  # torch >= 2.15's headers require C++20
message(STATUS "zerockpt: torch ${Torch_VERSION} at ${TORCH_INSTALL_PREFIX} (C++11 ABI ${_zerockpt_torch_abi})")
