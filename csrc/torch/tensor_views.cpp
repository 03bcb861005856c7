#include "torch/tensor_views.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
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

std::pair<uintptr_t, uintptr_t> byte_extent(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.const_data_ptr() == b.const_data_ptr() && a.scalar_type() == b.scalar_type() &&
         a.sizes() == b.sizes() && a.strides() == b.strides() && a.is_conj() == b.is_conj() &&
         a.is_neg() == b.is_neg();
}

namespace {

// The entries `idx` of one storage, swept by address: views overlapping an earlier one join
// its group (groups are runs of the sweep), and one that is the very same view as an earlier
// one is its alias.
void share_within_storage(const std::vector<at::Tensor>& tensors, const std::vector<size_t>& idx,
                          MemorySharing& out) {
  std::vector<std::pair<uintptr_t, uintptr_t>> ext(idx.size());
  for (size_t k = 0; k < idx.size(); ++k) ext[k] = byte_extent(tensors[idx[k]]);
  std::vector<size_t> order(idx.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return ext[a] != ext[b] ? ext[a] < ext[b] : idx[a] < idx[b];
  });
  uintptr_t max_end = 0;
  size_t max_owner = 0;
  size_t run_start = 0;  // position in `order` where the current group began
  auto close_run = [&](size_t run_end) {
    size_t first = idx[order[run_start]];
    for (size_t p = run_start; p < run_end; ++p) first = std::min(first, idx[order[p]]);
    for (size_t p = run_start; p < run_end; ++p) out.group[idx[order[p]]] = first;
  };
  for (size_t pos = 0; pos < order.size(); ++pos) {
    const size_t k = order[pos];
    const size_t i = idx[k];
    if (pos > 0 && ext[k].first >= max_end) {
      close_run(pos);
      run_start = pos;
    } else if (pos > 0) {
      int64_t target = -1;
      for (size_t back = pos; back-- > 0 && ext[order[back]] == ext[k];) {
        if (same_view(tensors[idx[order[back]]], tensors[i])) {
          const size_t earlier = idx[order[back]];
          target =
              out.alias_of[earlier] >= 0 ? out.alias_of[earlier] : static_cast<int64_t>(earlier);
          break;
        }
      }
      out.alias_of[i] = target;
      if (target < 0) {
        const size_t other = ext[order[pos - 1]] == ext[k] ? idx[order[pos - 1]] : idx[max_owner];
        auto pair = std::make_pair(std::min(other, i), std::max(other, i));
        if (!out.conflict || pair < *out.conflict) out.conflict = pair;
      }
    }
    if (pos == 0 || ext[k].second > max_end) {
      max_end = ext[k].second;
      max_owner = k;
    }
  }
  close_run(order.size());
}

}  // namespace

MemorySharing find_memory_sharing(const std::vector<at::Tensor>& tensors) {
  MemorySharing out;
  out.alias_of.assign(tensors.size(), -1);
  out.group.resize(tensors.size());
  std::iota(out.group.begin(), out.group.end(), 0);
  std::unordered_map<const void*, std::vector<size_t>> by_storage;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (!t.defined() || memory_problem(t) || t.numel() == 0) continue;
    by_storage[t.storage().unsafeGetStorageImpl()].push_back(i);
  }
  for (const auto& [storage, idx] : by_storage) {
    if (idx.size() > 1) share_within_storage(tensors, idx, out);
  }
  return out;
}

}  // namespace zerockpt
