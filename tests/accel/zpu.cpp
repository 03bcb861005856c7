// zpu: a test-only asynchronous accelerator, registered as torch's PrivateUse1 backend, that
// makes stream and event mistakes visible on a machine without a GPU (docs/device_testing.md).
// Device memory is host memory; each stream is a worker thread that runs its queue in order,
// every item after a random delay; events complete when the work queued before them has run, and
// waits really block; freed device and pinned memory is poisoned (0xA5) once the work queued
// before the free has run. Thread-safe; worker threads start on first use (none survive fork).

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/resize_native.h>
#include <ATen/ops/set_native.h>
#include <ATen/ops/view_as_complex_native.h>
#include <ATen/ops/view_as_real_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/DeviceType.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace zpu {
namespace {

constexpr c10::DeviceIndex kDevices = 2;
constexpr c10::StreamId kStreams = 6;  // per device: 0 is the default stream, 1.. the pool
constexpr uint8_t kPoison = 0xA5;      // freed memory, and fresh device memory
constexpr size_t kQuarantineBytes = 1ull << 30;  // freed memory is reused only after this much
constexpr size_t kAlign = 4096;

// ------------------------------------------------------------------------------------------
// Delays: every queued item waits a random time in [min_us, max_us] before it runs.

std::atomic<int64_t> g_delay_min_us{0};
std::atomic<int64_t> g_delay_max_us{0};
std::atomic<uint64_t> g_seed{0};

void configure_from_env() {
  // ZPU_DELAY_US="MAX" or "MIN-MAX" (microseconds); ZPU_SEED for the random delays.
  if (const char* s = std::getenv("ZPU_DELAY_US")) {
    std::string text(s);
    size_t dash = text.find('-');
    int64_t lo = dash == std::string::npos ? 0 : std::stoll(text.substr(0, dash));
    int64_t hi = std::stoll(dash == std::string::npos ? text : text.substr(dash + 1));
    g_delay_min_us = lo;
    g_delay_max_us = hi;
  }
  if (const char* s = std::getenv("ZPU_SEED")) g_seed = std::stoull(s);
}

// One stream: a worker thread draining a FIFO of work items. Tickets count the items queued;
// ticket t is reached once the t-th item has run.
class Worker {
 public:
  explicit Worker(uint64_t salt) : rng_(g_seed.load() * 1000003u + salt) {
    std::thread([this] { run(); }).detach();  // lives as long as the process
  }

  uint64_t enqueue(std::function<void()> item) {
    uint64_t ticket;
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(item));
      ticket = ++queued_;
    }
    work_cv_.notify_one();
    return ticket;
  }

  uint64_t ticket() {
    std::lock_guard<std::mutex> lock(mu_);
    return queued_;
  }

  void wait(uint64_t ticket) {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return done_ >= ticket; });
  }

  bool reached(uint64_t ticket) {
    std::lock_guard<std::mutex> lock(mu_);
    return done_ >= ticket;
  }

  void synchronize() { wait(ticket()); }

 private:
  void run() {
    for (;;) {
      std::function<void()> item;
      {
        std::unique_lock<std::mutex> lock(mu_);
        work_cv_.wait(lock, [&] { return !queue_.empty(); });
        item = std::move(queue_.front());
        queue_.pop_front();
      }
      int64_t lo = g_delay_min_us.load(), hi = g_delay_max_us.load();
      if (hi > 0) {
        int64_t us = std::uniform_int_distribution<int64_t>(lo, std::max(lo, hi))(rng_);
        std::this_thread::sleep_for(std::chrono::microseconds(us));
      }
      try {
        item();
      } catch (const std::exception& e) {
        // A kernel of this backend failed: a bug here, never a condition a test expects.
        std::fprintf(stderr, "zpu: a queued kernel threw: %s\n", e.what());
        std::abort();
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++done_;
      }
      done_cv_.notify_all();
    }
  }

  std::mt19937_64 rng_;
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::deque<std::function<void()>> queue_;
  uint64_t queued_ = 0, done_ = 0;
};

