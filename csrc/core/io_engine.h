// The parallel I/O engine: writes a planned safetensors file atomically from tensor memory,
// and reads byte ranges of a file into memory. Torch-free: tensors are described by a pointer
// to contiguous bytes or by a fill callback. Runs without the GIL; thread-safe per call.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/header.h"

namespace zerockpt {

// Where the bytes of one tensor come from.
struct WriteSource {
  // The tensor's bytes in row-major order, or null when `fill` or the stager produces them.
  const uint8_t* data = nullptr;
  // Copies bytes [offset, offset + size) of the row-major form into dst. Called from several
  // threads at once for different tensors or ranges.
  std::function<void(uint64_t offset, uint64_t size, uint8_t* dst)> fill;
  // The bytes are brought into host memory by WriteOptions::stager (e.g. from device memory).
  bool staged = false;
};

// The bytes of staged sources that fall into one kChunkBytes chunk of the file.
struct StagedPiece {
  size_t source;           // index into write_file's sources
  uint64_t source_offset;  // within the source's row-major bytes
  uint64_t size;
  uint64_t buffer_offset;  // where they go in the chunk's buffer: file offset - chunk start
};
struct StagedChunk {
  size_t chunk;  // file bytes [chunk * kChunkBytes, (chunk + 1) * kChunkBytes)
  std::vector<StagedPiece> pieces;
};

// Brings staged bytes into host buffers ahead of the writers, in file order, through a bounded
// set of buffers (csrc/torch/device_staging.h copies device memory this way). write_file calls
// start() once, then take()/give_back() from its I/O threads (each holds at most one buffer,
// and chunks are taken in increasing order), and stop() on every exit. Thread-safe.
class ChunkStager {
 public:
  virtual ~ChunkStager() = default;
  // Starts staging `chunks` (in file order) into page-aligned buffers of kChunkBytes.
  virtual void start(std::vector<StagedChunk> chunks) = 0;
  // Blocks until chunks[i]'s pieces are in its buffer and returns the buffer, which the writer
  // may fill with the chunk's other bytes. Throws the producer's error, or Cancelled once
  // stopped.
  virtual uint8_t* take(size_t i) = 0;
  // The writer is done with chunks[i]'s buffer.
  virtual void give_back(size_t i) noexcept = 0;
  // Stops staging and waits for the copies in flight. Idempotent.
  virtual void stop() noexcept = 0;
};

// The bytes a running call has written, read or checked, for a progress bar that another thread
// polls, and a request to stop. A call adds what it is about to do to total() with expect()
// (unless the total was fixed at construction, for work spread over several calls), then
// done() grows to it in chunk-sized steps, calling check() before each chunk. Thread-safe.
class Progress {
 public:
  explicit Progress(uint64_t total = 0) : fixed_total_(total > 0), total_(total) {}
  void expect(uint64_t bytes) noexcept {
    if (!fixed_total_) total_.fetch_add(bytes, std::memory_order_relaxed);
  }
  void add(uint64_t bytes) noexcept { done_.fetch_add(bytes, std::memory_order_relaxed); }
  uint64_t total() const noexcept { return total_.load(std::memory_order_relaxed); }
  uint64_t done() const noexcept { return done_.load(std::memory_order_relaxed); }
  // Asks every call using this Progress to stop at its next chunk with Cancelled.
  void cancel() noexcept { cancelled_.store(true, std::memory_order_relaxed); }
  bool cancelled() const noexcept { return cancelled_.load(std::memory_order_relaxed); }
  // Between chunks: runs this thread's ProgressPoll if one is due (it may cancel), then throws
  // Cancelled if cancel() was called; `what` names the call ("writing <path>").
  void check(const std::string& what);

 private:
  const bool fixed_total_;
  std::atomic<uint64_t> total_;
  std::atomic<uint64_t> done_{0};
  std::atomic<bool> cancelled_{false};
};

// How a call running on its caller's thread sees a request to stop from outside C++ (Ctrl-C,
// for the Python binding) between chunks. While alive, Progress::check() on the thread that
// made it (never on worker threads) runs `poll` at most every kPollInterval, and cancels that
// Progress when `poll` returns true. Scoped to one thread; nests.
class ProgressPoll {
 public:
  static constexpr std::chrono::milliseconds kPollInterval{50};
  explicit ProgressPoll(std::function<bool()> poll);
  ~ProgressPoll();
  ProgressPoll(const ProgressPoll&) = delete;
  ProgressPoll& operator=(const ProgressPoll&) = delete;
  // This thread's innermost poll, or null.
  static ProgressPoll* current() noexcept;
  // Runs poll if kPollInterval has passed since the last run; true when it asks to stop.
  bool poll_if_due();

