#include "torch/device_staging.h"

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <limits.h>
#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include "core/file.h"
#include "core/parallel.h"
#include "torch/sabotage.h"
#include "zerockpt/errors.h"

namespace zerockpt {
namespace {

// Slabs of one batch start at multiples of this in the buffer, so any dtype can view them.
constexpr uint64_t kSlabAlign = 64;

std::atomic<bool> g_stage_host{false};
std::mutex g_stats_mu;
StagingStats g_last_stats;

// Copies in flight that read or write a buffer: one event per device stream they ran on.
using Pending = std::vector<c10::Event>;

// Records an event on each of `streams`, for the copies just queued there.
Pending record_events(const std::vector<c10::Stream>& streams) {
  Pending out;
  out.reserve(streams.size());
  for (const c10::Stream& stream : streams) {
    out.emplace_back(stream.device_type());
    if (ZEROCKPT_SITE(1)) out.back().record(stream);
  }
  return out;
}

void add_stream(std::vector<c10::Stream>& streams, const c10::Stream& stream) {
  if (std::find(streams.begin(), streams.end(), stream) == streams.end()) {
    streams.push_back(stream);
  }
}

// The bounded pool: `buffers` page-aligned buffers of kChunkBytes in one allocation, handed out
// one at a time. A buffer given back with pending copies is handed out again only once they
// are done. Thread-safe.
class HostPool {
 public:
  HostPool(size_t buffers, bool pinned)
      : memory_(buffers * kChunkBytes, pinned), pending_(buffers) {
    free_.reserve(buffers);
    for (size_t i = buffers; i-- > 0;) free_.push_back(i);
    stats_.buffers = buffers;
    stats_.pinned = pinned;
  }

  ~HostPool() {
    std::lock_guard<std::mutex> lock(g_stats_mu);
    g_last_stats = stats_;
  }

  uint8_t* data(size_t slot) const { return memory_.data() + slot * kChunkBytes; }

  // `n` bytes at `offset` of buffer `slot` as a CPU tensor (HostPages::bytes).
  at::Tensor bytes(size_t slot, uint64_t offset, uint64_t n) const {
    return memory_.bytes(slot * kChunkBytes + offset, n);
  }

  // Blocks until a buffer is free and no copy uses it; throws Cancelled once stopped.
  size_t acquire() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return stopped_ || !free_.empty(); });
    if (stopped_) throw Cancelled("staging stopped");
    size_t slot = free_.back();
    free_.pop_back();
    Pending pending = std::move(pending_[slot]);
    pending_[slot].clear();
    stats_.max_in_use = std::max(++stats_.in_use, stats_.max_in_use);
    lock.unlock();
    if (ZEROCKPT_SITE(2)) {
      for (const c10::Event& event : pending) event.synchronize();
    }
    return slot;
  }

  void release(size_t slot, Pending pending = {}) noexcept {
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_[slot] = std::move(pending);
      free_.push_back(slot);
      --stats_.in_use;
    }
    cv_.notify_one();
  }

  // Makes acquire() throw Cancelled from now on.
  void stop() noexcept {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopped_ = true;
    }
    cv_.notify_all();
  }

  // Counts a filled buffer: its file offset, tensor bytes and copies.
  void count(uint64_t file_offset, uint64_t bytes, uint64_t copies) {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.chunks;
    stats_.bytes += bytes;
    stats_.copies += copies;
    stats_.order.push_back(file_offset);
  }

 private:
  HostPages memory_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<size_t> free_;
  std::vector<Pending> pending_;  // per buffer
  bool stopped_ = false;
  StagingStats stats_;
};

bool any_off_host(const std::vector<at::Tensor>& tensors) {
  return std::any_of(tensors.begin(), tensors.end(),
                     [](const at::Tensor& t) { return t.defined() && !t.device().is_cpu(); });
}

