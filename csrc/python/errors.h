// Maps core exceptions to Python ones at the binding boundary: FormatError ->
// zerockpt.FormatError (a ValueError), IoError -> OSError(errno, message, filename),
// DtypeError -> TypeError, UsageError -> ValueError. Requires GIL.
#pragma once

#include <torch/csrc/utils/pybind.h>

namespace zerockpt {

void register_errors(pybind11::module_& m);

}  // namespace zerockpt