Worker& worker(c10::DeviceIndex device, c10::StreamId stream) {
  TORCH_CHECK(device >= 0 && device < kDevices, "zpu: no device ", int(device));
  TORCH_CHECK(stream >= 0 && stream < kStreams, "zpu: no stream ", stream);
  static std::mutex mu;
  static Worker* workers[kDevices][kStreams] = {};  // leaked: usable during exit
  std::lock_guard<std::mutex> lock(mu);
  Worker*& w = workers[device][stream];
  if (w == nullptr) w = new Worker(static_cast<uint64_t>(device * kStreams + stream));
  return *w;
}

Worker& worker(const c10::Stream& s) { return worker(s.device_index(), s.id()); }

thread_local c10::DeviceIndex t_device = 0;
thread_local c10::StreamId t_stream[kDevices] = {};
std::atomic<uint32_t> g_next_pool_stream{0};

c10::DeviceIndex index_of(const c10::Device& d) { return d.has_index() ? d.index() : t_device; }

c10::Stream make_stream(c10::DeviceIndex device, c10::StreamId id) {
  return c10::Stream(c10::Stream::UNSAFE, c10::Device(c10::DeviceType::PrivateUse1, device), id);
}

Worker& current_worker(c10::DeviceIndex device) { return worker(device, t_stream[device]); }

c10::StreamId stream_of(const Worker* w, c10::DeviceIndex device) {
  for (c10::StreamId s = 0; s < kStreams; ++s) {
    if (&worker(device, s) == w) return s;
  }
  return -1;
}

// ------------------------------------------------------------------------------------------
// Memory. Device blocks remember the stream they were allocated on (and streams recorded with
// recordDataPtrOnStream): a free poisons the block on that stream, after the work queued there.
// Pinned blocks count the asynchronous copies that use them: a free waits for those.

struct Block {
  size_t size = 0;               // allocated (rounded up)
  size_t requested = 0;          // asked for: what memory_allocated counts
  c10::DeviceIndex device = -1;  // -1: pinned host memory
  c10::StreamId stream = 0;
  std::vector<c10::Stream> also_used_on;
  int uses = 0;  // pinned: queued copies not yet run
  bool freed = false;
};

std::mutex g_mem_mu;
std::map<uintptr_t, Block> g_blocks;  // by start address
// Device blocks freed by their owner and not yet given back to the C library, so that a late
// use is caught: by start address; `poisoned` once the poison has run on the block's stream.
struct Freed {
  size_t size;
  c10::DeviceIndex device;
  c10::StreamId stream;
  std::vector<c10::Stream> also_used_on;
  bool poisoned = false;
};
std::map<uintptr_t, Freed> g_freed;
std::atomic<int64_t> g_violations{0};
std::atomic<int64_t> g_fail_allocation{-1};  // the n-th next device allocation throws
std::deque<std::pair<void*, size_t>> g_quarantine;
size_t g_quarantined = 0;
int64_t g_allocated[kDevices] = {};
int64_t g_peak[kDevices] = {};

// Frees the oldest quarantined blocks; call with g_mem_mu held.
void quarantine(void* p, size_t size) {
  g_quarantine.emplace_back(p, size);
  g_quarantined += size;
  while (g_quarantined > kQuarantineBytes) {
    auto [old, n] = g_quarantine.front();
    g_quarantine.pop_front();
    g_quarantined -= n;
    g_freed.erase(reinterpret_cast<uintptr_t>(old));
    std::free(old);
  }
}

void poison_and_quarantine(void* p, size_t size) {
  std::memset(p, kPoison, size);
  std::lock_guard<std::mutex> lock(g_mem_mu);
  auto it = g_freed.find(reinterpret_cast<uintptr_t>(p));
  if (it != g_freed.end()) it->second.poisoned = true;
  quarantine(p, size);
}

void* allocate_block(size_t n, c10::DeviceIndex device, c10::StreamId stream) {
  if (device >= 0 && g_fail_allocation.load() >= 0 && g_fail_allocation-- == 0) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, "zpu: out of memory (injected)");
  }
  size_t size = (std::max<size_t>(n, 1) + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, size);
  TORCH_CHECK(p != nullptr, "zpu: out of memory allocating ", n, " bytes");
  if (device >= 0) std::memset(p, kPoison, size);  // like fresh device memory: not zeros
  std::lock_guard<std::mutex> lock(g_mem_mu);
  Block& b = g_blocks[reinterpret_cast<uintptr_t>(p)];
  b.size = size;
  b.requested = n;
  b.device = device;
  b.stream = stream;
  if (device >= 0) {
    g_allocated[device] += static_cast<int64_t>(n);
    g_peak[device] = std::max(g_peak[device], g_allocated[device]);
  }
  return p;
}

