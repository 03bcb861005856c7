// The safetensors header: an 8-byte little-endian length N, N bytes of JSON, then the data
// region. parse_header() validates everything a reader relies on (types, dtypes, shapes,
// offsets: in range, no overlap, no hole, sizes agree) before any tensor is touched.
// Value types; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/align.h"
#include "core/dtype.h"

namespace zerockpt {

// safetensors' own limit on the JSON header.
constexpr uint64_t kMaxHeaderSize = 100'000'000;
// Where our writer starts the data region (the header is padded with spaces up to it): a page,
// so that direct I/O and mapped views of the data line up.
constexpr uint64_t kDataAlignment = kPageBytes;
// More dimensions than any real tensor has; bounds what a hostile shape can allocate.
constexpr size_t kMaxRank = 1024;

struct TensorRecord {
  std::string name;
  Dtype dtype;
  std::vector<uint64_t> shape;
  uint64_t begin = 0;  // relative to the data region
  uint64_t end = 0;
  uint64_t nbytes() const { return end - begin; }
};

using Metadata = std::vector<std::pair<std::string, std::string>>;

struct Header {
  std::vector<TensorRecord> tensors;  // in header (JSON) order
  Metadata metadata;                  // `__metadata__`, in header order
  uint64_t data_start = 0;            // file offset of the data region: 8 + N
  uint64_t data_size = 0;             // file_size - data_start
};

// Reads the 8-byte length prefix; throws FormatError if it cannot describe a header in a file
// of `file_size` bytes.
uint64_t checked_header_size(const uint8_t prefix[8], uint64_t file_size, const std::string& path);

// Parses and validates the JSON of `json_size` bytes for a file of `file_size` bytes; throws
// FormatError naming `path` (and the tensor and byte offset at fault) on any violation. With
// `exact_size` false the data region ends where its last tensor does (data_size), and bytes
// after it up to `file_size` are not the file's: a stream holding more than one file.
Header parse_header(const char* json, uint64_t json_size, uint64_t file_size,
                    const std::string& path, bool exact_size = true);

// Byte size of a tensor of `shape` and `dtype`; throws FormatError naming `name` on overflow
// or on a sub-byte dtype whose size is not a whole number of bytes.
uint64_t tensor_nbytes(Dtype dtype, const std::vector<uint64_t>& shape, const std::string& name,
                       const std::string& path);

// What the writer knows about a tensor before placing it.
struct TensorSpec {
  std::string name;
  Dtype dtype;
  std::vector<uint64_t> shape;
  uint64_t nbytes = 0;
};

struct Layout {
  static constexpr uint64_t kNoChecksums = UINT64_MAX;
  std::string prefix;           // length + JSON + space padding; size % kDataAlignment == 0
  std::vector<uint64_t> begin;  // per spec, relative to the data region
  uint64_t data_size = 0;
  // Where in `prefix` the kChecksumKey value (placeholder digits) starts, or kNoChecksums.
  uint64_t checksum_offset = kNoChecksums;
  uint64_t file_size() const { return prefix.size() + data_size; }
};

// Places tensors without holes, largest element size first (each aligned to its element size,
// since the data region starts at a kDataAlignment boundary), keeping the given order among
// equals; the JSON lists tensors in the given order. With `checksums`, the metadata ends with
// kChecksumKey holding placeholder digits for the writer to fill in. Throws UsageError (the
// caller's state is too large for the format) if the header would exceed kMaxHeaderSize.
Layout plan_layout(const std::vector<TensorSpec>& specs, const Metadata& metadata,
                   const std::string& path, bool checksums = false);

// Metadata keys zerockpt owns (docs/format.md); users may not set keys with this prefix.
extern const char* const kReservedPrefix;
// The zerockpt format version that wrote the file.
extern const char* const kVersionKey;
// Names saved as another stored tensor (tied weights): encode_aliases() JSON.
extern const char* const kAliasesKey;
// JSON object: the `_metadata` of a saved state dict (module prefix -> {"version": N, ...}).
extern const char* const kStateDictMetadataKey;

// Per-tensor CRC-32C values (docs/format.md): 8 lowercase hex digits per tensor entry of the
// header, concatenated in the order of the entries' data_offsets (begin, then end).
extern const char* const kChecksumKey;
// Indices of `ranges` ([begin, end) per tensor) in checksum order.
std::vector<size_t> checksum_order(const std::vector<std::pair<uint64_t, uint64_t>>& ranges);
// Writes the digits for `crcs` (in checksum order) into dst[0, 8 * crcs.size()).
void encode_checksums(const std::vector<uint32_t>& crcs, char* dst);
// The stored CRC-32C of each header tensor (indexed like header.tensors); empty with
// `present` false if the file has none. FormatError naming `path` if the value is malformed.
struct StoredChecksums {
  bool present = false;
  std::vector<uint32_t> crcs;
};
StoredChecksums decode_checksums(const Header& header, const std::string& path);

// A name saved as another stored tensor (tied weights), at `position` in the saved key order.
struct Alias {
  std::string name;
  std::string target;
  uint64_t position;
};

// The JSON kept in metadata for aliases: [["name", "target", position], ...].
std::string encode_aliases(const std::vector<Alias>& aliases);
// Parses encode_aliases() output; FormatError naming `path` on anything else.
std::vector<Alias> decode_aliases(const std::string& json, const std::string& path);

}  // namespace zerockpt