// Device -> host for write_file. A producer thread walks the chunks in file order: for each,
// it takes a free buffer, queues the copies of the chunk's pieces on the side stream of each
// device, and records events that the writer waits for in take().
class DeviceStager final : public ChunkStager {
 public:
  DeviceStager(std::vector<at::Tensor> tensors, size_t buffers)
      : tensors_(std::move(tensors)),
        contiguous_(tensors_.size()),
        pool_(buffers, any_off_host(tensors_)) {
    // On the caller's thread: the side streams wait for the work queued on its current streams.
    for (const at::Tensor& t : tensors_) {
      if (!t.defined() || t.device().is_cpu()) continue;
      c10::Device device = t.device();
      if (std::any_of(side_.begin(), side_.end(),
                      [&](const c10::Stream& s) { return s.device() == device; })) {
        continue;
      }
      c10::impl::VirtualGuardImpl impl(device.type());
      c10::Stream current = impl.getStream(device);
      c10::Stream side = impl.getStreamFromGlobalPool(device, /*isHighPriority=*/false);
      c10::Event ready(device.type());
      if (ZEROCKPT_SITE(3)) ready.record(current);
      if (ZEROCKPT_SITE(4)) ready.block(side);
      side_.push_back(side);
    }
  }

  ~DeviceStager() override { stop(); }

  void start(std::vector<StagedChunk> chunks) override {
    chunks_ = std::move(chunks);
    state_.resize(chunks_.size());
    last_use_.assign(tensors_.size(), 0);
    for (size_t i = 0; i < chunks_.size(); ++i) {
      for (const StagedPiece& p : chunks_[i].pieces) last_use_[p.source] = i;
    }
    producer_ = std::thread([this] { produce(); });
  }

  uint8_t* take(size_t i) override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return state_[i].ready || error_ || stopped_; });
    if (!state_[i].ready) {
      if (error_) std::rethrow_exception(error_);
      throw Cancelled("staging stopped");
    }
    Pending pending = std::move(state_[i].pending);
    state_[i].pending.clear();
    state_[i].taken = true;
    size_t slot = state_[i].slot;
    lock.unlock();
    if (ZEROCKPT_SITE(5)) {
      for (const c10::Event& event : pending) event.synchronize();
    }
    return pool_.data(slot);
  }

  void give_back(size_t i) noexcept override { pool_.release(state_[i].slot); }

  void stop() noexcept override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopped_) return;
      stopped_ = true;
    }
    cv_.notify_all();
    pool_.stop();
    if (producer_.joinable()) producer_.join();
    // Copies queued for chunks nobody took still write into the pool: let them finish, then
    // those buffers are free again.
    for (const c10::Stream& side : side_) {
      if (ZEROCKPT_SITE(6)) c10::impl::VirtualGuardImpl(side.device_type()).synchronizeStream(side);
    }
    std::lock_guard<std::mutex> lock(mu_);
    for (ChunkState& state : state_) {
      if (state.ready && !state.taken) pool_.release(state.slot);
      state.taken = true;
    }
  }

 private:
  struct ChunkState {
    size_t slot = 0;
    bool ready = false;
    bool taken = false;  // by a writer, which gives it back
    Pending pending;
  };

  const c10::Stream& side_stream(const c10::Device& device) const {
    return *std::find_if(side_.begin(), side_.end(),
                         [&](const c10::Stream& s) { return s.device() == device; });
  }

  // The bytes of tensors_[source] as a flat uint8 tensor on its device: the tensor itself when
  // it is dense, else a dense copy made on the side stream and kept until its last chunk.
  const at::Tensor& source_bytes(size_t source) {
    at::Tensor& out = contiguous_[source];
    if (out.defined()) return out;
    at::Tensor t = tensors_[source];
    if (!t.is_contiguous() || t.is_conj() || t.is_neg()) {
      t = t.resolve_conj().resolve_neg().contiguous();
    }
    out = t.reshape({-1}).view(at::kByte);
    return out;
  }

  // Queues the copies of chunks_[i] into buffer `slot`; returns the events that mark them done.
  Pending stage(size_t i, size_t slot) {
    c10::InferenceMode no_autograd;
    std::vector<c10::Stream> used;
    uint64_t bytes = 0;
    for (const StagedPiece& p : chunks_[i].pieces) {
      const c10::Device device = tensors_[p.source].device();
      c10::OptionalStreamGuard guard;
      if (!device.is_cpu()) {
        guard.reset_stream(side_stream(device));
        add_stream(used, side_stream(device));
      }
      at::Tensor src = source_bytes(p.source).narrow(0, static_cast<int64_t>(p.source_offset),
                                                     static_cast<int64_t>(p.size));
      pool_.bytes(slot, p.buffer_offset, p.size).copy_(src, /*non_blocking=*/!device.is_cpu());
      // Freed on the side stream after its last copy, which the allocator orders it after.
      if (last_use_[p.source] == i) contiguous_[p.source].reset();
      bytes += p.size;
    }
    pool_.count(chunks_[i].chunk * kChunkBytes, bytes, chunks_[i].pieces.size());
    if (!ZEROCKPT_SITE(7)) return {};
    return record_events(used);
  }

  void produce() {
    for (size_t i = 0; i < chunks_.size(); ++i) {
      size_t slot = 0;
      try {
        slot = pool_.acquire();
      } catch (...) {
        return;  // stopped
      }
      try {
        Pending pending = stage(i, slot);
        {
          std::lock_guard<std::mutex> lock(mu_);
          state_[i].slot = slot;
          state_[i].pending = std::move(pending);
          state_[i].ready = true;
        }
        cv_.notify_all();
      } catch (...) {
        pool_.release(slot);
        {
          std::lock_guard<std::mutex> lock(mu_);
          error_ = std::current_exception();
        }
        cv_.notify_all();
        return;
      }
    }
  }

  std::vector<at::Tensor> tensors_;
  std::vector<at::Tensor> contiguous_;  // per source, while its chunks are being staged
  std::vector<size_t> last_use_;        // per source, its last chunk
  HostPool pool_;
  std::vector<c10::Stream> side_;  // one per device
  std::vector<StagedChunk> chunks_;
  std::vector<ChunkState> state_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::exception_ptr error_;
  bool stopped_ = false;
  std::thread producer_;
};