// The block holding `p`; call with g_mem_mu held. Null if none.
Block* find_block(const void* p, uintptr_t* start = nullptr) {
  auto a = reinterpret_cast<uintptr_t>(p);
  auto it = g_blocks.upper_bound(a);
  if (it == g_blocks.begin()) return nullptr;
  --it;
  if (a >= it->first + it->second.size) return nullptr;
  if (start) *start = it->first;
  return &it->second;
}

void free_device_block(void* p) {
  Block b;
  {
    std::lock_guard<std::mutex> lock(g_mem_mu);
    auto it = g_blocks.find(reinterpret_cast<uintptr_t>(p));
    b = std::move(it->second);
    g_blocks.erase(it);
    g_allocated[b.device] -= static_cast<int64_t>(b.requested);
    g_freed[reinterpret_cast<uintptr_t>(p)] = {b.size, b.device, b.stream, b.also_used_on};
  }
  std::vector<std::pair<Worker*, uint64_t>> others;
  for (const c10::Stream& s : b.also_used_on) {
    Worker& w = worker(s);
    others.emplace_back(&w, w.ticket());
  }
  worker(b.device, b.stream).enqueue([p, size = b.size, others] {
    for (auto [w, t] : others) w->wait(t);
    poison_and_quarantine(p, size);
  });
}

void free_pinned_block(void* p) {
  std::unique_lock<std::mutex> lock(g_mem_mu);
  auto it = g_blocks.find(reinterpret_cast<uintptr_t>(p));
  if (it->second.uses > 0) {
    it->second.freed = true;  // the last copy that uses it poisons it
    return;
  }
  size_t size = it->second.size;
  g_blocks.erase(it);
  lock.unlock();
  poison_and_quarantine(p, size);
}

// Marks the pinned block holding `p` (if any) as used by a queued copy until the returned
// release function runs.
std::function<void()> use_pinned(const void* p) {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  uintptr_t start = 0;
  Block* b = find_block(p, &start);
  if (b == nullptr || b->device >= 0) return [] {};
  ++b->uses;
  return [start] {
    std::unique_lock<std::mutex> lock(g_mem_mu);
    auto it = g_blocks.find(start);
    if (--it->second.uses > 0 || !it->second.freed) return;
    size_t size = it->second.size;
    g_blocks.erase(it);
    lock.unlock();
    poison_and_quarantine(reinterpret_cast<void*>(start), size);
  };
}

// Called by a queued item running on `w` that touches device memory at `p`. CUDA's rule: once
// its owner has freed a block, the allocator may hand it out again to work on the block's own
// stream (and streams recorded with recordDataPtrOnStream), so a use on any other stream that
// runs after the free is a race; so is any use after the poison ran. `any_stream`: the item's
// stream is ordered before the block's stream by the kernel itself (cross-device copies).
void check_use(const void* p, Worker* w, bool any_stream, const char* what);

bool is_pinned(const void* p) {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  Block* b = find_block(p);
  return b != nullptr && b->device < 0;
}

// recordDataPtrOnStream: `s` uses the device block holding `p` (its free waits for `s`).
void record_use(const void* p, const c10::Stream& s) {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  Block* b = find_block(p);
  if (b != nullptr && b->device >= 0) b->also_used_on.push_back(s);
}

void check_use(const void* p, Worker* w, bool any_stream, const char* what) {
  std::unique_lock<std::mutex> lock(g_mem_mu);
  auto a = reinterpret_cast<uintptr_t>(p);
  auto it = g_freed.upper_bound(a);
  if (it == g_freed.begin()) return;
  --it;
  if (a >= it->first + it->second.size) return;
  const Freed f = it->second;
  lock.unlock();
  bool ordered = any_stream || stream_of(w, f.device) == f.stream;
  for (const c10::Stream& s : f.also_used_on) ordered = ordered || &worker(s) == w;
  if (ordered && !f.poisoned) return;
  ++g_violations;
  std::fprintf(stderr, "zpu: %s used device memory (zpu:%d, stream %d) %s\n", what, int(f.device),
               int(f.stream),
               f.poisoned ? "after it was freed and poisoned"
                          : "freed by its owner, from a stream not ordered with the free");
}

