#include "core/io_engine.h"

#include <limits.h>
#include <sys/mman.h>
#include <sys/uio.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <thread>

#include "core/crc32c.h"
#include "core/file.h"
#include "core/parallel.h"
#include "zerockpt/errors.h"

namespace zerockpt {
namespace {

constexpr size_t kPrefix = SIZE_MAX;

// Maps the file pages under [p, p + size) in one call where the kernel can (Linux 5.14+), so a
// pass over mapped bytes does not take one page fault per 4 KiB.
void populate(const uint8_t* p, uint64_t size) {
#ifdef MADV_POPULATE_READ
  auto lo = reinterpret_cast<uintptr_t>(p) & ~(kPageBytes - 1);
  auto hi = reinterpret_cast<uintptr_t>(p) + size;
  (void)::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_READ);
#else
  (void)p;
  (void)size;
#endif
}

// A contiguous run of file bytes that come from one source (or the header prefix).
struct Segment {
  uint64_t file_offset;
  uint64_t size;
  size_t source;
};

struct Plan {
  std::vector<Segment> segments;  // in file order, without gaps
  uint64_t file_size;
};

Plan make_plan(const Layout& layout, const std::vector<TensorSpec>& specs) {
  Plan plan;
  plan.file_size = layout.file_size();
  plan.segments.push_back({0, layout.prefix.size(), kPrefix});
  std::vector<size_t> order(specs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return layout.begin[a] < layout.begin[b]; });
  for (size_t i : order) {
    if (specs[i].nbytes == 0) continue;
    plan.segments.push_back({layout.prefix.size() + layout.begin[i], specs[i].nbytes, i});
  }
  return plan;
}

// Calls visit(segment, lo, hi) for the part [lo, hi) of each segment inside [start, end).
template <typename Visit>
void for_each_overlap(const Plan& plan, uint64_t start, uint64_t end, Visit visit) {
  auto it = std::upper_bound(plan.segments.begin(), plan.segments.end(), start,
                             [](uint64_t off, const Segment& s) { return off < s.file_offset; });
  if (it != plan.segments.begin()) --it;
  for (; it != plan.segments.end() && it->file_offset < end; ++it) {
    uint64_t lo = std::max(start, it->file_offset);
    uint64_t hi = std::min(end, it->file_offset + it->size);
    if (lo < hi) visit(*it, lo, hi);
  }
}

// The CRC-32C of one piece of one tensor, recorded by the chunk that wrote it.
struct Piece {
  size_t source;
  uint64_t size;
  uint32_t crc;
};

void record(std::vector<Piece>* pieces, const Segment& s, const uint8_t* bytes, uint64_t size) {
  if (pieces && s.source != kPrefix) pieces->push_back({s.source, size, crc32c(bytes, size)});
}

// The bytes of segment `s` at file offset `lo`, in tensor memory, the header or the chunk's
// staged buffer (which starts at file offset `start`); null when fill() produces them.
const uint8_t* segment_bytes(const Layout& layout, const std::vector<WriteSource>& sources,
                             const Segment& s, uint64_t lo, uint64_t start, const uint8_t* staged) {
  if (s.source == kPrefix) return reinterpret_cast<const uint8_t*>(layout.prefix.data()) + lo;
  const WriteSource& source = sources[s.source];
  if (source.staged) return staged + (lo - start);
  return source.data ? source.data + (lo - s.file_offset) : nullptr;
}

