# Locates the torch that ${Python_EXECUTABLE} imports (never another one): its CMake package,
# its ABI flags, and libtorch_python for the bindings.
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
find_library(TORCH_PYTHON_LIBRARY torch_python PATHS "${TORCH_INSTALL_PREFIX}/lib" REQUIRED
             NO_DEFAULT_PATH)
message(STATUS "zerockpt: torch ${Torch_VERSION} at ${TORCH_INSTALL_PREFIX}")