void delete_device(void* p) { free_device_block(p); }
void delete_pinned(void* p) { free_pinned_block(p); }

struct DeviceAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    c10::DeviceIndex device = t_device;
    void* p = allocate_block(n, device, t_stream[device]);
    return {p, p, &delete_device, c10::Device(c10::DeviceType::PrivateUse1, device)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &delete_device; }
  void copy_data(void* dest, const void* src, size_t count) const override {
    current_worker(t_device).synchronize();
    std::memcpy(dest, src, count);
  }
};

struct PinnedAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = allocate_block(n, -1, 0);
    return {p, p, &delete_pinned, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &delete_pinned; }
  void copy_data(void* dest, const void* src, size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

DeviceAllocator g_device_allocator;
PinnedAllocator g_pinned_allocator;

// ------------------------------------------------------------------------------------------
// Streams and events.

struct Event {
  std::mutex mu;
  Worker* worker = nullptr;  // null: never recorded
  uint64_t ticket = 0;
};

std::pair<Worker*, uint64_t> snapshot(void* event) {
  auto* e = static_cast<Event*>(event);
  if (e == nullptr) return {nullptr, 0};
  std::lock_guard<std::mutex> lock(e->mu);
  return {e->worker, e->ticket};
}

struct GuardImpl final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return c10::DeviceType::PrivateUse1; }
  c10::Device exchangeDevice(c10::Device d) const override {
    c10::Device old = getDevice();
    setDevice(d);
    return old;
  }
  c10::Device getDevice() const override {
    return c10::Device(c10::DeviceType::PrivateUse1, t_device);
  }
  void setDevice(c10::Device d) const override {
    TORCH_CHECK(d.is_privateuseone() && index_of(d) < kDevices, "zpu: bad device ", d);
    t_device = index_of(d);
  }
  void uncheckedSetDevice(c10::Device d) const noexcept override { t_device = index_of(d); }
  c10::Stream getStream(c10::Device d) const override {
    c10::DeviceIndex i = index_of(d);
    return make_stream(i, t_stream[i]);
  }
  c10::Stream getDefaultStream(c10::Device d) const override { return make_stream(index_of(d), 0); }
  c10::Stream getStreamFromGlobalPool(c10::Device d, bool) const override {
    return make_stream(index_of(d), 1 + g_next_pool_stream++ % (kStreams - 1));
  }
  c10::Stream getNewStream(c10::Device d, int) const override {
    return getStreamFromGlobalPool(d, false);
  }
  c10::Stream exchangeStream(c10::Stream s) const override {
    c10::Stream old = getStream(s.device());
    t_stream[s.device_index()] = s.id();
    return old;
  }
  c10::DeviceIndex deviceCount() const noexcept override { return kDevices; }

  void record(void** event, const c10::Stream& stream, const c10::DeviceIndex,
              const c10::EventFlag) const override {
    if (*event == nullptr) *event = new Event();
    auto* e = static_cast<Event*>(*event);
    Worker& w = worker(stream);
    // A marker item of its own: the event completes after the work before it and a delay.
    uint64_t ticket = w.enqueue([] {});
    std::lock_guard<std::mutex> lock(e->mu);
    e->worker = &w;
    e->ticket = ticket;
  }
  void block(void* event, const c10::Stream& stream) const override {
    auto [w, ticket] = snapshot(event);
    if (w == nullptr) return;
    Worker& target = worker(stream);
    if (&target == w) return;  // in order already
    target.enqueue([w = w, ticket = ticket] { w->wait(ticket); });
  }
  bool queryEvent(void* event) const override {
    auto [w, ticket] = snapshot(event);
    return w == nullptr || w->reached(ticket);
  }
  void destroyEvent(void* event, const c10::DeviceIndex) const noexcept override {
    delete static_cast<Event*>(event);
  }
  bool queryStream(const c10::Stream& s) const override {
    Worker& w = worker(s);
    return w.reached(w.ticket());
  }
  void synchronizeStream(const c10::Stream& s) const override { worker(s).synchronize(); }
  void synchronizeEvent(void* event) const override {
    auto [w, ticket] = snapshot(event);
    if (w != nullptr) w->wait(ticket);
  }
  void synchronizeDevice(const c10::DeviceIndex d) const override {
    for (c10::StreamId s = 0; s < kStreams; ++s) worker(d, s).synchronize();
  }
  void recordDataPtrOnStream(const c10::DataPtr& p, const c10::Stream& s) const override {
    record_use(p.get(), s);
  }
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, GuardImpl);

