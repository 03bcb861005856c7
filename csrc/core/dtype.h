// The dtypes the safetensors format names, with their bit widths. Pure data; thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace zerockpt {

enum class Dtype : uint8_t {
  kBool,
  kU8,
  kI8,
  kF8_E5M2,
  kF8_E4M3,
  kF8_E4M3FNUZ,
  kF8_E5M2FNUZ,
  kF8_E8M0,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64,
  kC64,
  kF4,
  kF6_E2M3,
  kF6_E3M2,
};

// Format name, e.g. "F32".
const char* dtype_name(Dtype d);
// Bits per element (4 and 6 for the packed float formats).
unsigned dtype_bits(Dtype d);
// Parses a format name; nullopt if the format does not define it.
std::optional<Dtype> parse_dtype(const std::string& name);

}  // namespace zerockpt
