// libFuzzer harness over the torch-free core: each input is a whole safetensors file, written
// to a memfd and opened through SafetensorsFile as /proc/self/fd/N, so the length prefix,
// header validation, mapping, reads and checksums run as they do for a real file. Only
// zerockpt::Error (FormatError, IoError, ...) may come out; any other exception, a sanitizer
// report, a violated invariant below, a leaked descriptor, a timeout or an oversized allocation
// is a finding (fuzz/README.md). libFuzzer calls it from one thread.
#include <sanitizer/allocator_interface.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/crc32c.h"
#include "core/file.h"
#include "core/header.h"
#include "core/io_engine.h"
#include "core/json.h"
#include "core/reader.h"
#include "zerockpt/errors.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace {

using zerockpt::Header;
using zerockpt::kAliasesKey;
using zerockpt::TensorRecord;

// The harness reads tensor data into its own buffer only below this size; inputs are far
// smaller (-max_len), and offsets are validated against the file size, so this never skips.
constexpr uint64_t kMaxReadBytes = 64ull << 20;

int g_memfd = -1;
std::string g_path;

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "\n==zerockpt fuzz== FINDING: %s\n", what.c_str());
  std::abort();
}

void require(bool ok, const char* what) {
  if (!ok) finding(std::string("invariant violated: ") + what);
}

// Peak heap use while one input runs, from the sanitizer's allocator statistics: a hostile file
// may not make the core allocate more than a small multiple of its size.
size_t g_peak_heap = 0;
constexpr size_t kHeapPerInputByte = 32;
constexpr size_t kHeapSlack = 1u << 20;  // the harness's own copies and fixed-size tables

void on_malloc(const volatile void*, size_t) {
  size_t now = __sanitizer_get_current_allocated_bytes();
  if (now > g_peak_heap) g_peak_heap = now;
}

void on_free(const volatile void*) {}

// The lowest descriptor number that open() would return next.
int first_free_fd() {
  int fd = ::dup(0);
  if (fd >= 0) ::close(fd);
  return fd;
}

void put_input(const uint8_t* data, size_t size) {
  if (::ftruncate(g_memfd, 0) != 0) finding("ftruncate of the memfd failed");
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pwrite(g_memfd, data + done, size - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) finding("pwrite to the memfd failed");
    done += static_cast<size_t>(n);
  }
}

