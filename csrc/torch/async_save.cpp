#include "torch/async_save.h"

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <new>
#include <thread>

#include "core/file.h"
#include "core/parallel.h"
#include "core/reader.h"
#include "torch/device_staging.h"
#include "torch/sabotage.h"
#include "zerockpt/errors.h"

namespace zerockpt {

bool PendingSave::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_;
}

bool PendingSave::wait(double seconds) const {
  std::unique_lock<std::mutex> lock(mu_);
  if (seconds < 0) {
    cv_.wait(lock, [&] { return done_; });
    return true;
  }
  return cv_.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return done_; });
}

std::exception_ptr PendingSave::error() const {
  wait(-1);
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

void PendingSave::finish(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = std::move(error);
    done_ = true;
  }
  cv_.notify_all();
}

namespace {

// Capacity is rounded up to this, so a state that grows a little (a longer header, one more
// step counter) reuses the buffer.
constexpr uint64_t kCapacityGranule = 2ull << 20;

// The snapshot buffer: anonymous pages, or pinned host memory.
struct SnapshotBuffer {
  HostPages memory;
  uint8_t* data = nullptr;
  uint64_t capacity = 0;
  uint64_t allocations = 0;

  void reset() {
    memory = HostPages();
    data = nullptr;
    capacity = 0;
  }

  // Makes room for `size` bytes; pinned memory when `want_pinned` (kept for later saves, which
  // may use it for CPU tensors too).
  void reserve(uint64_t size, bool want_pinned) {
    if (size <= capacity && (memory.pinned() || !want_pinned)) return;
    uint64_t new_capacity = round_up(std::max<uint64_t>(size, 1), kCapacityGranule);
    reset();  // frees the old buffer first: at most one is ever held
    memory = HostPages(new_capacity, want_pinned);
    data = memory.data();
    capacity = new_capacity;
    ++allocations;
  }
};

// The one save in flight and the buffer it uses. Leaked on purpose: usable during exit.
struct Saver {
  std::mutex mu;
  std::condition_variable cv;
  bool busy = false;  // a save owns `buffer` (snapshotting or writing)
  SnapshotBuffer buffer;
};

void atfork_prepare();
void atfork_parent();
void atfork_child();

Saver& saver() {
  static Saver* s = [] {
    auto* created = new Saver();
    // A forked child has no writer thread: it must not wait for the parent's save forever.
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
    return created;
  }();
  return *s;
}

void atfork_prepare() { saver().mu.lock(); }
void atfork_parent() { saver().mu.unlock(); }
void atfork_child() {
  Saver& s = saver();
  s.busy = false;
  new (&s.cv) std::condition_variable();  // no waiter of the parent exists here
  s.mu.unlock();
}

void release_slot() {
  Saver& s = saver();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.busy = false;
  }
  s.cv.notify_all();
}

// Copies every stored tensor into `image` at its place in the file. Accelerator tensors go
// first, as non-blocking copies into the pinned buffer on their device's current stream (so
// after the work already queued there), CPU tensors meanwhile on `threads` threads; then each
// such stream is synchronized.
void copy_into(const SavePlan& plan, SnapshotBuffer& buffer, unsigned threads) {
  uint8_t* image = buffer.data;
  const uint64_t data_start = plan.layout.prefix.size();
  std::vector<c10::Device> devices;
  struct Task {
    size_t spec;
    uint64_t offset, size;
  };
  std::vector<Task> tasks;
  for (size_t i = 0; i < plan.specs.size(); ++i) {
    const at::Tensor& t = plan.tensors[i];
    uint64_t nbytes = plan.specs[i].nbytes;
    if (nbytes == 0) continue;
    uint64_t at_pos = data_start + plan.layout.begin[i];
    if (t.device().is_cpu()) {
      for (uint64_t pos = 0; pos < nbytes; pos += kChunkBytes) {
        tasks.push_back({i, pos, std::min(kChunkBytes, nbytes - pos)});
      }
      continue;
    }
    // A view of the pinned allocation itself, so its allocator tracks the pending copy.
    at::Tensor dst = buffer.memory.bytes(at_pos, nbytes).view(t.scalar_type()).view(t.sizes());
    dst.copy_(t, /*non_blocking=*/true);
    if (std::find(devices.begin(), devices.end(), t.device()) == devices.end()) {
      devices.push_back(t.device());
    }
  }
  parallel_for(tasks.size(), threads, [&](size_t k) {
    const Task& task = tasks[k];
    uint8_t* dst = image + data_start + plan.layout.begin[task.spec] + task.offset;
    const WriteSource& source = plan.sources[task.spec];
    if (source.data != nullptr) {
      std::memcpy(dst, source.data + task.offset, task.size);
    } else {
      source.fill(task.offset, task.size, dst);
    }
  });
  for (const c10::Device& device : devices) {
    const auto* impl = c10::impl::getDeviceGuardImpl(device.type());
    if (ZEROCKPT_SITE(10)) impl->synchronizeStream(impl->getStream(device));
  }
}

