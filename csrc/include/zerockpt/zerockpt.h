// zerockpt's C++ API for libtorch programs: the same safetensors files the Python package
// reads and writes, with the same key names as Python's state_dict(). No Python anywhere.
// Functions are thread-safe for distinct files; they throw the zerockpt::Error hierarchy
// (zerockpt/errors.h) with messages naming the file, tensor and offset.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/ordered_dict.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "zerockpt/errors.h"

namespace zerockpt {

using TensorDict = torch::OrderedDict<std::string, at::Tensor>;

struct SaveOptions {
  // fsync the file and its directory before returning.
  bool durable = true;
  // O_DIRECT through page-aligned staging; nullopt: for large durable saves (docs/design.md).
  std::optional<bool> direct_io;
  // Writer threads; 0: the default (docs/design.md).
  unsigned threads = 0;
  // Store each tensor's CRC-32C (computed while writing) for load's `verify`.
  bool checksums = true;
  // Extra __metadata__ entries; keys starting with "zerockpt." are reserved.
  std::vector<std::pair<std::string, std::string>> metadata;
  // Pinned host memory for copying accelerator tensors, in chunks; 0: the default
  // (docs/design.md).
  uint64_t staging_bytes = 0;
};

struct LoadOptions {
  // Zero-copy views of a private mapping (true), or fresh tensors read with pread.
  bool mmap = true;
  unsigned threads = 0;
  // Check every tensor against its stored CRC-32C; ChecksumError names those that fail. Files
  // without checksums (other writers) load unchecked.
  bool verify = false;
  // Where the tensors go. Accelerators are filled through pinned staging (asynchronous copies,
  // ready on the current stream when load returns); `mmap` is for the CPU only.
  c10::Device device = c10::kCPU;
  // Pinned host memory for that, in chunks; 0: the default (docs/design.md).
  uint64_t staging_bytes = 0;
};

// Saves tensors (CPU, or accelerators through a bounded pool of pinned chunks, copied ahead of
// the writers on a side stream that waits for the current one) atomically (temporary file +
// rename). Tensors that are the same view of
// one storage are written once and loaded back as one tensor.
void save(const TensorDict& tensors, const std::string& path, const SaveOptions& options = {});

// Saves a module's parameters and buffers under the names Python's state_dict() uses:
// per module, parameters then buffers, then its children depth-first ("fc1.weight", "0.bias").
void save(const torch::nn::Module& module, const std::string& path,
          const SaveOptions& options = {});

class PendingSave;

// A save_async in progress. A copyable handle; thread-safe.
class SaveFuture {
 public:
  const std::string& path() const;
  bool done() const;
  // Waits until the save is done or `seconds` pass (no limit if negative); true when done.
  bool wait(double seconds = -1) const;
  // Waits, then rethrows the save's error (IoError...) if it failed.
  void get() const;

 private:
  friend SaveFuture save_async(const TensorDict&, const std::string&, const SaveOptions&);
  explicit SaveFuture(std::shared_ptr<PendingSave> pending) : pending_(std::move(pending)) {}
  std::shared_ptr<PendingSave> pending_;
};

// Saves like save(), returning once the tensors are copied into a snapshot buffer that is kept
// and reused (pinned if some are on a GPU); a background thread writes the file. The tensors
// may change as soon as this returns. One save is in flight per process: this first waits for
// the previous one. Bad input throws here; write errors come from get().
SaveFuture save_async(const TensorDict& tensors, const std::string& path,
                      const SaveOptions& options = {});
SaveFuture save_async(const torch::nn::Module& module, const std::string& path,
                      const SaveOptions& options = {});

// The tensors a module saves, in that order (tensors are shared with the module, not copied).
TensorDict state_dict(const torch::nn::Module& module);

// Loads every tensor in saved order; CPU tensors, zero-copy mapped unless options.mmap=false.
TensorDict load(const std::string& path, const LoadOptions& options = {});

struct LoadResult {
  std::vector<std::string> missing_keys;     // in the module, not in the file
  std::vector<std::string> unexpected_keys;  // in the file, not in the module
};

// Copies the file's tensors into the module's existing parameters and buffers (dtype converted
// as copy_ does), like Python's load_state_dict. Throws UsageError naming every shape
// mismatch, and with `strict` every missing and unexpected key, before changing anything.
// `verify` checks the file's checksums first (ChecksumError, module untouched).
LoadResult load_state_dict(torch::nn::Module& module, const std::string& path, bool strict = true,
                           bool verify = false);

}  // namespace zerockpt