// Zero-copy: pwritev straight from tensor memory (or the staged buffer); fill() sources go
// through staging. Without checksums only: the bytes are read twice (CRC, then the kernel's
// copy), and another thread may change tensor memory in between.
void write_chunk_zero_copy(WriteSink& sink, const Plan& plan, const Layout& layout,
                           const std::vector<WriteSource>& sources, uint64_t start, uint64_t end,
                           const uint8_t* staged) {
  std::vector<iovec> iov;
  uint64_t iov_start = start;
  auto flush = [&](uint64_t next_offset) {
    if (!iov.empty()) sink.writev(iov, iov_start);
    iov.clear();
    iov_start = next_offset;
  };
  for_each_overlap(plan, start, end, [&](const Segment& s, uint64_t lo, uint64_t hi) {
    const uint8_t* bytes = segment_bytes(layout, sources, s, lo, start, staged);
    if (bytes != nullptr) {
      if (iov.empty()) iov_start = lo;
      iov.push_back({const_cast<uint8_t*>(bytes), hi - lo});
      if (iov.size() >= IOV_MAX) flush(hi);
      return;
    }
    flush(lo);
    StagingBuffer staging(kChunkBytes);
    for (uint64_t pos = lo; pos < hi; pos += staging.size()) {
      uint64_t n = std::min(staging.size(), hi - pos);
      sources[s.source].fill(pos - s.file_offset, n, staging.data());
      sink.write(staging.data(), n, pos);
    }
    iov_start = hi;
  });
  flush(end);
}

// Assembles the chunk in one buffer (staging, or around the staged bytes already in the chunk's
// buffer), checksums the pieces there and writes that buffer: each CRC describes the very bytes
// written, even if another thread changes tensor memory meanwhile. For O_DIRECT (`direct`), the
// write is padded to whole pages.
void write_chunk_assembled(WriteSink& sink, const Plan& plan, const Layout& layout,
                           const std::vector<WriteSource>& sources, uint64_t start, uint64_t end,
                           uint8_t* staged, bool direct, std::vector<Piece>* pieces) {
  std::optional<StagingBuffer> own;
  if (!staged) own.emplace(kChunkBytes);
  uint8_t* buf = staged ? staged : own->data();
  for_each_overlap(plan, start, end, [&](const Segment& s, uint64_t lo, uint64_t hi) {
    uint8_t* dst = buf + (lo - start);
    const uint8_t* bytes = segment_bytes(layout, sources, s, lo, start, staged);
    if (bytes == nullptr) {
      sources[s.source].fill(lo - s.file_offset, hi - lo, dst);
    } else if (bytes != dst) {
      std::memcpy(dst, bytes, hi - lo);
    }
    record(pieces, s, dst, hi - lo);
  });
  uint64_t len = end - start;
  if (direct) {
    uint64_t padded = round_up(len, kPageBytes);
    std::memset(buf + len, 0, padded - len);
    len = padded;
  }
  sink.write(buf, len, start);
}

// The staged pieces of each chunk that has any; `slot[k]` is chunk k's index in that list.
std::vector<StagedChunk> staged_chunks(const Plan& plan, const std::vector<WriteSource>& sources,
                                       size_t chunks, std::vector<size_t>* slot) {
  std::vector<StagedChunk> out;
  slot->assign(chunks, SIZE_MAX);
  for (size_t k = 0; k < chunks; ++k) {
    uint64_t start = k * kChunkBytes;
    uint64_t end = std::min(plan.file_size, start + kChunkBytes);
    StagedChunk chunk{k, {}};
    for_each_overlap(plan, start, end, [&](const Segment& s, uint64_t lo, uint64_t hi) {
      if (s.source == kPrefix || !sources[s.source].staged) return;
      chunk.pieces.push_back({s.source, lo - s.file_offset, hi - lo, lo - start});
    });
    if (chunk.pieces.empty()) continue;
    (*slot)[k] = out.size();
    out.push_back(std::move(chunk));
  }
  return out;
}

// Calls stager->stop() when the write ends, however it ends.
struct StopStager {
  ChunkStager* stager;
  ~StopStager() {
    if (stager) stager->stop();
  }
};

// The header with the checksums of `pieces` (per chunk, in file order) filled in.
std::string checksummed_prefix(const Layout& layout, const std::vector<TensorSpec>& specs,
                               const std::vector<std::vector<Piece>>& pieces) {
  std::vector<uint32_t> crc(specs.size(), 0);
  for (const auto& chunk : pieces) {
    for (const Piece& p : chunk) crc[p.source] = crc32c_combine(crc[p.source], p.crc, p.size);
  }
  std::vector<std::pair<uint64_t, uint64_t>> ranges(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    ranges[i] = {layout.begin[i], layout.begin[i] + specs[i].nbytes};
  }
  std::vector<uint32_t> ordered;
  ordered.reserve(specs.size());
  for (size_t i : checksum_order(ranges)) ordered.push_back(crc[i]);
  std::string prefix = layout.prefix;
  encode_checksums(ordered, &prefix[layout.checksum_offset]);
  return prefix;
}