struct WriteJob {
  std::shared_ptr<PendingSave> pending;
  uint8_t* image;
  uint64_t size;
  uint64_t checksum_offset;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // per stored tensor, in the image
  WriteOptions options;
  AfterCommit after;
};

// The background part: checksums into the header, the file, then the after-commit steps.
// Touches only the image (never a tensor), so it needs neither the GIL nor the caller.
void run_write(WriteJob job) {
  std::exception_ptr error;
  try {
    const std::string& path = job.pending->path();
    if (job.checksum_offset != Layout::kNoChecksums) {
      std::vector<ByteRange> bytes;
      bytes.reserve(job.ranges.size());
      for (const auto& [begin, end] : job.ranges) bytes.push_back({job.image + begin, end - begin});
      std::vector<uint32_t> crcs = checksum_ranges(bytes, /*mapped=*/false, job.options.threads);
      std::vector<uint32_t> ordered;
      ordered.reserve(crcs.size());
      for (size_t i : checksum_order(job.ranges)) ordered.push_back(crcs[i]);
      encode_checksums(ordered, reinterpret_cast<char*>(job.image + job.checksum_offset));
    }
    write_image(path, job.image, job.size, job.options);
    run_after_commit(job.after, job.options.durable);
  } catch (...) {
    error = std::current_exception();
  }
  release_slot();
  job.pending->finish(std::move(error));
}

}  // namespace

void run_after_commit(const AfterCommit& after, bool durable) {
  if (!after.check_file.empty()) {
    // Read back from the file, not from the plan: what the next load will see.
    SafetensorsFile committed(after.check_file);
    CheckpointFile::check_header(committed.header(), after.check_file);
  }
  for (const auto& [file, content] : after.write_files) write_small_file(file, content, durable);
  for (const auto& file : after.remove_files) {
    if (::unlink(file.c_str()) != 0 && errno != ENOENT) throw_errno(file, "cannot remove");
  }
}

std::shared_ptr<PendingSave> save_tensors_async(const NamedTensors& tensors,
                                                const std::string& path, const Metadata& metadata,
                                                const WriteOptions& options, const Metadata& own,
                                                AfterCommit after) {
  // Bad input fails here, before waiting for the save in flight.
  SavePlan plan = plan_save(tensors, path, metadata, options, own);
  bool want_pinned = std::any_of(plan.tensors.begin(), plan.tensors.end(),
                                 [](const at::Tensor& t) { return !t.device().is_cpu(); });
  Saver& s = saver();
  {
    std::unique_lock<std::mutex> lock(s.mu);
    s.cv.wait(lock, [&] { return !s.busy; });
    s.busy = true;
  }
  try {
    const uint64_t size = plan.layout.file_size();
    const uint64_t padded = round_up(size, kPageBytes);
    uint8_t* image;
    {
      std::lock_guard<std::mutex> lock(s.mu);  // for snapshot_stats(); busy keeps others out
      s.buffer.reserve(padded, want_pinned);
      image = s.buffer.data;
    }
    std::memcpy(image, plan.layout.prefix.data(), plan.layout.prefix.size());
    std::memset(image + size, 0, padded - size);
    copy_into(plan, s.buffer, options.threads ? options.threads : default_threads());

    WriteJob job;
    job.pending = std::make_shared<PendingSave>(path);
    job.image = image;
    job.size = size;
    job.checksum_offset = plan.layout.checksum_offset;
    job.ranges.reserve(plan.specs.size());
    for (size_t i = 0; i < plan.specs.size(); ++i) {
      uint64_t begin = plan.layout.prefix.size() + plan.layout.begin[i];
      job.ranges.emplace_back(begin, begin + plan.specs[i].nbytes);
    }
    job.options = options;
    job.after = std::move(after);
    std::shared_ptr<PendingSave> pending = job.pending;
    std::thread(run_write, std::move(job)).detach();
    return pending;
  } catch (...) {
    release_slot();
    throw;
  }
}

void wait_for_async_saves() {
  Saver& s = saver();
  std::unique_lock<std::mutex> lock(s.mu);
  s.cv.wait(lock, [&] { return !s.busy; });
}

SnapshotStats snapshot_stats() {
  Saver& s = saver();
  std::lock_guard<std::mutex> lock(s.mu);
  return {s.buffer.capacity, s.buffer.allocations, s.buffer.memory.pinned(), s.busy};
}

void release_snapshot_buffer() {
  Saver& s = saver();
  std::unique_lock<std::mutex> lock(s.mu);
  s.cv.wait(lock, [&] { return !s.busy; });
  s.buffer.reset();
}

}  // namespace zerockpt
