#include "torch/dtypes.h"

namespace zerockpt {
namespace {

struct Pair {
  c10::ScalarType scalar;
  Dtype dtype;
};

// safetensors' own torch table, plus float8_e8m0fnu (named F8_E8M0 by the format).
constexpr Pair kPairs[] = {
    {c10::ScalarType::Bool, Dtype::kBool},
    {c10::ScalarType::Byte, Dtype::kU8},
    {c10::ScalarType::Char, Dtype::kI8},
    {c10::ScalarType::Short, Dtype::kI16},
    {c10::ScalarType::UInt16, Dtype::kU16},
    {c10::ScalarType::Int, Dtype::kI32},
    {c10::ScalarType::UInt32, Dtype::kU32},
    {c10::ScalarType::Long, Dtype::kI64},
    {c10::ScalarType::UInt64, Dtype::kU64},
    {c10::ScalarType::Half, Dtype::kF16},
    {c10::ScalarType::BFloat16, Dtype::kBF16},
    {c10::ScalarType::Float, Dtype::kF32},
    {c10::ScalarType::Double, Dtype::kF64},
    {c10::ScalarType::ComplexFloat, Dtype::kC64},
    {c10::ScalarType::Float8_e4m3fn, Dtype::kF8_E4M3},
    {c10::ScalarType::Float8_e5m2, Dtype::kF8_E5M2},
    {c10::ScalarType::Float8_e4m3fnuz, Dtype::kF8_E4M3FNUZ},
    {c10::ScalarType::Float8_e5m2fnuz, Dtype::kF8_E5M2FNUZ},
    {c10::ScalarType::Float8_e8m0fnu, Dtype::kF8_E8M0},
};

}  // namespace

std::optional<Dtype> to_format_dtype(c10::ScalarType t) {
  for (const auto& p : kPairs) {
    if (p.scalar == t) return p.dtype;
  }
  return std::nullopt;
}

std::optional<c10::ScalarType> to_scalar_type(Dtype d) {
  for (const auto& p : kPairs) {
    if (p.dtype == d) return p.scalar;
  }
  return std::nullopt;
}

}  // namespace zerockpt
