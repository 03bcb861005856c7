# Locates the torch that ${Python_EXECUTABLE} imports (never another one): its CMake package
# and ABI flags. C++-only builds may pass Python_EXECUTABLE, or Torch_DIR for a plain libtorch.
if(NOT Python_EXECUTABLE AND NOT Torch_DIR)
  find_package(Python 3.10 COMPONENTS Interpreter)
endif()
if(Torch_DIR)
  find_package(Torch CONFIG REQUIRED)
  return()
endif()
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
  OUTPUT_VARIABLE ZEROCKPT_TORCH_PREFIX
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _torch_found)
if(NOT _torch_found EQUAL 0)
  message(FATAL_ERROR
    "zerockpt builds against an installed torch, but '${Python_EXECUTABLE}' cannot import it.\n"
    "Install torch first, then build with: pip install --no-build-isolation .")
endif()
list(APPEND CMAKE_PREFIX_PATH "${ZEROCKPT_TORCH_PREFIX}")
# torch's config looks for CUDA/cuDNN when they are present; the extension itself needs none.
find_package(Torch CONFIG REQUIRED)
message(STATUS "zerockpt: torch ${Torch_VERSION} at ${TORCH_INSTALL_PREFIX}")