struct Hooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  c10::DeviceIndex deviceCount() const override { return kDevices; }
  void setCurrentDevice(c10::DeviceIndex d) const override { t_device = d; }
  c10::DeviceIndex getCurrentDevice() const override { return t_device; }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex d) const override {
    c10::DeviceIndex old = t_device;
    t_device = d;
    return old;
  }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex d) const override {
    return exchangeDevice(d);
  }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  bool isPinnedPtr(const void* data) const override { return is_pinned(data); }
  c10::Allocator* getPinnedMemoryAllocator() const override { return &g_pinned_allocator; }
  at::Device getDeviceFromPtr(void* data) const override {
    std::lock_guard<std::mutex> lock(g_mem_mu);
    Block* b = find_block(data);
    TORCH_CHECK(b != nullptr && b->device >= 0, "zpu: not device memory");
    return at::Device(c10::DeviceType::PrivateUse1, b->device);
  }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const override {
    c10::DeviceIndex device = storage.device().index();
    current_worker(device).synchronize();
    c10::DataPtr fresh = g_device_allocator.allocate(newsize);
    size_t keep = std::min(newsize, storage.nbytes());
    if (keep) std::memcpy(fresh.get(), storage.data(), keep);
    storage.unsafeGetStorageImpl()->set_data_ptr_noswap(std::move(fresh));
    storage.unsafeGetStorageImpl()->set_nbytes(newsize);
  }
};

// ------------------------------------------------------------------------------------------
// Kernels. Device tensors are viewed as CPU tensors over the same bytes; the CPU kernel then
// runs on the current stream's worker.

// A CPU tensor over `t`'s bytes (no ownership), with its conj and neg bits.
at::Tensor host_alias(const at::Tensor& t) {
  at::Tensor alias = at::from_blob(t.data_ptr(), t.sizes(), t.strides(),
                                   at::TensorOptions().dtype(t.scalar_type()));
  alias._set_conj(t.is_conj());
  alias._set_neg(t.is_neg());
  return alias;
}

// Device memory a queued item touches, checked when it runs (check_use).
struct Use {
  const void* p;
  bool any_stream;
};

// Runs `dst.copy_(src)` on the CPU aliases on `w`; returns its ticket.
uint64_t queue_copy(Worker& w, at::Tensor dst, at::Tensor src, std::vector<Use> uses,
                    std::function<void()> after) {
  return w.enqueue([w = &w, dst = std::move(dst), src = std::move(src), uses = std::move(uses),
                    after = std::move(after)] {
    for (const Use& u : uses) check_use(u.p, w, u.any_stream, "a copy");
    at::AutoDispatchBelowADInplaceOrView plain;
    dst.copy_(src);
    after();
  });
}