std::atomic<int64_t> g_chunk_delay_us{0};     // set_chunk_delay
thread_local ProgressPoll* t_poll = nullptr;  // this thread's innermost ProgressPoll

void delay_chunk() {
  if (int64_t delay = g_chunk_delay_us.load(std::memory_order_relaxed)) {
    std::this_thread::sleep_for(std::chrono::microseconds(delay));
  }
}

}  // namespace

void set_chunk_delay(double seconds) {
  g_chunk_delay_us.store(static_cast<int64_t>(std::max(0.0, seconds) * 1e6));
}

ProgressPoll::ProgressPoll(std::function<bool()> poll)
    : poll_(std::move(poll)),
      outer_(t_poll),
      next_(std::chrono::steady_clock::now() + kPollInterval) {
  t_poll = this;
}

ProgressPoll::~ProgressPoll() { t_poll = outer_; }

ProgressPoll* ProgressPoll::current() noexcept { return t_poll; }

bool ProgressPoll::poll_if_due() {
  auto now = std::chrono::steady_clock::now();
  if (now < next_) return false;
  next_ = now + kPollInterval;
  return poll_();
}

void Progress::check(const std::string& what) {
  delay_chunk();
  if (ProgressPoll* poll = ProgressPoll::current(); poll && poll->poll_if_due()) cancel();
  if (cancelled()) throw Cancelled("cancelled while " + what);
}

void expect_progress(Progress* progress, uint64_t bytes, const std::string& what) {
  if (!progress) return;
  progress->check(what);
  progress->expect(bytes);
}

namespace {

// An AtomicFile's sink: with O_DIRECT, the final header goes out from page-aligned memory.
class AtomicFileSink : public FdSink {
 public:
  AtomicFileSink(const AtomicFile& file, const std::string& path)
      : FdSink(file.fd(), 0, path), direct_(file.direct()) {}
  void rewrite_prefix(const std::string& prefix) override {
    if (!direct_) return FdSink::rewrite_prefix(prefix);
    StagingBuffer aligned(prefix.size());
    std::memcpy(aligned.data(), prefix.data(), prefix.size());
    write(aligned.data(), prefix.size(), 0);
  }

 private:
  bool direct_;
};

// The chunks of `plan`, by the options' threads (one, in order, for a sequential sink), then
// the final header. `direct`: pad writes to whole pages (O_DIRECT).
void write_chunks(WriteSink& sink, const std::string& path, const Plan& plan, const Layout& layout,
                  const std::vector<TensorSpec>& specs, const std::vector<WriteSource>& sources,
                  const WriteOptions& options, bool direct) {
  unsigned threads = sink.sequential() ? 1 : options.threads ? options.threads : default_threads();
  size_t chunks = static_cast<size_t>((plan.file_size + kChunkBytes - 1) / kChunkBytes);
  bool checksums = layout.checksum_offset != Layout::kNoChecksums;
  std::vector<std::vector<Piece>> pieces(checksums ? chunks : 0);
  const uint64_t prefix_size = layout.prefix.size();
  Progress* progress = options.progress;
  const std::string what = "writing " + path;
  expect_progress(progress, plan.file_size - prefix_size, what);
  std::vector<size_t> staged_slot;
  std::vector<StagedChunk> staged = staged_chunks(plan, sources, chunks, &staged_slot);
  ChunkStager* stager = staged.empty() ? nullptr : options.stager;
  if (!staged.empty() && !stager) throw UsageError(path + ": staged tensors need a stager");
  StopStager stop_stager{stager};
  if (stager) stager->start(std::move(staged));
  parallel_for(chunks, threads, [&](size_t k) {
    uint64_t start = k * kChunkBytes;
    uint64_t end = std::min(plan.file_size, start + kChunkBytes);
    if (progress) progress->check(what);
    std::vector<Piece>* chunk_pieces = checksums ? &pieces[k] : nullptr;
    // Chunks are taken in increasing order, as the stager fills them, one buffer per thread.
    size_t slot = staged_slot[k];
    uint8_t* buffer = slot == SIZE_MAX ? nullptr : stager->take(slot);
    struct GiveBack {
      ChunkStager* stager;
      size_t slot;
      ~GiveBack() {
        if (slot != SIZE_MAX) stager->give_back(slot);
      }
    } give_back{stager, slot};
    if (direct || checksums) {
      write_chunk_assembled(sink, plan, layout, sources, start, end, buffer, direct, chunk_pieces);
    } else {
      write_chunk_zero_copy(sink, plan, layout, sources, start, end, buffer);
    }
    // Tensor bytes only: the header is not the user's data.
    if (progress && end > prefix_size) progress->add(end - std::max(start, prefix_size));
  });
  if (checksums) {
    // The header went out with placeholder digits; now that every byte is checksummed, the
    // real header replaces it (before the commit, so no reader ever sees the placeholder).
    sink.rewrite_prefix(checksummed_prefix(layout, specs, pieces));
  }
}

}  // namespace

