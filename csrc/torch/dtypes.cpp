#include "torch/dtypes.h"

namespace zerockpt {
namespace {

// c10's scalar type per format dtype (Undefined: torch has none), in Dtype order.
constexpr c10::ScalarType kScalarTypes[] = {
#define ZEROCKPT_DTYPE_SCALAR(name, text, bits, torch) c10::ScalarType::torch,
    ZEROCKPT_FORALL_DTYPES(ZEROCKPT_DTYPE_SCALAR)
#undef ZEROCKPT_DTYPE_SCALAR
};

}  // namespace

std::optional<Dtype> to_format_dtype(c10::ScalarType t) {
  if (t == c10::ScalarType::Undefined) return std::nullopt;
  for (size_t i = 0; i < std::size(kScalarTypes); ++i) {
    if (kScalarTypes[i] == t) return static_cast<Dtype>(i);
  }
  return std::nullopt;
}

std::optional<c10::ScalarType> to_scalar_type(Dtype d) {
  c10::ScalarType t = kScalarTypes[static_cast<size_t>(d)];
  if (t == c10::ScalarType::Undefined) return std::nullopt;
  return t;
}

int64_t values_per_item(Dtype d) { return d == Dtype::kF4 ? 2 : 1; }

std::vector<uint64_t> format_shape(Dtype d, c10::IntArrayRef sizes) {
  std::vector<uint64_t> shape(sizes.begin(), sizes.end());
  if (!shape.empty()) shape.back() *= static_cast<uint64_t>(values_per_item(d));
  return shape;
}

}  // namespace zerockpt
