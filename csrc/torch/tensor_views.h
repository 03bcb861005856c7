// Tensor identity operations the module walks need, written to give exactly what the
// corresponding ATen operator gives, cheaper where the tensor is an ordinary dense one.
// Thread-compatible; no Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace zerockpt {

// True when the thread runs with the default dispatch state (no inference mode, no Python or
// functorch modes), where the fast paths below are equivalent to the operators.
bool default_dispatch_state();

// Same result as `t.detach()`: a tensor sharing storage, sizes, strides, conj/neg bits and
// version counter, without autograd metadata. Skips the dispatcher for plain dense tensors.
at::Tensor detach_shared(const at::Tensor& t);

// Why the bytes of `t` cannot be read or written in place, or nullopt for a strided tensor with
// memory of its own (CPU or device) whose storage holds every byte of the view. `type_error`
// problems are tensors of another kind (nested, sparse, zero, wrapper subclasses with their own
// dispatch such as DTensor, FakeTensor or FunctionalTensor); the others are tensors without data
// (meta) or broken views (storage smaller than the view), which torch's own kernels overrun.
struct MemoryProblem {
  bool type_error;
  std::string why;  // completes "tensor 'name' ..."
};
std::optional<MemoryProblem> memory_problem(const at::Tensor& t);

// Throws DtypeError (a `type_error` problem) or UsageError naming `what` ("tensor 'x'") if
// memory_problem(t).
void check_memory(const std::string& what, const at::Tensor& t);

}  // namespace zerockpt
