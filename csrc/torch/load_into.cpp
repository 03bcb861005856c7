#include "torch/load_into.h"

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "core/file.h"
#include "core/io_engine.h"
#include "core/parallel.h"
#include "torch/dtypes.h"
#include "zerockpt/errors.h"

namespace zerockpt {
namespace {

// [begin, end) of the bytes a CPU view can touch; empty for empty tensors.
std::pair<uintptr_t, uintptr_t> byte_extent(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.const_data_ptr() == b.const_data_ptr() && a.dtype() == b.dtype() &&
         a.sizes() == b.sizes() && a.strides() == b.strides();
}

// One piece of a staged copy: `target` (a view) takes the stored bytes at `file_offset`.
struct Slab {
  at::Tensor target;
  uint64_t file_offset;
  uint64_t nbytes;
  c10::ScalarType stored;
};

// Cuts `target` into views whose stored bytes are at most kChunkBytes (or one row that cannot
// be cut further: a single element).
void cut_slabs(const at::Tensor& target, uint64_t file_offset, c10::ScalarType stored,
               std::vector<Slab>& out) {
  const uint64_t item = c10::elementSize(stored);
  uint64_t nbytes = static_cast<uint64_t>(target.numel()) * item;
  if (nbytes == 0) return;
  if (nbytes <= kChunkBytes || target.dim() == 0) {
    out.push_back({target, file_offset, nbytes, stored});
    return;
  }
  int64_t rows = target.size(0);
  uint64_t row_bytes = nbytes / static_cast<uint64_t>(rows);
  if (row_bytes <= kChunkBytes) {
    int64_t per = static_cast<int64_t>(kChunkBytes / row_bytes);
    for (int64_t i = 0; i < rows; i += per) {
      int64_t n = std::min(per, rows - i);
      out.push_back({target.narrow(0, i, n), file_offset + static_cast<uint64_t>(i) * row_bytes,
                     static_cast<uint64_t>(n) * row_bytes, stored});
    }
    return;
  }
  for (int64_t i = 0; i < rows; ++i) {
    cut_slabs(target.select(0, i), file_offset + static_cast<uint64_t>(i) * row_bytes, stored, out);
  }
}

void throw_no_torch_dtype(const CheckpointFile& file, const TensorRecord& r) {
  throw DtypeError(file.file().path() + ": tensor " + quote(r.name) + " has dtype " +
                   dtype_name(r.dtype) + ", which has no torch equivalent");
}

}  // namespace

void check_torch_dtypes(const CheckpointFile& file) {
  for (const TensorRecord& r : file.file().header().tensors) {
    if (!to_scalar_type(r.dtype)) throw_no_torch_dtype(file, r);
  }
}

bool LoadPlan::conflicts(const at::Tensor& target) const {
  if (!target.is_cpu() || extents_.empty()) return false;
  auto [begin, end] = byte_extent(target);
  if (begin == end) return false;
  auto it = extents_.upper_bound(begin);
  if (it != extents_.begin()) {
    auto prev = std::prev(it);
    if (prev->second.end > begin && !same_view(jobs_[prev->second.job].target, target)) {
      return true;
    }
  }
  for (; it != extents_.end() && it->first < end; ++it) {
    if (!same_view(jobs_[it->second.job].target, target)) return true;
  }
  return false;
}

void LoadPlan::add(const at::Tensor& target, const TensorRecord& record) {
  if (!to_scalar_type(record.dtype)) throw_no_torch_dtype(file_, record);
  if (target.is_meta()) return;  // copy_ into a meta tensor moves no data
  size_t index = jobs_.size();
  if (target.is_cpu()) {
    auto [begin, end] = byte_extent(target);
    if (begin == end) return;
    auto found = extents_.find(begin);
    if (found != extents_.end() && same_view(jobs_[found->second.job].target, target)) {
      jobs_[found->second.job].dropped = true;
      found->second = {end, index};
    } else {
      extents_[begin] = {end, index};
    }
  }
  jobs_.push_back({target, &record});
}

void LoadPlan::run() {
  const SafetensorsFile& file = file_.file();
  const uint64_t data_start = file.header().data_start;
  std::vector<ReadRange> direct;
  std::vector<Slab> slabs;
  std::vector<size_t> other_device;
  {
    // Views cut here are plain (no autograd view tracking, no version bumps).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (size_t i = 0; i < jobs_.size(); ++i) {
      const Job& job = jobs_[i];
      if (job.dropped) continue;
      const TensorRecord& r = *job.record;
      if (!job.target.is_cpu()) {
        other_device.push_back(i);
        continue;
      }
      auto stored = to_scalar_type(r.dtype);
      if (job.target.is_contiguous() && stored == job.target.scalar_type() &&
          !job.target.is_conj() && !job.target.is_neg()) {
        if (r.nbytes() > 0) {
          direct.push_back({data_start + r.begin, r.nbytes(),
                            static_cast<uint8_t*>(job.target.mutable_data_ptr())});
        }
      } else {
        cut_slabs(job.target, data_start + r.begin, *stored, slabs);
      }
    }
  }
  const std::string what = "loading from " + file.path();
  if (progress_) {
    uint64_t converted = 0;
    for (const Slab& slab : slabs) converted += slab.nbytes;
    for (size_t i : other_device) converted += jobs_[i].record->nbytes();
    expect_progress(progress_, converted, what);
  }
  read_ranges(file.fd(), file.path(), std::move(direct), threads_, progress_);
  if (!slabs.empty()) {
    unsigned threads = threads_ ? threads_ : default_threads();
    parallel_for(slabs.size(), threads, [&](size_t i) {
      if (progress_) progress_->check(what);
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const Slab& slab = slabs[i];
      // Every slab fits one pooled chunk-sized buffer (a lone element is smaller still).
      StagingBuffer staging(std::max<uint64_t>(kChunkBytes, slab.nbytes));
      pread_full(file.fd(), staging.data(), slab.nbytes, slab.file_offset, file.path());
      at::Tensor stored = at::from_blob(staging.data(), slab.target.sizes(),
                                        at::TensorOptions().dtype(slab.stored));
      slab.target.copy_(stored);
      if (progress_) progress_->add(slab.nbytes);
    });
  }
  for (size_t i : other_device) {
    if (progress_) progress_->check(what);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    jobs_[i].target.copy_(file_.tensor(*jobs_[i].record, /*mmap=*/true));
    if (progress_) progress_->add(jobs_[i].record->nbytes());
  }
  jobs_.clear();
  extents_.clear();
}

}  // namespace zerockpt