void WriteSink::writev(std::vector<iovec>& iov, uint64_t offset) {
  for (const iovec& v : iov) {
    write(static_cast<const uint8_t*>(v.iov_base), v.iov_len, offset);
    offset += v.iov_len;
  }
}

void FdSink::write(const uint8_t* src, uint64_t size, uint64_t offset) {
  pwrite_full(fd_, src, size, base_ + offset, name_);
}

void FdSink::writev(std::vector<iovec>& iov, uint64_t offset) {
  pwritev_full(fd_, iov, base_ + offset, name_);
}

void MemorySink::write(const uint8_t* src, uint64_t size, uint64_t offset) {
  std::memcpy(dst_ + offset, src, size);
}

void write_planned(WriteSink& sink, const std::string& name, const Layout& layout,
                   const std::vector<TensorSpec>& specs, const std::vector<WriteSource>& sources,
                   const WriteOptions& options) {
  write_chunks(sink, name, make_plan(layout, specs), layout, specs, sources, options, false);
  if (options.progress) options.progress->check("writing " + name);
}

void write_file(const std::string& path, const Layout& layout, const std::vector<TensorSpec>& specs,
                const std::vector<WriteSource>& sources, const WriteOptions& options) {
  Plan plan = make_plan(layout, specs);
  bool want_direct =
      options.direct_io == DirectIo::kOn || (options.direct_io == DirectIo::kAuto &&
                                             options.durable && plan.file_size >= kDirectMinBytes);
  AtomicFile file(path, want_direct);
  bool direct = file.direct();
  file.preallocate(plan.file_size);
  AtomicFileSink sink(file, path);
  write_chunks(sink, path, plan, layout, specs, sources, options, direct);
  if (direct && plan.file_size % kPageBytes != 0) file.truncate(plan.file_size);
  // The last moment to stop with nothing committed.
  if (options.progress) options.progress->check("writing " + path);
  file.commit(options.durable);
}

void write_image(const std::string& path, const uint8_t* image, uint64_t size,
                 const WriteOptions& options) {
  bool want_direct = options.direct_io == DirectIo::kOn ||
                     (options.direct_io == DirectIo::kAuto && size >= kDirectMinBytes);
  AtomicFile file(path, want_direct);
  unsigned threads = options.threads ? options.threads : default_threads();
  size_t chunks = static_cast<size_t>((size + kChunkBytes - 1) / kChunkBytes);
  bool direct = file.direct();
  file.preallocate(size);
  parallel_for(chunks, threads, [&](size_t k) {
    uint64_t start = k * kChunkBytes;
    uint64_t len = std::min(size - start, kChunkBytes);
    delay_chunk();
    // O_DIRECT needs whole pages: the image holds zeros up to the next page boundary.
    if (direct) len = round_up(len, kPageBytes);
    pwrite_full(file.fd(), image + start, len, start, path);
  });
  if (direct && size % kPageBytes != 0) file.truncate(size);
  file.commit(options.durable);
}

