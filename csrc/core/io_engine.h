// The parallel I/O engine: writes a planned safetensors file atomically from tensor memory,
// and reads byte ranges of a file into memory. Torch-free: tensors are described by a pointer
// to contiguous bytes or by a fill callback. Runs without the GIL; thread-safe per call.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/header.h"

namespace zerockpt {

// Where the bytes of one tensor come from.
struct WriteSource {
  // The tensor's bytes in row-major order, or null when `fill` produces them.
  const uint8_t* data = nullptr;
  // Copies bytes [offset, offset + size) of the row-major form into dst. Called from several
  // threads at once for different tensors or ranges.
  std::function<void(uint64_t offset, uint64_t size, uint8_t* dst)> fill;
};

enum class DirectIo { kAuto, kOn, kOff };

// nullopt -> kAuto, true -> kOn, false -> kOff (the public APIs' optional<bool>).
inline DirectIo to_direct_io(std::optional<bool> direct_io) {
  return !direct_io ? DirectIo::kAuto : *direct_io ? DirectIo::kOn : DirectIo::kOff;
}

struct WriteOptions {
  // fsync the file, then its directory, before returning.
  bool durable = true;
  // Store the CRC-32C of every tensor, computed from the bytes as they are written.
  bool checksums = true;
  // kAuto: O_DIRECT (through reused page-aligned staging) when durable and the file is at least
  // kDirectMinBytes; buffered pwrite straight from tensor memory otherwise.
  DirectIo direct_io = DirectIo::kAuto;
  unsigned threads = 0;  // 0: default_threads()
};

constexpr uint64_t kDirectMinBytes = 64ull << 20;
// Bytes one thread stages or writes per task; bounds staging memory to threads * kChunkBytes.
constexpr uint64_t kChunkBytes = 8ull << 20;

// Writes prefix + tensor bytes to `path` through an AtomicFile. `sources[i]` matches
// `specs[i]`, placed at `layout.begin[i]`. If the layout has a checksum placeholder, the
// checksums of the bytes written are filled in (options.checksums is for plan_layout's caller).
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
std::vector<uint32_t> checksum_ranges(const std::vector<ByteRange>& ranges, bool mapped,
                                      unsigned threads);

struct ReadRange {
  uint64_t file_offset;
  uint64_t size;
  uint8_t* dst;
};

// Fills every range from `fd` with parallel, vectored preads.
void read_ranges(int fd, const std::string& path, std::vector<ReadRange> ranges, unsigned threads);

}  // namespace zerockpt
