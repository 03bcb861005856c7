// Tensor identity operations: the ones the module walks need, written to give exactly what the
// corresponding ATen operator gives, cheaper where the tensor is an ordinary dense one; and the
// one computation of which tensors share memory. Thread-compatible; no Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

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

// [begin, end) of the addresses a strided view can touch (device addresses for a device
// tensor); {0, 0} for an empty one.
std::pair<uintptr_t, uintptr_t> byte_extent(const at::Tensor& t);

// True when `a` and `b` read and write the same bytes the same way: same address, dtype,
// sizes, strides, conj and neg bits. A copy into one is then a copy into the other, and one
// stored copy of either restores both.
bool same_view(const at::Tensor& a, const at::Tensor& b);

// Which of `tensors` share memory. Only views of one storage are compared (separate storages
// over the same memory stay separate, as torch.save keeps them); tensors without memory of
// their own (memory_problem) or without elements share nothing.
struct MemorySharing {
  // Per entry: the first entry it is the same_view of, or -1.
  std::vector<int64_t> alias_of;
  // Per entry: the first entry of its group, the views linked by overlapping bytes.
  std::vector<size_t> group;
  // The first two different views found to overlap (lower index first), if any.
  std::optional<std::pair<size_t, size_t>> conflict;
};
MemorySharing find_memory_sharing(const std::vector<at::Tensor>& tensors);

}  // namespace zerockpt
