// Tensor identity operations the module walks need, written to give exactly what the
// corresponding ATen operator gives, cheaper where the tensor is an ordinary dense one.
// Thread-compatible; no Python.
#pragma once

#include <ATen/core/Tensor.h>

namespace zerockpt {

// True when the thread runs with the default dispatch state (no inference mode, no Python or
// functorch modes), where the fast paths below are equivalent to the operators.
bool default_dispatch_state();

// Same result as `t.detach()`: a tensor sharing storage, sizes, strides, conj/neg bits and
// version counter, without autograd metadata. Skips the dispatcher for plain dense tensors.
at::Tensor detach_shared(const at::Tensor& t);

}  // namespace zerockpt
