// The public C++ API (zerockpt/zerockpt.h) over the torch layer.
#include <ATen/ATen.h>

#include <sstream>

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

namespace {

std::string join_quoted(const std::vector<std::string>& keys) {
  std::string out;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (i) out += ", ";
    out += '"' + keys[i] + '"';
  }
  return out;
}

std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream s;
  s << "torch.Size([";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << "])";
  return s.str();
}

}  // namespace

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
    std::vector<int64_t> shape(record->shape.begin(), record->shape.end());
    if (c10::IntArrayRef(shape) != item.value().sizes()) {
      errors.push_back("size mismatch for " + item.key() + ": copying a param with shape " +
                       shape_str(shape) + " from checkpoint, the shape in current model is " +
                       shape_str(item.value().sizes()) + ".");
      continue;
    }
    copies.emplace_back(item.value(), record);
  }
  SeededSet<std::string> wanted;
  for (const auto& item : targets) wanted.insert(item.key());
  for (const auto& name : file.names()) {
    if (!wanted.count(name)) result.unexpected_keys.push_back(name);
  }
  if (strict && !result.unexpected_keys.empty()) {
    errors.insert(errors.begin(),
                  "Unexpected key(s) in state_dict: " + join_quoted(result.unexpected_keys) + ". ");
  }
  if (strict && !result.missing_keys.empty()) {
    errors.insert(errors.begin(),
                  "Missing key(s) in state_dict: " + join_quoted(result.missing_keys) + ". ");
  }
  if (!errors.empty()) {
    std::string message =
        "Error(s) in loading state_dict for " + module.name() + " from " + path + ":\n\t";
    for (size_t i = 0; i < errors.size(); ++i) message += (i ? "\n\t" : "") + errors[i];
    throw UsageError(message);
  }
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
