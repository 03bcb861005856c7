// Copies stored tensors into existing tensors, as `target.copy_(stored)` would, without an
// intermediate copy of the whole tensor: CPU targets of the stored dtype that are contiguous
// get the bytes by parallel preads straight into their storage; others are converted chunk by
// chunk through small staging buffers; device tensors are filled through pinned staging
// (device_staging.h). No Python; `run` may be called without the GIL.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

#include "torch/tensor_io.h"

namespace zerockpt {

// Throws DtypeError naming the first tensor of `file` whose dtype (or F4 shape) has no torch
// equivalent, so that a load can fail before it changes anything.
void check_torch_dtypes(const CheckpointFile& file);

class LoadPlan {
 public:
  // `progress` (may be null, not owned) counts the bytes copied by run() and can stop it.
  // `staging_bytes`: host memory for device targets (0: kDefaultStagingBytes).
  LoadPlan(CheckpointFile& file, unsigned threads, Progress* progress = nullptr,
           uint64_t staging_bytes = 0)
      : file_(file), threads_(threads), progress_(progress), staging_bytes_(staging_bytes) {}

  // True if `target` shares bytes with a queued target without being the very same view:
  // run() the queue first, so that copies land in the order they were asked for.
  bool conflicts(const at::Tensor& target) const;
  // Queues copying `record` (same number of elements) into `target`. A queued copy into the
  // same view is dropped, as the later copy would overwrite it. Does not bump versions.
  void add(const at::Tensor& target, const TensorRecord& record);
  bool empty() const { return jobs_.empty(); }
  // Runs every queued copy; throws IoError on a failed read. Thread-compatible.
  void run();

 private:
  struct Job {
    at::Tensor target;
    const TensorRecord* record;
    bool dropped = false;
  };
  struct Extent {
    uintptr_t end;
    size_t job;
  };
  CheckpointFile& file_;
  unsigned threads_;
  Progress* progress_;
  uint64_t staging_bytes_;
  std::vector<Job> jobs_;
  std::map<uintptr_t, Extent> extents_;  // CPU target bytes [begin, end) -> job
};

// Loads every tensor of `file` into new tensors on `device`, through pinned staging (names in
// saved order; aliases are the same tensor). With `verify`, the checksums are checked first
// (ChecksumError naming the tensors that fail). Call it on the caller's thread: the tensors are
// ready on its current stream.
NamedTensors load_to_device(CheckpointFile& file, const c10::Device& device, unsigned threads,
                            bool verify, uint64_t staging_bytes, Progress* progress);

// torch's text for load_state_dict errors, the one place it is built. "size mismatch for
// `key`: ..." (one entry of the error list), with shapes as torch.Size prints them.
std::string size_mismatch_message(const std::string& key, c10::IntArrayRef checkpoint,
                                  c10::IntArrayRef model);
// "While `action` the parameter named "`key`", ...": the entry for an exception raised by a
// copy, `args_repr` being the repr of its args.
std::string copy_error_message(const std::string& action, const std::string& key,
                               c10::IntArrayRef model, c10::IntArrayRef checkpoint,
                               const std::string& args_repr);
// "Error(s) in loading state_dict for `module_name``source`:\n\t..." over `errors`, preceded,
// with `strict`, by the missing and the unexpected keys (as torch inserts them); "" when there
// is nothing to report. `source` is "" (torch's text) or, e.g., " from <path>".
std::string load_state_dict_message(const std::string& module_name,
                                    const std::vector<std::string>& missing_keys,
                                    const std::vector<std::string>& unexpected_keys,
                                    const std::vector<std::string>& errors, bool strict,
                                    const std::string& source = "");

}  // namespace zerockpt
