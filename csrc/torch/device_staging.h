// Moving tensor bytes between device memory and files through a bounded pool of page-aligned
// host buffers (pinned when a device is an accelerator): while the I/O threads write or read
// one buffer, asynchronous copies fill or drain others on device streams. Device-generic
// (c10 streams and events, ATen copies); knows ATen, never Python; needs no GIL.
// The pipeline and its synchronisation: docs/design.md ("Device staging").
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "core/io_engine.h"
#include "core/reader.h"

namespace zerockpt {

// The pool's size when the caller gives none (staging_bytes 0).
constexpr uint64_t kDefaultStagingBytes = 256ull << 20;

// Page-aligned host memory: pinned (the accelerator's caching host allocator, which tracks the
// copies queued on views of it, so freeing it early is safe) or plain anonymous pages.
class HostPages {
 public:
  HostPages() = default;
  HostPages(uint64_t size, bool pinned);
  uint8_t* data() const { return data_; }
  bool pinned() const { return pinned_.defined(); }
  // `n` bytes at `offset` as a CPU uint8 tensor: a view of the pinned allocation (so its
  // allocator sees the copies), or of the pages.
  at::Tensor bytes(uint64_t offset, uint64_t n) const;

 private:
  at::Tensor pinned_;
  std::shared_ptr<uint8_t> pages_;
  uint64_t offset_ = 0;  // of data() within pinned_
  uint8_t* data_ = nullptr;
};

// What the most recent staged save or load did with its pool (for tests and benches).
struct StagingStats {
  uint64_t buffers = 0;         // chunk-sized buffers in the pool
  bool pinned = false;          // page-locked (an accelerator was involved)
  uint64_t chunks = 0;          // buffers filled: chunks copied from devices, or batches read
  uint64_t bytes = 0;           // tensor bytes that went through the pool
  uint64_t copies = 0;          // copies issued between a buffer and tensor memory
  uint64_t max_in_use = 0;      // most buffers held at once
  uint64_t in_use = 0;          // held now: 0 once the call has returned
  std::vector<uint64_t> order;  // file offset of each chunk or batch, in the order it was filled
};
StagingStats last_staging_stats();

// Testing aid: while on, CPU tensors take the staged paths too (save, load to the CPU,
// load_state_dict into CPU tensors) with plain host buffers and synchronous copies, so that the
// pipeline's code runs and is tested without a device. Process-wide.
void set_stage_host_tensors(bool on);
bool stage_host_tensors();

// True if `t`'s bytes go through staging: it lives off the CPU, or host staging is on.
bool is_staged(const at::Tensor& t);

// Buffers for a pool of `staging_bytes` (0: kDefaultStagingBytes); UsageError if smaller than
// one chunk (kChunkBytes).
uint64_t staging_buffers(uint64_t staging_bytes);

// The ChunkStager that brings `tensors[source]` (for each staged source of write_file; others
// undefined) into host memory: a producer thread issues device-to-host copies, chunk by chunk,
// on a side stream per device that first waits for the caller's current stream, so the bytes
// are those of the work queued before the save. Create it on the caller's thread.
std::unique_ptr<ChunkStager> make_device_stager(std::vector<at::Tensor> tensors,
                                                uint64_t staging_bytes);

// One piece of a copy from a file (or host memory) into a tensor: `target` (a view) takes the
// `nbytes` stored bytes at `file_offset`, which hold `target.numel()` elements of dtype
// `stored`. With `host` set, the bytes are there instead of in the file.
struct Slab {
  at::Tensor target;
  uint64_t file_offset;
  uint64_t nbytes;
  c10::ScalarType stored;
  const uint8_t* host = nullptr;
};

// Cuts the copy of the stored bytes at `file_offset` into `target` into slabs of at most
// kChunkBytes (or a single element).
void cut_slabs(const at::Tensor& target, uint64_t file_offset, c10::ScalarType stored,
               std::vector<Slab>& out);

// Copies `slabs` from `file` into their (device) targets: I/O threads pread batches of slabs
// into pool buffers, then queue asynchronous host-to-device copies on the caller's current
// stream of each device (converting dtypes on the device), and refill a buffer only once its
// copies are done. The targets are ready on those streams when this returns. `progress` (may
// be null) counts the bytes and can stop the copies. Call it on the caller's thread.
void copy_slabs_to_devices(const SafetensorsFile& file, std::vector<Slab> slabs, unsigned threads,
                           uint64_t staging_bytes, Progress* progress);

// `target.copy_(source)` for a dense host `source` (e.g. a tensor of a file mapping) and a
// staged `target` of the same shape: the bytes go through the pinned pool (the page faults
// taken by `threads` threads, never inside a device copy). Ready on the current stream.
void copy_host_to_device(const at::Tensor& target, const at::Tensor& source, unsigned threads,
                         uint64_t staging_bytes);

}  // namespace zerockpt