// Checks that the validated header describes exactly this input: a parse_header that lets a
// bad file through shows up here rather than as a crash in a later layer.
void check_header(const Header& h, uint64_t file_size) {
  require(h.data_start >= 8 + 2 && h.data_start <= file_size, "data_start within the file");
  require(h.data_start + h.data_size == file_size, "data region ends at the end of the file");
  std::vector<const TensorRecord*> by_begin;
  for (const auto& t : h.tensors) {
    require(t.begin <= t.end && t.end <= h.data_size, "tensor offsets within the data region");
    require(t.shape.size() <= zerockpt::kMaxRank, "rank bounded");
    require(zerockpt::tensor_nbytes(t.dtype, t.shape, t.name, g_path) == t.nbytes(),
            "tensor byte size matches dtype and shape");
    by_begin.push_back(&t);
  }
  std::sort(by_begin.begin(), by_begin.end(), [](const TensorRecord* a, const TensorRecord* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t cursor = 0;
  for (const TensorRecord* t : by_begin) {
    require(t->begin == cursor, "tensors tile the data region without hole or overlap");
    cursor = t->end;
  }
  require(cursor == h.data_size, "tensors cover the whole data region");
}

// Every tensor's bytes through read_ranges, which must equal the input's data region.
std::vector<uint8_t> read_data(zerockpt::SafetensorsFile& file, const uint8_t* data) {
  const Header& h = file.header();
  std::vector<uint8_t> buf(h.data_size);
  std::vector<zerockpt::ReadRange> ranges;
  for (const auto& t : h.tensors) {
    ranges.push_back({h.data_start + t.begin, t.nbytes(), buf.data() + t.begin});
  }
  zerockpt::read_ranges(file.fd(), file.path(), ranges, 2);
  require(h.data_size == 0 || std::memcmp(buf.data(), data + h.data_start, h.data_size) == 0,
          "read_ranges returns the file's bytes");
  return buf;
}

// The CRC-32C of each tensor's bytes (indexed like header.tensors), hardware and portable.
std::vector<uint32_t> tensor_crcs(const Header& h, const std::vector<uint8_t>& buf) {
  std::vector<uint32_t> crcs;
  for (const auto& t : h.tensors) {
    const uint8_t* p = buf.data() + t.begin;
    crcs.push_back(zerockpt::crc32c(p, t.nbytes()));
    require(crcs.back() == zerockpt::crc32c_portable(p, t.nbytes()),
            "crc32c agrees with crc32c_portable");
  }
  return crcs;
}

// verify() through the mapping and over the bytes read agree, and compute the real CRCs.
// FormatError if the stored checksums are malformed.
void check_verify(zerockpt::SafetensorsFile& file, const std::vector<uint8_t>& buf,
                  const std::vector<uint32_t>& crcs) {
  const Header& h = file.header();
  zerockpt::VerifyResult mapped = file.verify(1);
  std::vector<zerockpt::ByteRange> bytes;
  for (const auto& t : h.tensors) bytes.push_back({buf.data() + t.begin, t.nbytes()});
  zerockpt::VerifyResult read = file.verify(bytes, false, 2);
  require(mapped.has_checksums == read.has_checksums && mapped.failed == read.failed &&
              mapped.stored == read.stored && mapped.computed == read.computed,
          "verify agrees on mapped and read bytes");
  if (!mapped.has_checksums) return;
  require(mapped.computed == crcs, "verify computes each tensor's CRC-32C");
  for (size_t i = 0; i < crcs.size(); ++i) {
    bool failed = std::find(mapped.failed.begin(), mapped.failed.end(), i) != mapped.failed.end();
    require(failed == (mapped.stored[i] != crcs[i]), "verify fails exactly the mismatches");
  }
  try {
    file.raise_on_failure(mapped);
    require(mapped.failed.empty(), "raise_on_failure raises on failures");
  } catch (const zerockpt::ChecksumError&) {
    require(!mapped.failed.empty(), "raise_on_failure raises only on failures");
  }
}

// The mapping shows the file; writes to it (private) never reach the file.
void check_mapping(zerockpt::SafetensorsFile& file, const uint8_t* data, size_t size) {
  const Header& h = file.header();
  auto mapping = file.mapping();
  require(mapping->size() == size, "mapping covers the file");
  require(std::memcmp(mapping->data(), data, size) == 0, "mapping shows the file's bytes");
  for (const auto& t : h.tensors) {
    if (t.nbytes() == 0) continue;
    uint8_t* p = mapping->data() + h.data_start + t.begin;
    p[0] ^= 0xFF;
    p[t.nbytes() - 1] ^= 0x5A;
  }
  if (h.data_size > 0) {
    uint8_t b = 0;
    zerockpt::pread_full(file.fd(), &b, 1, h.data_start, file.path());
    require(b == data[h.data_start], "writes to the private mapping stay out of the file");
  }
}

void check_aliases(const Header& h) {
  for (const auto& [key, value] : h.metadata) {
    if (key != kAliasesKey) continue;
    std::vector<zerockpt::Alias> aliases;
    try {
      aliases = zerockpt::decode_aliases(value, g_path);
    } catch (const zerockpt::FormatError&) {
      continue;  // a malformed table is rejected; that is the expected outcome
    }
    std::vector<zerockpt::Alias> back;
    try {
      back = zerockpt::decode_aliases(zerockpt::encode_aliases(aliases), g_path);
    } catch (const zerockpt::Error& e) {
      finding(std::string("encode_aliases output does not decode: ") + e.what());
    }
    require(back.size() == aliases.size(), "alias count survives encode + decode");
    for (size_t i = 0; i < back.size(); ++i) {
      require(back[i].name == aliases[i].name && back[i].target == aliases[i].target &&
                  back[i].position == aliases[i].position,
              "alias survives encode + decode");
    }
  }
}

// The writer's header for these tensors and metadata (our checksums in place of any stored)
// parses back to the same tensors, metadata and checksums.
void check_layout_roundtrip(const Header& h, const std::vector<uint32_t>& crcs) {
  std::vector<zerockpt::TensorSpec> specs;
  for (const auto& t : h.tensors) specs.push_back({t.name, t.dtype, t.shape, t.nbytes()});
  zerockpt::Metadata metadata;
  for (const auto& kv : h.metadata) {
    if (kv.first != zerockpt::kChecksumKey) metadata.push_back(kv);
  }
  zerockpt::Layout layout = zerockpt::plan_layout(specs, metadata, g_path, true);
  require(layout.prefix.size() % zerockpt::kDataAlignment == 0, "layout prefix is aligned");
  require(layout.checksum_offset + 8 * specs.size() < layout.prefix.size(),
          "checksum placeholder inside the prefix");
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (size_t i = 0; i < specs.size(); ++i) {
    ranges.emplace_back(layout.begin[i], layout.begin[i] + specs[i].nbytes);
  }
  std::vector<uint32_t> ordered;
  for (size_t i : zerockpt::checksum_order(ranges)) ordered.push_back(crcs[i]);
  std::string prefix = layout.prefix;
  zerockpt::encode_checksums(ordered, &prefix[layout.checksum_offset]);

  Header back;
  zerockpt::StoredChecksums stored;
  try {
    back = zerockpt::parse_header(prefix.data() + 8, prefix.size() - 8, layout.file_size(), g_path);
    stored = zerockpt::decode_checksums(back, g_path);
  } catch (const zerockpt::Error& e) {
    finding(std::string("plan_layout output does not parse back: ") + e.what());
  }
  require(stored.present && stored.crcs == crcs, "checksums survive the round trip");
  require(!back.metadata.empty() && back.metadata.back().first == zerockpt::kChecksumKey,
          "checksums are the last metadata entry");
  back.metadata.pop_back();
  require(back.metadata == metadata, "metadata survives plan_layout + parse_header");
  require(back.tensors.size() == h.tensors.size(), "tensor count survives the round trip");
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    const auto& a = h.tensors[i];
    const auto& b = back.tensors[i];
    require(a.name == b.name && a.dtype == b.dtype && a.shape == b.shape &&
                a.nbytes() == b.nbytes() && b.begin == layout.begin[i],
            "tensor survives plan_layout + parse_header");
  }
}

// Runs one stage; zerockpt::Error is the stage's way to reject the input, and the later stages
// still run.
template <typename Stage>
void stage(Stage&& run) {
  try {
    run();
  } catch (const zerockpt::Error&) {
  }
}

// The input read as the start of a longer stream (file objects, through the descriptor): the
// file ends where its header says, within the input, its tensors tile that region, and an exact
// open of the whole input (`exact`, if it succeeded) ends at the input's end.
void check_open_ended(size_t size, const Header* exact) {
  try {
    zerockpt::SafetensorsFile file(g_memfd, 0, "stream", /*exact_size=*/false);
    const Header& h = file.header();
    require(file.image_end() <= size, "an open-ended file ends within the input");
    check_header(h, file.image_end());
    if (exact) require(file.image_end() == size, "an exact file ends at the input's end");
  } catch (const zerockpt::Error&) {
    require(exact == nullptr, "what opens exactly opens open-ended");
  }
}

void run_one(const uint8_t* data, size_t size) {
  std::optional<zerockpt::SafetensorsFile> opened;
  try {
    opened.emplace(g_path);
  } catch (const zerockpt::Error&) {
    check_open_ended(size, nullptr);
    throw;
  }
  zerockpt::SafetensorsFile& file = *opened;
  require(file.file_size() == size, "file_size is the input size");
  const Header& h = file.header();
  check_header(h, size);
  check_open_ended(size, &h);
  stage([&] { check_aliases(h); });
  if (h.data_size > kMaxReadBytes) return;
  std::vector<uint8_t> buf = read_data(file, data);
  std::vector<uint32_t> crcs = tensor_crcs(h, buf);
  stage([&] { check_verify(file, buf, crcs); });
  check_mapping(file, data, size);
  check_layout_roundtrip(h, crcs);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  g_memfd = ::memfd_create("zerockpt-fuzz", MFD_CLOEXEC);
  if (g_memfd < 0) finding(std::string("memfd_create failed: ") + std::strerror(errno));
  g_path = "/proc/self/fd/" + std::to_string(g_memfd);
  __sanitizer_install_malloc_and_free_hooks(on_malloc, on_free);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  put_input(data, size);
  int free_fd = first_free_fd();
  size_t heap_before = __sanitizer_get_current_allocated_bytes();
  g_peak_heap = heap_before;
  try {
    run_one(data, size);
  } catch (const zerockpt::Error&) {
    // FormatError / IoError / UsageError / DtypeError: the documented way to reject a file.
  } catch (const std::exception& e) {
    finding(std::string("unexpected exception (not zerockpt::Error): ") + e.what());
  } catch (const zerockpt::JsonSyntaxError& e) {
    finding("JsonSyntaxError escaped the parser: " + e.message);
  } catch (...) {
    finding("unexpected exception of a non-std type");
  }
  if (first_free_fd() != free_fd) finding("a file descriptor leaked");
  size_t used = g_peak_heap - heap_before;
  if (used > kHeapPerInputByte * size + kHeapSlack) {
    finding("peak heap use of " + std::to_string(used) + " bytes for a " + std::to_string(size) +
            "-byte file");
  }
  return 0;
}

// Most mutations of a whole file change the JSON's length, and a stale length prefix then
// cuts the JSON short. So, usually, mutate only the JSON and rewrite the prefix to match,
// keeping the data region; otherwise mutate the raw bytes, prefix included.
extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  std::minstd_rand rng(seed);
  uint64_t n = 0;
  for (int i = 7; i >= 0 && size >= 8; --i) n = (n << 8) | data[i];
  if (size < 8 || n == 0 || n > size - 8 || rng() % 4 == 0) {
    return LLVMFuzzerMutate(data, size, max_size);
  }
  size_t tail = size - 8 - static_cast<size_t>(n);
  std::vector<uint8_t> saved(data + 8 + n, data + size);
  size_t json = LLVMFuzzerMutate(data + 8, static_cast<size_t>(n), max_size - 8 - tail);
  std::copy(saved.begin(), saved.end(), data + 8 + json);
  for (int i = 0; i < 8; ++i) data[i] = static_cast<uint8_t>(uint64_t{json} >> (8 * i));
  return 8 + json + tail;
}
