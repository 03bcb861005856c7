#include "torch/tensor_views.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <type_traits>
#include <typeinfo>
#include <utility>

#include "zerockpt/errors.h"

namespace zerockpt {
namespace {

// TensorImpl::fake_tensor_mode() exists from torch 2.13 on; before it, no C++ fake mode exists.
template <typename Impl, typename = void>
struct HasFakeTensorMode : std::false_type {};
template <typename Impl>
struct HasFakeTensorMode<Impl,
                         std::void_t<decltype(std::declval<const Impl&>().fake_tensor_mode())>>
    : std::true_type {};

template <typename Impl>
bool has_fake_tensor_mode(const Impl* impl) {
  if constexpr (HasFakeTensorMode<Impl>::value) {
    return impl->fake_tensor_mode() != nullptr;
  } else {
    return false;
  }
}

}  // namespace

bool default_dispatch_state() {
  c10::impl::LocalDispatchKeySet tls = c10::impl::tls_local_dispatch_key_set();
  return tls.included_ == c10::default_included_set && tls.excluded_ == c10::default_excluded_set;
}

at::Tensor detach_shared(const at::Tensor& t) {
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  // ATen's detach (autograd and ADInplaceOrView kernels) aliases the tensor, then takes a
  // shallow copy that keeps the base's version counter, forbids metadata changes and drops
  // autograd metadata. For a plain dense CPU or CUDA TensorImpl without extra metadata (fake
  // mode, backend data) that is this one shallow copy.
  if (typeid(*impl) == typeid(c10::TensorImpl) && t.layout() == at::kStrided &&
      (t.is_cpu() || t.is_cuda()) && !has_fake_tensor_mode(impl) &&
      !impl->get_backend_meta_intrusive_ptr() && default_dispatch_state()) {
    c10::intrusive_ptr<c10::TensorImpl> out = impl->shallow_copy_and_detach(
        impl->version_counter(), /*allow_tensor_metadata_change=*/false);
    out->set_autograd_meta(nullptr);
    return at::Tensor(std::move(out));
  }
  return t.detach();
}

std::optional<MemoryProblem> memory_problem(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  // Checked before anything that asks for sizes: these kinds throw "Internal error" there.
  if (impl->is_nested()) {
    return MemoryProblem{true,
                         "is a nested tensor, which has no single dense memory: save its "
                         ".unbind() pieces or .to_padded_tensor(0)"};
  }
  // Wrappers whose TensorImpl does not hold their data (or holds none at all).
  static const c10::DispatchKeySet kWrappers({
      c10::DispatchKey::Python,
      c10::DispatchKey::PythonTLSSnapshot,
      c10::DispatchKey::Functionalize,
      c10::DispatchKey::FuncTorchBatched,
      c10::DispatchKey::BatchedNestedTensor,
      c10::DispatchKey::FuncTorchGradWrapper,
  });
  if (impl->key_set().has_any(kWrappers) || impl->has_symbolic_sizes_strides()) {
    return MemoryProblem{true,
                         "is a tensor subclass or wrapper with its own dispatch (such as DTensor, "
                         "FakeTensor, FunctionalTensor or a functorch wrapper), whose memory is "
                         "not its data: pass a plain tensor (for a DTensor, .full_tensor())"};
  }
  if (t.layout() != at::kStrided) {
    return MemoryProblem{true, "has layout " + c10::str(t.layout()) +
                                   "; only strided (dense) tensors can be saved: call "
                                   ".to_dense() first"};
  }
  if (impl->_is_zerotensor()) {
    return MemoryProblem{true,
                         "is a zero tensor (torch._efficientzerotensor), which has no "
                         "memory: pass torch.zeros_like(...) instead"};
  }
  if (t.device().is_meta()) return MemoryProblem{false, "is on meta, which holds no data"};
  if (t.numel() == 0) return std::nullopt;
  if (!t.has_storage()) {
    return MemoryProblem{false, "has no storage (a fake or functional tensor?)"};
  }
  const c10::Storage& storage = impl->unsafe_storage();
  size_t needed = 0;
  try {
    needed = at::detail::computeStorageNbytes(t.sizes(), t.strides(), t.element_size(),
                                              static_cast<size_t>(t.storage_offset()));
  } catch (const c10::Error&) {
    return MemoryProblem{false, "has sizes and strides whose byte extent overflows"};
  }
  if (storage.nbytes() < needed) {
    return MemoryProblem{false, "views " + std::to_string(needed) + " bytes of a storage of only " +
                                    std::to_string(storage.nbytes()) +
                                    " bytes (its storage was resized or set_() smaller)"};
  }
  if (storage.data() == nullptr) return MemoryProblem{false, "has a storage without memory"};
  return std::nullopt;
}

void check_memory(const std::string& what, const at::Tensor& t) {
  auto problem = memory_problem(t);
  if (!problem) return;
  if (problem->type_error) throw DtypeError(what + " " + problem->why);
  throw UsageError(what + " " + problem->why);
}

}  // namespace zerockpt
