// The dtypes the safetensors format names: the one table of them, with their bit widths and
// the torch type each maps to. Pure data; thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace zerockpt {

// X(enumerator, format name, bits per element, c10::ScalarType name or Undefined). The torch
// column is a bare token here (core knows no torch); torch/dtypes.cpp expands it. Undefined:
// torch has no such element type. safetensors' torch table, plus F8_E8M0 and F4, which holds
// two 4-bit values per torch element (torch/dtypes.h converts the shapes).
#define ZEROCKPT_FORALL_DTYPES(X)                    \
  X(kBool, "BOOL", 8, Bool)                          \
  X(kU8, "U8", 8, Byte)                              \
  X(kI8, "I8", 8, Char)                              \
  X(kF8_E5M2, "F8_E5M2", 8, Float8_e5m2)             \
  X(kF8_E4M3, "F8_E4M3", 8, Float8_e4m3fn)           \
  X(kF8_E4M3FNUZ, "F8_E4M3FNUZ", 8, Float8_e4m3fnuz) \
  X(kF8_E5M2FNUZ, "F8_E5M2FNUZ", 8, Float8_e5m2fnuz) \
  X(kF8_E8M0, "F8_E8M0", 8, Float8_e8m0fnu)          \
  X(kI16, "I16", 16, Short)                          \
  X(kU16, "U16", 16, UInt16)                         \
  X(kF16, "F16", 16, Half)                           \
  X(kBF16, "BF16", 16, BFloat16)                     \
  X(kI32, "I32", 32, Int)                            \
  X(kU32, "U32", 32, UInt32)                         \
  X(kF32, "F32", 32, Float)                          \
  X(kF64, "F64", 64, Double)                         \
  X(kI64, "I64", 64, Long)                           \
  X(kU64, "U64", 64, UInt64)                         \
  X(kC64, "C64", 64, ComplexFloat)                   \
  X(kF4, "F4", 4, Float4_e2m1fn_x2)                  \
  X(kF6_E2M3, "F6_E2M3", 6, Undefined)               \
  X(kF6_E3M2, "F6_E3M2", 6, Undefined)

enum class Dtype : uint8_t {
#define ZEROCKPT_DTYPE_ENUM(name, text, bits, torch) name,
  ZEROCKPT_FORALL_DTYPES(ZEROCKPT_DTYPE_ENUM)
#undef ZEROCKPT_DTYPE_ENUM
};

// Format name, e.g. "F32".
const char* dtype_name(Dtype d);
// Bits per element (4 and 6 for the packed float formats).
unsigned dtype_bits(Dtype d);
// Parses a format name; nullopt if the format does not define it.
std::optional<Dtype> parse_dtype(const std::string& name);

}  // namespace zerockpt
