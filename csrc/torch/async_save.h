// Asynchronous saves: the caller blocks only while the tensors are copied into a snapshot
// buffer that is kept and reused across saves (pinned when tensors live on an accelerator);
// a background thread then checksums and writes that snapshot. One save is in flight at a
// time per process, so memory stays bounded by one snapshot. Knows ATen, never Python; every
// function here may run without the GIL and is thread-safe.
#pragma once

#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "torch/tensor_io.h"

namespace zerockpt {

// What to do once the file is committed, in this order; the first failure stops them and is
// the save's error. For pointers to the latest checkpoint and retention of older ones: nothing
// is written or removed unless the committed file reopens and its header checks as a load's.
struct AfterCommit {
  std::string check_file;  // reopened and checked first; empty: no check
  std::vector<std::pair<std::string, std::string>> write_files;  // (path, content), atomic
  std::vector<std::string> remove_files;                         // missing ones are fine
};

// Runs `after` (the same steps a save_tensors_async runs), e.g. after a synchronous save.
void run_after_commit(const AfterCommit& after, bool durable);

// The state of one background save. Thread-safe.
class PendingSave {
 public:
  explicit PendingSave(std::string path) : path_(std::move(path)) {}
  const std::string& path() const { return path_; }
  bool done() const;
  // Waits until the save is done or `seconds` pass (forever if negative); true when done.
  bool wait(double seconds) const;
  // The save's error (nullptr on success); waits until done.
  std::exception_ptr error() const;
  void finish(std::exception_ptr error);

 private:
  const std::string path_;
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
};

// Waits for the save in flight (if any), snapshots `tensors` (CPU tensors, and tensors on
// accelerators through pinned memory: copied on each device's current stream, which is then
// synchronized), and starts the background write of `path` as save_tensors would write it.
// Errors found before the snapshot (bad input) are thrown here; later ones (I/O) go to the
// returned PendingSave, and then no file is left at `path`. The tensors may change as soon as
// this returns.
std::shared_ptr<PendingSave> save_tensors_async(const NamedTensors& tensors,
                                                const std::string& path, const Metadata& metadata,
                                                const WriteOptions& options,
                                                const Metadata& own = {}, AfterCommit after = {});

// Blocks until no save is in flight.
void wait_for_async_saves();

// The snapshot buffer, for tests and for callers that want its memory back.
struct SnapshotStats {
  uint64_t capacity;     // bytes reserved now
  uint64_t allocations;  // times it was (re)allocated since the process started
  bool pinned;
  bool in_flight;  // a save is using it
};
SnapshotStats snapshot_stats();
// Waits for the save in flight, then frees the snapshot buffer (the next save allocates anew).
void release_snapshot_buffer();

}  // namespace zerockpt