at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  TORCH_CHECK(self.sizes() == dst.sizes(), "zpu: _copy_from of different shapes");
  if (dst.numel() == 0) return dst;
  const bool src_dev = self.device().is_privateuseone();
  const bool dst_dev = dst.device().is_privateuseone();
  TORCH_CHECK((src_dev || self.is_cpu()) && (dst_dev || dst.is_cpu()), "zpu: cannot copy ",
              self.device(), " -> ", dst.device());
  c10::DeviceIndex device = dst_dev ? dst.device().index() : self.device().index();
  Worker& w = current_worker(device);
  at::Tensor src_alias = host_alias(self), dst_alias = host_alias(dst);
  if (src_dev && dst_dev) {
    if (self.device() != dst.device()) {
      // Across devices (as CUDA): on the source's current stream, after the work queued on
      // the destination's, which then waits for the copy.
      Worker* src_w = &current_worker(self.device().index());
      uint64_t before = w.ticket();
      src_w->enqueue([w = &w, before] { w->wait(before); });
      uint64_t copied = queue_copy(*src_w, dst_alias, src_alias,
                                   {{self.data_ptr(), false}, {dst.data_ptr(), true}}, [] {});
      w.enqueue([src_w, copied] { src_w->wait(copied); });
    } else {
      queue_copy(w, dst_alias, src_alias, {{self.data_ptr(), false}, {dst.data_ptr(), false}},
                 [] {});
    }
    return dst;
  }
  // Host <-> device: asynchronous only when asked and the host side is pinned (as CUDA).
  const at::Tensor& host = src_dev ? dst : self;
  std::vector<Use> uses = {{(src_dev ? self : dst).data_ptr(), false}};
  bool async = non_blocking && is_pinned(host.data_ptr());
  if (async) {
    queue_copy(w, dst_alias, src_alias, std::move(uses), use_pinned(host.data_ptr()));
  } else {
    w.wait(queue_copy(w, dst_alias, src_alias, std::move(uses), [] {}));
  }
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  at::native::resize_(dst, self.sizes(), std::nullopt);
  return copy_from(self, dst, false);
}

at::Tensor& fill_scalar(at::Tensor& self, const at::Scalar& value) {
  if (self.numel() == 0) return self;
  Worker* w = &current_worker(self.device().index());
  w->enqueue([w, alias = host_alias(self), value, p = self.data_ptr()] {
    check_use(p, w, false, "fill_");
    at::AutoDispatchBelowADInplaceOrView plain;
    alias.fill_(value);
  });
  return self;
}

at::Scalar local_scalar_dense(const at::Tensor& self) {
  current_worker(self.device().index()).synchronize();
  return host_alias(self).item();
}

at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<c10::ScalarType> dtype,
                               std::optional<c10::Layout> layout, std::optional<c10::Device> device,
                               std::optional<bool> pin_memory,
                               std::optional<c10::MemoryFormat> memory_format) {
  c10::Device d = c10::device_or_default(device);
  TORCH_CHECK(d.is_privateuseone() && c10::layout_or_default(layout) == c10::Layout::Strided &&
                  !c10::pinned_memory_or_default(pin_memory),
              "zpu: only strided device tensors");
  c10::DeviceGuard guard(d);
  return at::detail::empty_generic(size, &g_device_allocator,
                                   c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride,
                         std::optional<c10::ScalarType> dtype, std::optional<c10::Layout> layout,
                         std::optional<c10::Device> device, std::optional<bool> pin_memory) {
  c10::Device d = c10::device_or_default(device);
  TORCH_CHECK(d.is_privateuseone() && c10::layout_or_default(layout) == c10::Layout::Strided &&
                  !c10::pinned_memory_or_default(pin_memory),
              "zpu: only strided device tensors");
  c10::DeviceGuard guard(d);
  return at::detail::empty_strided_generic(size, stride, &g_device_allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                           c10::dtype_or_default(dtype));
}

at::Tensor as_strided(const at::Tensor& self, c10::SymIntArrayRef size, c10::SymIntArrayRef stride,
                      std::optional<c10::SymInt> storage_offset) {
  std::optional<int64_t> offset;
  if (storage_offset) offset = storage_offset->expect_int();
  return at::native::as_strided_tensorimpl(self, C10_AS_INTARRAYREF_SLOW(size),
                                           C10_AS_INTARRAYREF_SLOW(stride), offset);
}

at::Tensor view(const at::Tensor& self, c10::SymIntArrayRef size) {
  return at::native::view(self, C10_AS_INTARRAYREF_SLOW(size));
}

at::Tensor reshape_alias(const at::Tensor& self, c10::SymIntArrayRef size,
                         c10::SymIntArrayRef stride) {
  return at::native::_reshape_alias(self, C10_AS_INTARRAYREF_SLOW(size),
                                    C10_AS_INTARRAYREF_SLOW(stride));
}

const at::Tensor& resize(const at::Tensor& self, c10::SymIntArrayRef size,
                         std::optional<at::MemoryFormat> memory_format) {
  return at::native::resize_(self, C10_AS_INTARRAYREF_SLOW(size), memory_format);
}

at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& source) {
  return at::native::set_tensor_(self, source);
}

