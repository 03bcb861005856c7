#include "torch/load_into.h"

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "core/file.h"
#include "core/io_engine.h"
#include "core/parallel.h"
#include "torch/device_staging.h"
#include "torch/dtypes.h"
#include "torch/tensor_views.h"
#include "zerockpt/errors.h"

namespace zerockpt {
namespace {

void throw_no_torch_dtype(const CheckpointFile& file, const TensorRecord& r) {
  throw DtypeError(file.file().path() + ": tensor " + quote(r.name) + " has dtype " +
                   dtype_name(r.dtype) + ", which has no torch equivalent");
}

}  // namespace

void check_torch_dtypes(const CheckpointFile& file) {
  for (const TensorRecord& r : file.file().header().tensors) {
    if (!to_scalar_type(r.dtype)) throw_no_torch_dtype(file, r);
    torch_sizes(r, file.file().path());  // an F4 shape torch cannot hold
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
  check_memory("the target of tensor " + quote(record.name), target);
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
  std::vector<Slab> staged;
  {
    // Views cut here are plain (no autograd view tracking, no version bumps).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (const Job& job : jobs_) {
      if (job.dropped) continue;
      const TensorRecord& r = *job.record;
      auto stored = *to_scalar_type(r.dtype);
      const at::Tensor& target = job.target;
      bool dense = target.is_contiguous() && !target.is_conj() && !target.is_neg();
      if (is_staged(target)) {
        // Flattened when dense, so slabs fill whole chunks whatever the shape.
        cut_slabs(dense ? target.reshape({-1}) : target, data_start + r.begin, stored, staged);
      } else if (dense && stored == target.scalar_type()) {
        if (r.nbytes() > 0) {
          direct.push_back(
              {data_start + r.begin, r.nbytes(), static_cast<uint8_t*>(target.mutable_data_ptr())});
        }
      } else {
        cut_slabs(target, data_start + r.begin, stored, slabs);
      }
    }
  }
  const std::string what = "loading from " + file.path();
  if (progress_) {
    uint64_t converted = 0;
    for (const Slab& slab : slabs) converted += slab.nbytes;
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
  copy_slabs_to_devices(file, std::move(staged), threads_, staging_bytes_, progress_);
  jobs_.clear();
  extents_.clear();
}

NamedTensors load_to_device(CheckpointFile& file, const c10::Device& device, unsigned threads,
                            bool verify, uint64_t staging_bytes, Progress* progress) {
  check_torch_dtypes(file);
  staging_buffers(staging_bytes);  // a bad size fails before anything is read
  if (verify) {
    // Checked through the mapping before any copy: a device has no CRC-32C of its own here.
    VerifyResult result = file.file().verify(threads, progress);
    file.file().raise_on_failure(result);
  }
  const Header& h = file.file().header();
  std::vector<at::Tensor> stored(h.tensors.size());
  LoadPlan plan(file, threads, progress, staging_bytes);
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    const TensorRecord& r = h.tensors[i];
    auto options = at::TensorOptions().dtype(*to_scalar_type(r.dtype)).device(device);
    stored[i] = at::empty(torch_sizes(r, file.file().path()), options);
    plan.add(stored[i], r);
  }
  plan.run();
  NamedTensors out;
  out.reserve(file.names().size());
  for (const auto& name : file.names()) {
    out.emplace_back(name, stored[static_cast<size_t>(file.find(name) - h.tensors.data())]);
  }
  return out;
}

namespace {

std::string size_repr(c10::IntArrayRef sizes) {
  std::string out = "torch.Size([";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "])";
}

std::string join_quoted(const std::vector<std::string>& keys) {
  std::string out;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (i) out += ", ";
    out += '"' + keys[i] + '"';
  }
  return out;
}

}  // namespace

std::string size_mismatch_message(const std::string& key, c10::IntArrayRef checkpoint,
                                  c10::IntArrayRef model) {
  return "size mismatch for " + key + ": copying a param with shape " + size_repr(checkpoint) +
         " from checkpoint, the shape in current model is " + size_repr(model) + ".";
}

std::string copy_error_message(const std::string& action, const std::string& key,
                               c10::IntArrayRef model, c10::IntArrayRef checkpoint,
                               const std::string& args_repr) {
  return "While " + action + " the parameter named \"" + key +
         "\", whose dimensions in the model are " + size_repr(model) +
         " and whose dimensions in the checkpoint are " + size_repr(checkpoint) +
         ", an exception occurred : " + args_repr + ".";
}

std::string load_state_dict_message(const std::string& module_name,
                                    const std::vector<std::string>& missing_keys,
                                    const std::vector<std::string>& unexpected_keys,
                                    const std::vector<std::string>& errors, bool strict,
                                    const std::string& source) {
  std::vector<std::string> all;
  if (strict && !missing_keys.empty()) {
    all.push_back("Missing key(s) in state_dict: " + join_quoted(missing_keys) + ". ");
  }
  if (strict && !unexpected_keys.empty()) {
    all.push_back("Unexpected key(s) in state_dict: " + join_quoted(unexpected_keys) + ". ");
  }
  all.insert(all.end(), errors.begin(), errors.end());
  if (all.empty()) return "";
  std::string message = "Error(s) in loading state_dict for " + module_name + source + ":\n\t";
  for (size_t i = 0; i < all.size(); ++i) message += (i ? "\n\t" : "") + all[i];
  return message;
}

}  // namespace zerockpt
