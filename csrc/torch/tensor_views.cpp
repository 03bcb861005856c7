#include "torch/tensor_views.h"

#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <type_traits>
#include <typeinfo>
#include <utility>

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

}  // namespace zerockpt
