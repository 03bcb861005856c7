// The public C++ API (zerockpt/zerockpt.h) over the torch layer.
#include <ATen/ATen.h>

#include "core/hash.h"
#include "torch/async_save.h"
#include "torch/load_into.h"
#include "torch/options.h"
#include "torch/tensor_io.h"
#include "zerockpt/zerockpt.h"

namespace zerockpt {

WriteOptions write_options(const SaveOptions& options, Progress* progress) {
  WriteOptions out;
  out.durable = options.durable;
  out.direct_io = to_direct_io(options.direct_io);
  out.threads = options.threads;
  out.checksums = options.checksums;
  out.progress = progress;
  out.staging_bytes = options.staging_bytes;
  return out;
}

TensorDict state_dict(const torch::nn::Module& module) {
  TensorDict out;
  for (const auto& item : module.named_modules("", /*include_self=*/true)) {
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    for (const auto& p : item.value()->named_parameters(/*recurse=*/false)) {
      if (p.value().defined()) out.insert(prefix + p.key(), p.value());
    }
    for (const auto& b : item.value()->named_buffers(/*recurse=*/false)) {
      if (b.value().defined()) out.insert(prefix + b.key(), b.value());
    }
  }
  return out;
}

namespace {

NamedTensors named_tensors(const TensorDict& tensors) {
  NamedTensors entries;
  entries.reserve(tensors.size());
  for (const auto& item : tensors) entries.emplace_back(item.key(), item.value());
  return entries;
}

}  // namespace

const std::string& SaveFuture::path() const { return pending_->path(); }
bool SaveFuture::done() const { return pending_->done(); }
bool SaveFuture::wait(double seconds) const { return pending_->wait(seconds); }
void SaveFuture::get() const {
  if (std::exception_ptr error = pending_->error()) std::rethrow_exception(error);
}

SaveFuture save_async(const TensorDict& tensors, const std::string& path,
                      const SaveOptions& options) {
  return SaveFuture(
      save_tensors_async(named_tensors(tensors), path, options.metadata, write_options(options)));
}

SaveFuture save_async(const torch::nn::Module& module, const std::string& path,
                      const SaveOptions& options) {
  return save_async(state_dict(module), path, options);
}

void save(const TensorDict& tensors, const std::string& path, const SaveOptions& options) {
  save_tensors(named_tensors(tensors), path, options.metadata, write_options(options));
}

void save(const torch::nn::Module& module, const std::string& path, const SaveOptions& options) {
  save(state_dict(module), path, options);
}

TensorDict load(const std::string& path, const LoadOptions& options) {
  CheckpointFile file(path);
  TensorDict out;
  out.reserve(file.names().size());
  NamedTensors loaded = options.device.is_cpu()
                            ? file.load_all(options.mmap, options.threads, options.verify)
                            : load_to_device(file, options.device, options.threads, options.verify,
                                             options.staging_bytes, nullptr);
  for (auto& [name, tensor] : loaded) {
    out.insert(std::move(name), std::move(tensor));
  }
  return out;
}

LoadResult load_state_dict(torch::nn::Module& module, const std::string& path, bool strict,
                           bool verify) {
  CheckpointFile file(path);
  if (verify) file.file().raise_on_failure(file.file().verify(0));
  TensorDict targets = state_dict(module);
  LoadResult result;
  std::vector<std::string> errors;
  std::vector<std::pair<at::Tensor, const TensorRecord*>> copies;
  for (const auto& item : targets) {
    const TensorRecord* record = file.find(item.key());
    if (!record) {
      result.missing_keys.push_back(item.key());
      continue;
    }
    std::vector<int64_t> shape = torch_sizes(*record, path);
    if (c10::IntArrayRef(shape) != item.value().sizes()) {
      errors.push_back(size_mismatch_message(item.key(), shape, item.value().sizes()));
      continue;
    }
    copies.emplace_back(item.value(), record);
  }
  SeededSet<std::string> wanted;
  for (const auto& item : targets) wanted.insert(item.key());
  for (const auto& name : file.names()) {
    if (!wanted.count(name)) result.unexpected_keys.push_back(name);
  }
  std::string message = load_state_dict_message(
      module.name(), result.missing_keys, result.unexpected_keys, errors, strict, " from " + path);
  if (!message.empty()) throw UsageError(message);
  // Straight into the existing storage (parallel preads, or chunked conversion), as copy_
  // would, then one version bump per tensor, as copy_ does.
  check_torch_dtypes(file);
  LoadPlan plan(file, 0);
  for (auto& [target, record] : copies) {
    if (plan.conflicts(target)) plan.run();
    plan.add(target, *record);
    target.unsafeGetTensorImpl()->bump_version();
  }
  plan.run();
  return result;
}

}  // namespace zerockpt
