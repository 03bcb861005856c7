#include "core/io_engine.h"

#include <limits.h>
#include <sys/uio.h>

#include <algorithm>
#include <cstring>

#include "core/file.h"
#include "core/parallel.h"
#include "zerockpt/errors.h"

namespace zerockpt {
namespace {

constexpr size_t kPrefix = SIZE_MAX;
constexpr uint64_t kPage = 4096;

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

const uint8_t* source_bytes(const Layout& layout, const std::vector<WriteSource>& sources,
                            const Segment& s) {
  if (s.source == kPrefix) return reinterpret_cast<const uint8_t*>(layout.prefix.data());
  return sources[s.source].data;
}

// Buffered: pwritev straight from tensor memory; fill() sources go through staging.
void write_chunk_buffered(int fd, const std::string& path, const Plan& plan, const Layout& layout,
                          const std::vector<WriteSource>& sources, uint64_t start, uint64_t end) {
  std::vector<iovec> iov;
  uint64_t iov_start = start;
  auto flush = [&](uint64_t next_offset) {
    if (!iov.empty()) pwritev_full(fd, iov, iov_start, path);
    iov.clear();
    iov_start = next_offset;
  };
  for_each_overlap(plan, start, end, [&](const Segment& s, uint64_t lo, uint64_t hi) {
    const uint8_t* bytes = source_bytes(layout, sources, s);
    if (bytes != nullptr) {
      if (iov.empty()) iov_start = lo;
      iov.push_back({const_cast<uint8_t*>(bytes + (lo - s.file_offset)), hi - lo});
      if (iov.size() >= IOV_MAX) flush(hi);
      return;
    }
    flush(lo);
    StagingBuffer staging(kChunkBytes);
    for (uint64_t pos = lo; pos < hi; pos += staging.size()) {
      uint64_t n = std::min(staging.size(), hi - pos);
      sources[s.source].fill(pos - s.file_offset, n, staging.data());
      pwrite_full(fd, staging.data(), n, pos, path);
    }
    iov_start = hi;
  });
  flush(end);
}

// O_DIRECT: assemble each page-aligned chunk in staging, write it whole.
void write_chunk_direct(int fd, const std::string& path, const Plan& plan, const Layout& layout,
                        const std::vector<WriteSource>& sources, uint64_t start, uint64_t end) {
  StagingBuffer staging(kChunkBytes);
  uint8_t* buf = staging.data();
  for_each_overlap(plan, start, end, [&](const Segment& s, uint64_t lo, uint64_t hi) {
    const uint8_t* bytes = source_bytes(layout, sources, s);
    if (bytes != nullptr) {
      std::memcpy(buf + (lo - start), bytes + (lo - s.file_offset), hi - lo);
    } else {
      sources[s.source].fill(lo - s.file_offset, hi - lo, buf + (lo - start));
    }
  });
  uint64_t len = end - start;
  uint64_t padded = (len + kPage - 1) / kPage * kPage;
  std::memset(buf + len, 0, padded - len);
  pwrite_full(fd, buf, padded, start, path);
}

}  // namespace

void write_file(const std::string& path, const Layout& layout, const std::vector<TensorSpec>& specs,
                const std::vector<WriteSource>& sources, const WriteOptions& options) {
  Plan plan = make_plan(layout, specs);
  bool want_direct =
      options.direct_io == DirectIo::kOn || (options.direct_io == DirectIo::kAuto &&
                                             options.durable && plan.file_size >= kDirectMinBytes);
  AtomicFile file(path, want_direct);
  unsigned threads = options.threads ? options.threads : default_threads();
  size_t chunks = static_cast<size_t>((plan.file_size + kChunkBytes - 1) / kChunkBytes);
  bool direct = file.direct();
  file.preallocate(plan.file_size);
  parallel_for(chunks, threads, [&](size_t k) {
    uint64_t start = k * kChunkBytes;
    uint64_t end = std::min(plan.file_size, start + kChunkBytes);
    if (direct) {
      write_chunk_direct(file.fd(), path, plan, layout, sources, start, end);
    } else {
      write_chunk_buffered(file.fd(), path, plan, layout, sources, start, end);
    }
  });
  if (direct && plan.file_size % kPage != 0) file.truncate(plan.file_size);
  file.commit(options.durable);
}

void read_ranges(int fd, const std::string& path, std::vector<ReadRange> ranges, unsigned threads) {
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
  parallel_for(tasks.size(), threads ? threads : default_threads(), [&](size_t t) {
    std::vector<iovec> iov;
    for (size_t i = tasks[t].first; i < tasks[t].last; ++i) {
      iov.push_back({pieces[i].dst, pieces[i].size});
    }
    preadv_full(fd, iov, pieces[tasks[t].first].file_offset, path);
  });
}

}  // namespace zerockpt