at::Tensor& set_storage(at::Tensor& self, at::Storage source) {
  return at::native::set_(self, std::move(source));
}

at::Tensor& set_storage_offset(at::Tensor& self, at::Storage source, c10::SymInt offset,
                               c10::SymIntArrayRef size, c10::SymIntArrayRef stride) {
  return at::native::set_storage_cpu_(self, std::move(source), offset.expect_int(),
                                      C10_AS_INTARRAYREF_SLOW(size),
                                      C10_AS_INTARRAYREF_SLOW(stride));
}

// Everything else runs on the CPU, synchronously: torch copies the device arguments to the
// host (blocking copies, so after the queued work) and the results back.
void fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  at::native::cpu_fallback(op, stack);
}

// ------------------------------------------------------------------------------------------
// Test controls: torch.ops.zpu.*

void set_delay(int64_t min_us, int64_t max_us) {
  TORCH_CHECK(0 <= min_us && min_us <= max_us, "zpu: need 0 <= min_us <= max_us");
  g_delay_min_us = min_us;
  g_delay_max_us = max_us;
}

std::vector<int64_t> get_delay() { return {g_delay_min_us.load(), g_delay_max_us.load()}; }

// Queues `ms` milliseconds of work on the current stream of `device` (a slow kernel).
void sleep_on_stream(int64_t device, int64_t ms) {
  current_worker(static_cast<c10::DeviceIndex>(device)).enqueue([ms] {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  });
}

int64_t memory_allocated(int64_t device) {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  return g_allocated[device];
}

int64_t max_memory_allocated(int64_t device) {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  return g_peak[device];
}

void reset_peak_memory_stats(int64_t device) {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  g_peak[device] = g_allocated[device];
}

// Uses of freed device memory seen so far (check_use).
int64_t violations() { return g_violations.load(); }

// Makes the `n`-th next device allocation (0: the next one) fail as out of memory; -1: none.
void fail_allocation(int64_t n) { g_fail_allocation = n; }

// Pinned blocks alive (not yet freed, or freed with copies still queued).
int64_t pinned_blocks() {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  int64_t n = 0;
  for (const auto& [start, b] : g_blocks) n += b.device < 0;
  return n;
}

struct Registration {
  Registration() {
    configure_from_env();
    c10::register_privateuse1_backend("zpu");
    at::RegisterPrivateUse1HooksInterface(new Hooks());
    c10::SetAllocator(c10::DeviceType::PrivateUse1, &g_device_allocator);
  }
} g_registration;

}  // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("as_strided", as_strided);
  m.impl("view", view);
  m.impl("view_as_real", at::native::view_as_real);
  m.impl("view_as_complex", at::native::view_as_complex);
  m.impl("_reshape_alias", reshape_alias);
  m.impl("resize_", resize);
  m.impl("set_.source_Tensor", set_tensor);
  m.impl("set_.source_Storage", set_storage);
  m.impl("set_.source_Storage_storage_offset", set_storage_offset);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("fill_.Scalar", fill_scalar);
  m.impl("_local_scalar_dense", local_scalar_dense);
}

// _copy_from copies conjugate and negative views itself (host_alias keeps the bits): without
// these, torch's conj/neg fallback would materialize them with clone(), which copies again.
TORCH_LIBRARY_IMPL(aten, Conjugate, m) {
  m.impl("_copy_from", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(aten, Negative, m) {
  m.impl("_copy_from", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

TORCH_LIBRARY(zpu, m) {
  m.def("set_delay(int min_us, int max_us) -> ()", set_delay);
  m.def("get_delay() -> int[]", get_delay);
  m.def("sleep_on_stream(int device, int ms) -> ()", sleep_on_stream);
  m.def("memory_allocated(int device) -> int", memory_allocated);
  m.def("max_memory_allocated(int device) -> int", max_memory_allocated);
  m.def("reset_peak_memory_stats(int device) -> ()", reset_peak_memory_stats);
  m.def("pinned_blocks() -> int", pinned_blocks);
  m.def("violations() -> int", violations);
  m.def("fail_allocation(int n) -> ()", fail_allocation);
}

}  // namespace zpu