 private:
  std::function<bool()> poll_;
  ProgressPoll* outer_;
  std::chrono::steady_clock::time_point next_;
};

// Makes every Progress::check() and every chunk of write_image() (save_async's background
// write) sleep `seconds` first (0: off), so that a test can interrupt a call between its
// chunks. Testing aid; process-wide.
void set_chunk_delay(double seconds);

// progress->expect(bytes) and progress->check(what) where `progress` may be null.
void expect_progress(Progress* progress, uint64_t bytes, const std::string& what);

enum class DirectIo { kAuto, kOn, kOff };

// nullopt -> kAuto, true -> kOn, false -> kOff (the public APIs' optional<bool>).
inline DirectIo to_direct_io(std::optional<bool> direct_io) {
  return !direct_io ? DirectIo::kAuto : *direct_io ? DirectIo::kOn : DirectIo::kOff;
}

struct WriteOptions {
  // fsync the file, then its directory, before returning.
  bool durable = true;
  // Store the CRC-32C of every tensor, computed from the very bytes written: each chunk is
  // copied into staging, checksummed and written from there, so a tensor changed by another
  // thread during the save still gives a file that passes its own checksums.
  bool checksums = true;
  // kAuto: O_DIRECT (through reused page-aligned staging) when durable and the file is at least
  // kDirectMinBytes; buffered pwrite otherwise (straight from tensor memory without checksums).
  DirectIo direct_io = DirectIo::kAuto;
  unsigned threads = 0;  // 0: default_threads()
  // Counts tensor bytes as they are written and stops the write (Cancelled, nothing committed)
  // when cancelled. Not owned; null: none.
  Progress* progress = nullptr;
  // Produces the bytes of staged sources; required if there are any. Not owned.
  ChunkStager* stager = nullptr;
  // Host memory for staging device tensors (the torch layer's pool); 0: its default.
  uint64_t staging_bytes = 0;
};

constexpr uint64_t kDirectMinBytes = 64ull << 20;
// Bytes one thread stages or writes per task; bounds staging memory to threads * kChunkBytes.
constexpr uint64_t kChunkBytes = 8ull << 20;

// Where write_planned() puts the bytes of a file. Offsets are relative to the file's start.
class WriteSink {
 public:
  virtual ~WriteSink() = default;
  // Writes src[0, size) at `offset`. Positional sinks take calls from several threads at once
  // (disjoint ranges); sequential ones one call at a time, at increasing, contiguous offsets.
  virtual void write(const uint8_t* src, uint64_t size, uint64_t offset) = 0;
  // Writes all of `iov` (which it may modify) from `offset`; by default, one write() each.
  virtual void writev(std::vector<iovec>& iov, uint64_t offset);
  // True if writes must come in file order from one thread (a stream).
  virtual bool sequential() const { return false; }
  // Writes the final header (checksums filled in) over the placeholder written first, once
  // every other byte is written; a sequential sink must seek back to do it.
  virtual void rewrite_prefix(const std::string& prefix) {
    write(reinterpret_cast<const uint8_t*>(prefix.data()), prefix.size(), 0);
  }
};

// Writes prefix + tensor bytes into `sink` (no file of its own: no atomicity, no fsync), as
// write_file() does; `name` names the destination in errors and progress. `sources[i]`
// matches `specs[i]`, placed at `layout.begin[i]`. A sequential sink gets the chunks in order
// on the calling thread.
void write_planned(WriteSink& sink, const std::string& name, const Layout& layout,
                   const std::vector<TensorSpec>& specs, const std::vector<WriteSource>& sources,
                   const WriteOptions& options);

// The sink of an open file descriptor: pwrite at `base` + offset.
class FdSink : public WriteSink {
 public:
  FdSink(int fd, uint64_t base, std::string name) : fd_(fd), base_(base), name_(std::move(name)) {}
  void write(const uint8_t* src, uint64_t size, uint64_t offset) override;
  void writev(std::vector<iovec>& iov, uint64_t offset) override;

 private:
  int fd_;
  uint64_t base_;
  std::string name_;
};

// The sink of a buffer of the whole file's size: memcpy at `offset`.
class MemorySink : public WriteSink {
 public:
  explicit MemorySink(uint8_t* dst) : dst_(dst) {}
  void write(const uint8_t* src, uint64_t size, uint64_t offset) override;

 private:
  uint8_t* dst_;
};

// Writes prefix + tensor bytes to `path` through an AtomicFile. `sources[i]` matches
// `specs[i]`, placed at `layout.begin[i]`. If the layout has a checksum placeholder, the
// checksums of the bytes written are filled in (options.checksums is for plan_layout's caller).
// Throws IoError naming `path` when a write, fsync or the rename fails, Cancelled when
// options.progress is cancelled (`path` is then unchanged), UsageError for staged sources
// without options.stager.
void write_file(const std::string& path, const Layout& layout, const std::vector<TensorSpec>& specs,
                const std::vector<WriteSource>& sources, const WriteOptions& options);

// Writes the whole file `image[0, size)` (prefix and data, as they are to be on disk) to `path`
// through an AtomicFile, straight from that memory: no staging copy. With O_DIRECT (kOn, or
// kAuto for files of at least kDirectMinBytes, durable or not), `image` must be page-aligned
// and readable up to `size` rounded up to a page, with zeros past `size`.
void write_image(const std::string& path, const uint8_t* image, uint64_t size,
                 const WriteOptions& options);

// Replaces `path` with `content` atomically (AtomicFile); for small files such as pointers.
void write_small_file(const std::string& path, const std::string& content, bool durable);

struct ByteRange {
  const uint8_t* data;
  uint64_t size;
};

// The CRC-32C of each range, computed by up to `threads` threads (0: default) in kChunkBytes
// pieces. `mapped`: the ranges are in a file mapping, whose pages are mapped in bulk first.
// `progress` (may be null) counts the bytes checked and can stop the pass.
std::vector<uint32_t> checksum_ranges(const std::vector<ByteRange>& ranges, bool mapped,
                                      unsigned threads, Progress* progress = nullptr);

struct ReadRange {
  uint64_t file_offset;
  uint64_t size;
  uint8_t* dst;
};

// Fills every range from `fd` with parallel, vectored preads. `progress` (may be null) counts
// the bytes read and can stop the reads (Cancelled; the ranges are then partly filled).
// IoError naming `path` on a failed or short read (the file shrank).
void read_ranges(int fd, const std::string& path, std::vector<ReadRange> ranges, unsigned threads,
                 Progress* progress = nullptr);

}  // namespace zerockpt
