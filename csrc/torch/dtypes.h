// The mapping between torch scalar types and the format's dtypes. Thread-safe.
#pragma once

#include <c10/core/ScalarType.h>

#include <optional>

#include "core/dtype.h"

namespace zerockpt {

std::optional<Dtype> to_format_dtype(c10::ScalarType t);
std::optional<c10::ScalarType> to_scalar_type(Dtype d);

}  // namespace zerockpt