// Slabs that share one buffer: slabs[first, last), placed at `offsets` in it.
struct Batch {
  size_t first, last;
};

}  // namespace

HostPages::HostPages(uint64_t size, bool pinned) {
  if (pinned) {
    pinned_ = at::empty({static_cast<int64_t>(size + kPageBytes)},
                        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    auto base = reinterpret_cast<uintptr_t>(pinned_.data_ptr());
    offset_ = round_up(base, kPageBytes) - base;
    data_ = static_cast<uint8_t*>(pinned_.data_ptr()) + offset_;
  } else {
    pages_ = allocate_pages(size);
    data_ = pages_.get();
  }
}

at::Tensor HostPages::bytes(uint64_t offset, uint64_t n) const {
  if (pinned_.defined()) {
    return pinned_.narrow(0, static_cast<int64_t>(offset_ + offset), static_cast<int64_t>(n));
  }
  return at::from_blob(data_ + offset, {static_cast<int64_t>(n)}, at::TensorOptions(at::kByte));
}

StagingStats last_staging_stats() {
  std::lock_guard<std::mutex> lock(g_stats_mu);
  return g_last_stats;
}

void set_stage_host_tensors(bool on) { g_stage_host.store(on); }
bool stage_host_tensors() { return g_stage_host.load(); }

bool is_staged(const at::Tensor& t) { return !t.device().is_cpu() || stage_host_tensors(); }

uint64_t staging_buffers(uint64_t staging_bytes) {
  if (staging_bytes == 0) staging_bytes = kDefaultStagingBytes;
  if (staging_bytes < kChunkBytes) {
    throw UsageError("staging_bytes must be at least " + std::to_string(kChunkBytes) + " (one " +
                     std::to_string(kChunkBytes >> 20) + " MiB chunk), got " +
                     std::to_string(staging_bytes));
  }
  return staging_bytes / kChunkBytes;
}

std::unique_ptr<ChunkStager> make_device_stager(std::vector<at::Tensor> tensors,
                                                uint64_t staging_bytes) {
  // More buffers than chunks would only cost pinned memory.
  uint64_t bytes = 0;
  for (const at::Tensor& t : tensors) {
    if (t.defined()) bytes += static_cast<uint64_t>(t.numel()) * t.element_size();
  }
  uint64_t needed = bytes / kChunkBytes + 1 + tensors.size();
  size_t buffers = static_cast<size_t>(std::min(staging_buffers(staging_bytes), needed));
  return std::make_unique<DeviceStager>(std::move(tensors), buffers);
}

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

namespace {

// Packs `slabs` (sorted by file offset) into buffer-sized batches, each slab at an offset in
// its batch's buffer (`offsets`) aligned for any dtype view.
std::vector<Batch> pack_batches(const std::vector<Slab>& slabs, std::vector<uint64_t>& offsets) {
  std::vector<Batch> batches;
  offsets.assign(slabs.size(), 0);
  uint64_t used = kChunkBytes;
  for (size_t i = 0; i < slabs.size(); ++i) {
    uint64_t at = round_up(used, kSlabAlign);
    if (at + slabs[i].nbytes > kChunkBytes) {
      batches.push_back({i, i});
      at = 0;
    }
    offsets[i] = at;
    used = at + slabs[i].nbytes;
    batches.back().last = i + 1;
  }
  return batches;
}

// The caller's current stream on each device of the targets: the copies go there, so the
// targets are ready on it and ordered after the work already queued (which may still use
// their memory).
std::vector<c10::Stream> current_streams(const std::vector<at::Tensor>& targets) {
  std::vector<c10::Stream> current;
  for (const at::Tensor& t : targets) {
    if (t.device().is_cpu()) continue;
    add_stream(current, c10::impl::VirtualGuardImpl(t.device().type()).getStream(t.device()));
  }
  return current;
}

// Fills `buffer` with the stored bytes of the batch's slabs: file-adjacent slabs by one preadv,
// scattered to their aligned places; slabs with host bytes by memcpy.
void read_batch(int fd, const std::string& path, const std::vector<Slab>& slabs, const Batch& batch,
                const std::vector<uint64_t>& offsets, uint8_t* buffer) {
  std::vector<iovec> iov;
  uint64_t run_offset = 0;
  auto flush = [&] {
    if (!iov.empty()) preadv_full(fd, iov, run_offset, path);
    iov.clear();
  };
  for (size_t i = batch.first; i < batch.last; ++i) {
    uint8_t* dst = buffer + offsets[i];
    if (slabs[i].host) {
      flush();
      std::memcpy(dst, slabs[i].host, slabs[i].nbytes);
      continue;
    }
    bool adjacent = !iov.empty() && iov.size() < IOV_MAX &&
                    slabs[i - 1].file_offset + slabs[i - 1].nbytes == slabs[i].file_offset;
    if (!adjacent) {
      flush();
      run_offset = slabs[i].file_offset;
    }
    iov.push_back({dst, slabs[i].nbytes});
  }
  flush();
}

// Copies one slab's stored bytes, `host` (a view of the staging buffer), into its target: on
// the CPU at once; to a device, queued on `stream` (added to `used`).
void copy_slab_out(const Slab& slab, const at::Tensor& host, const c10::Stream* stream,
                   std::vector<c10::Stream>& used) {
  const at::Tensor& target = slab.target;
  if (target.device().is_cpu()) {
    target.copy_(host);
    return;
  }
  c10::StreamGuard guard(*stream);
  add_stream(used, *stream);
  if (target.is_contiguous() && target.scalar_type() == slab.stored && !target.is_conj() &&
      !target.is_neg()) {
    target.copy_(host, /*non_blocking=*/true);
  } else {
    // Converted or scattered on the device, from a dense copy of the stored bytes there;
    // a host-side conversion would copy from pageable memory.
    at::Tensor dense = at::empty(target.sizes(), target.options().dtype(slab.stored));
    dense.copy_(host, /*non_blocking=*/true);
    target.copy_(dense);
  }
}

void copy_slabs(int fd, const std::string& path, std::vector<Slab> slabs, unsigned threads,
                uint64_t staging_bytes, Progress* progress) {
  const std::string what = "loading from " + path;
  uint64_t total = 0;
  for (const Slab& slab : slabs) total += slab.nbytes;
  expect_progress(progress, total, what);
  if (slabs.empty()) return;
  std::stable_sort(slabs.begin(), slabs.end(),
                   [](const Slab& a, const Slab& b) { return a.file_offset < b.file_offset; });
  std::vector<uint64_t> offsets;
  const std::vector<Batch> batches = pack_batches(slabs, offsets);
  std::vector<at::Tensor> targets;
  targets.reserve(slabs.size());
  for (const Slab& slab : slabs) targets.push_back(slab.target);
  const std::vector<c10::Stream> current = current_streams(targets);
  auto stream_of = [&](const c10::Device& device) -> const c10::Stream* {
    if (device.is_cpu()) return nullptr;
    return &*std::find_if(current.begin(), current.end(),
                          [&](const c10::Stream& s) { return s.device() == device; });
  };
  size_t buffers =
      static_cast<size_t>(std::min<uint64_t>(staging_buffers(staging_bytes), batches.size()));
  HostPool pool(buffers, any_off_host(targets));
  parallel_for(batches.size(), threads ? threads : default_threads(), [&](size_t b) {
    if (progress) progress->check(what);
    const Batch& batch = batches[b];
    size_t slot = pool.acquire();
    std::vector<c10::Stream> used;
    try {
      read_batch(fd, path, slabs, batch, offsets, pool.data(slot));
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain copies, no version bumps
      uint64_t bytes = 0;
      for (size_t i = batch.first; i < batch.last; ++i) {
        const Slab& slab = slabs[i];
        at::Tensor host =
            pool.bytes(slot, offsets[i], slab.nbytes).view(slab.stored).view(slab.target.sizes());
        bytes += slab.nbytes;
        copy_slab_out(slab, host, stream_of(slab.target.device()), used);
      }
      pool.count(slabs[batch.first].file_offset, bytes, batch.last - batch.first);
      pool.release(slot, ZEROCKPT_SITE(8) ? record_events(used) : Pending{});
      if (progress) progress->add(bytes);
    } catch (...) {
      // Copies already queued from this buffer finish before anyone reuses it.
      for (const c10::Stream& s : used) {
        if (ZEROCKPT_SITE(9)) c10::impl::VirtualGuardImpl(s.device_type()).synchronizeStream(s);
      }
      pool.release(slot);
      throw;
    }
  });
}

}  // namespace

void copy_slabs_to_devices(const SafetensorsFile& file, std::vector<Slab> slabs, unsigned threads,
                           uint64_t staging_bytes, Progress* progress) {
  copy_slabs(file.fd(), file.path(), std::move(slabs), threads, staging_bytes, progress);
}

void copy_host_to_device(const at::Tensor& target, const at::Tensor& source, unsigned threads,
                         uint64_t staging_bytes) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  bool dense = target.is_contiguous() && !target.is_conj() && !target.is_neg();
  std::vector<Slab> slabs;
  cut_slabs(dense ? target.reshape({-1}) : target, 0, source.scalar_type(), slabs);
  const auto* base = static_cast<const uint8_t*>(source.const_data_ptr());
  for (Slab& slab : slabs) slab.host = base + slab.file_offset;
  copy_slabs(-1, "a state dict", std::move(slabs), threads, staging_bytes, nullptr);
}

}  // namespace zerockpt