void write_small_file(const std::string& path, const std::string& content, bool durable) {
  AtomicFile file(path, /*direct=*/false);
  pwrite_full(file.fd(), content.data(), content.size(), 0, path);
  file.commit(durable);
}

std::vector<uint32_t> checksum_ranges(const std::vector<ByteRange>& ranges, bool mapped,
                                      unsigned threads, Progress* progress) {
  struct Task {
    size_t range;
    uint64_t offset, size;
  };
  std::vector<Task> tasks;
  for (size_t i = 0; i < ranges.size(); ++i) {
    for (uint64_t pos = 0; pos < ranges[i].size; pos += kChunkBytes) {
      tasks.push_back({i, pos, std::min(kChunkBytes, ranges[i].size - pos)});
    }
  }
  std::vector<uint32_t> piece_crc(tasks.size());
  const std::string what = "checking checksums";
  if (progress) {
    uint64_t total = 0;
    for (const auto& r : ranges) total += r.size;
    expect_progress(progress, total, what);
  }
  parallel_for(tasks.size(), threads ? threads : default_threads(), [&](size_t t) {
    if (progress) progress->check(what);
    const uint8_t* p = ranges[tasks[t].range].data + tasks[t].offset;
    if (mapped) populate(p, tasks[t].size);
    piece_crc[t] = crc32c(p, tasks[t].size);
    if (progress) progress->add(tasks[t].size);
  });
  std::vector<uint32_t> out(ranges.size(), 0);
  for (size_t t = 0; t < tasks.size(); ++t) {
    uint32_t& crc = out[tasks[t].range];
    crc = crc32c_combine(crc, piece_crc[t], tasks[t].size);
  }
  return out;
}

void read_ranges(int fd, const std::string& path, std::vector<ReadRange> ranges, unsigned threads,
                 Progress* progress) {
  std::sort(ranges.begin(), ranges.end(),
            [](const ReadRange& a, const ReadRange& b) { return a.file_offset < b.file_offset; });
  // Split large ranges so threads share them, then merge file-adjacent pieces into one preadv.
  std::vector<ReadRange> pieces;
  for (const auto& r : ranges) {
    for (uint64_t pos = 0; pos < r.size; pos += kChunkBytes) {
      pieces.push_back({r.file_offset + pos, std::min(kChunkBytes, r.size - pos), r.dst + pos});
    }
  }
  struct Task {
    size_t first, last;  // pieces[first, last)
  };
  std::vector<Task> tasks;
  uint64_t task_bytes = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    bool extend = !tasks.empty() && task_bytes + pieces[i].size <= kChunkBytes &&
                  i - tasks.back().first < IOV_MAX &&
                  pieces[i - 1].file_offset + pieces[i - 1].size == pieces[i].file_offset;
    if (extend) {
      tasks.back().last = i + 1;
      task_bytes += pieces[i].size;
    } else {
      tasks.push_back({i, i + 1});
      task_bytes = pieces[i].size;
    }
  }
  const std::string what = "reading " + path;
  if (progress) {
    uint64_t total = 0;
    for (const auto& p : pieces) total += p.size;
    expect_progress(progress, total, what);
  }
  parallel_for(tasks.size(), threads ? threads : default_threads(), [&](size_t t) {
    if (progress) progress->check(what);
    std::vector<iovec> iov;
    uint64_t bytes = 0;
    for (size_t i = tasks[t].first; i < tasks[t].last; ++i) {
      iov.push_back({pieces[i].dst, pieces[i].size});
      bytes += pieces[i].size;
    }
    preadv_full(fd, iov, pieces[tasks[t].first].file_offset, path);
    if (progress) progress->add(bytes);
  });
}

}  // namespace zerockpt
