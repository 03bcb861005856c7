// The mapping between torch scalar types and the format's dtypes, expanded from the one dtype
// table (core/dtype.h), and the shape rule of the packed F4 type. Thread-safe.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "core/dtype.h"

namespace zerockpt {

std::optional<Dtype> to_format_dtype(c10::ScalarType t);
std::optional<c10::ScalarType> to_scalar_type(Dtype d);

// Format elements per torch element: 2 for F4 (torch's float4_e2m1fn_x2 packs two 4-bit
// values in a byte, and the format counts values), else 1. The last dimension carries the
// factor, as safetensors does: torch [..., n] is stored [..., 2n].
int64_t values_per_item(Dtype d);

// The shape the header records for a torch tensor of `sizes` stored as `d`. A 0-dim F4 tensor
// has no such shape (the caller refuses it first: see tensor_io.cpp).
std::vector<uint64_t> format_shape(Dtype d, c10::IntArrayRef sizes);

}  // namespace zerockpt
