#include "core/dtype.h"

namespace zerockpt {
namespace {

struct DtypeInfo {
  Dtype dtype;
  const char* name;
  unsigned bits;
};

constexpr DtypeInfo kDtypes[] = {
#define ZEROCKPT_DTYPE_INFO(name, text, bits, torch) {Dtype::name, text, bits},
    ZEROCKPT_FORALL_DTYPES(ZEROCKPT_DTYPE_INFO)
#undef ZEROCKPT_DTYPE_INFO
};

const DtypeInfo& info(Dtype d) { return kDtypes[static_cast<size_t>(d)]; }

}  // namespace

const char* dtype_name(Dtype d) { return info(d).name; }
unsigned dtype_bits(Dtype d) { return info(d).bits; }

std::optional<Dtype> parse_dtype(const std::string& name) {
  for (const auto& entry : kDtypes) {
    if (name == entry.name) return entry.dtype;
  }
  return std::nullopt;
}

}  // namespace zerockpt
