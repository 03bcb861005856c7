#include "core/header.h"

#include <algorithm>
#include <numeric>

#include "core/hash.h"
#include "core/json.h"
#include "zerockpt/errors.h"

namespace zerockpt {
namespace {

[[noreturn]] void format_error(const std::string& path, const std::string& what) {
  throw FormatError(path + ": " + what);
}

std::string header_context(const JsonSyntaxError& e) {
  return "invalid header JSON at byte " + std::to_string(8 + e.offset) + ": " + e.message;
}

void parse_metadata(JsonReader& r, Metadata& out, const std::string& path) {
  if (r.peek() == 'n') {  // null: no metadata (safetensors writes an Option)
    r.skip_value(1);
    return;
  }
  if (r.peek() != '{') r.fail("__metadata__ must be an object of strings");
  r.expect('{');
  if (r.consume('}')) return;
  SeededSet<std::string> seen;
  do {
    std::string key = r.read_string();
    r.expect(':');
    if (r.peek() != '"') {
      format_error(path, "__metadata__ value for " + quote(key) + " is not a string");
    }
    std::string value = r.read_string();
    if (!seen.insert(key).second) {
      format_error(path, "duplicate __metadata__ key " + quote(key));
    }
    out.emplace_back(std::move(key), std::move(value));
  } while (r.consume(','));
  r.expect('}');
}

void parse_tensor(JsonReader& r, TensorRecord& t, const std::string& path) {
  // Built only for an error message: headers can hold tens of thousands of tensors.
  auto where = [&t] { return "tensor " + quote(t.name); };
  if (r.peek() != '{') format_error(path, where() + ": entry is not a JSON object");
  r.expect('{');
  bool has_dtype = false, has_shape = false, has_offsets = false;
  if (!r.consume('}')) {
    do {
      std::string field = r.read_string();
      r.expect(':');
      if (field == "dtype") {
        if (has_dtype) format_error(path, where() + ": duplicate field 'dtype'");
        if (r.peek() != '"') format_error(path, where() + ": dtype is not a string");
        std::string name = r.read_string();
        auto dtype = parse_dtype(name);
        if (!dtype) format_error(path, where() + ": unknown dtype " + quote(name));
        t.dtype = *dtype;
        has_dtype = true;
      } else if (field == "shape") {
        if (has_shape) format_error(path, where() + ": duplicate field 'shape'");
        if (r.peek() != '[') format_error(path, where() + ": shape is not a list of integers");
        r.expect('[');
        if (!r.consume(']')) {
          do {
            if (t.shape.size() >= kMaxRank) {
              format_error(path, where() + ": shape has more than " + std::to_string(kMaxRank) +
                                     " dimensions");
            }
            t.shape.push_back(r.read_uint64());
          } while (r.consume(','));
          r.expect(']');
        }
        has_shape = true;
      } else if (field == "data_offsets") {
        if (has_offsets) format_error(path, where() + ": duplicate field 'data_offsets'");
        if (r.peek() != '[') format_error(path, where() + ": data_offsets is not a list");
        r.expect('[');
        if (r.peek() == ']') format_error(path, where() + ": data_offsets must have 2 entries");
        t.begin = r.read_uint64();
        if (!r.consume(',')) format_error(path, where() + ": data_offsets must have 2 entries");
        t.end = r.read_uint64();
        if (r.peek() != ']') format_error(path, where() + ": data_offsets must have 2 entries");
        r.expect(']');
        has_offsets = true;
      } else {
        r.skip_value(2);  // other writers may add fields; safetensors ignores them too
      }
    } while (r.consume(','));
    r.expect('}');
  }
  if (!has_dtype) format_error(path, where() + ": missing 'dtype'");
  if (!has_shape) format_error(path, where() + ": missing 'shape'");
  if (!has_offsets) format_error(path, where() + ": missing 'data_offsets'");
}

void validate_offsets(Header& h, const std::string& path) {
  for (const auto& t : h.tensors) {
    auto where = [&t] { return "tensor " + quote(t.name); };
    if (t.end < t.begin) {
      format_error(path, where() + ": data_offsets [" + std::to_string(t.begin) + ", " +
                             std::to_string(t.end) + "] end before begin");
    }
    if (t.end > h.data_size) {
      format_error(path, where() + ": data_offsets [" + std::to_string(t.begin) + ", " +
                             std::to_string(t.end) + "] run past the end of the data (" +
                             std::to_string(h.data_size) + " bytes; file truncated?)");
    }
    uint64_t expected = tensor_nbytes(t.dtype, t.shape, t.name, path);
    if (expected != t.nbytes()) {
      format_error(path, where() + ": dtype " + dtype_name(t.dtype) + " and shape need " +
                             std::to_string(expected) + " bytes but data_offsets [" +
                             std::to_string(t.begin) + ", " + std::to_string(t.end) + "] hold " +
                             std::to_string(t.nbytes()));
    }
  }
  std::vector<size_t> order(h.tensors.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const auto& x = h.tensors[a];
    const auto& y = h.tensors[b];
    return x.begin != y.begin ? x.begin < y.begin : x.end < y.end;
  });
  uint64_t cursor = 0;
  const TensorRecord* previous = nullptr;
  for (size_t i : order) {
    const auto& t = h.tensors[i];
    if (t.begin > cursor) {
      format_error(path, "hole in the data region: bytes [" + std::to_string(cursor) + ", " +
                             std::to_string(t.begin) + ") before tensor " + quote(t.name) +
                             " belong to no tensor");
    }
    if (t.begin < cursor) {
      format_error(path, "tensor " + quote(t.name) + " at data offset " + std::to_string(t.begin) +
                             " overlaps tensor " + quote(previous->name) + " (ends at " +
                             std::to_string(cursor) + ")");
    }
    cursor = t.end;
    previous = &t;
  }
  if (cursor != h.data_size) {
    format_error(path, "hole in the data region: bytes [" + std::to_string(cursor) + ", " +
                           std::to_string(h.data_size) + ") at the end belong to no tensor");
  }
}

}  // namespace

uint64_t checked_header_size(const uint8_t prefix[8], uint64_t file_size, const std::string& path) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | prefix[i];
  if (n > kMaxHeaderSize) {
    format_error(path, "header length " + std::to_string(n) + " exceeds the " +
                           std::to_string(kMaxHeaderSize) +
                           "-byte limit (not a safetensors "
                           "file, or corrupt)");
  }
  if (n < 2) format_error(path, "header length " + std::to_string(n) + " is too small");
  if (n > file_size - 8) {
    format_error(path, "header length " + std::to_string(n) + " runs past the end of the " +
                           std::to_string(file_size) + "-byte file (truncated?)");
  }
  return n;
}

uint64_t tensor_nbytes(Dtype dtype, const std::vector<uint64_t>& shape, const std::string& name,
                       const std::string& path) {
  uint64_t bits = dtype_bits(dtype);
  for (uint64_t d : shape) {
    if (d != 0 && bits > UINT64_MAX / d) {
      format_error(path, "tensor " + quote(name) + ": shape is too large (byte size overflows)");
    }
    bits *= d;
  }
  if (bits % 8 != 0) {
    format_error(path, "tensor " + quote(name) + ": " + dtype_name(dtype) +
                           " tensor of this shape is not a whole number of bytes");
  }
  return bits / 8;
}

Header parse_header(const char* json, uint64_t json_size, uint64_t file_size,
                    const std::string& path, bool exact_size) {
  Header h;
  h.data_start = 8 + json_size;
  h.data_size = file_size - h.data_start;
  size_t bad = find_invalid_utf8(json, json_size);
  if (bad != json_size) {
    format_error(path, "header is not valid UTF-8 (byte " + std::to_string(8 + bad) + ")");
  }
  try {
    JsonReader r(json, json_size);
    if (r.peek() != '{') r.fail("header must be a JSON object");
    r.expect('{');
    SeededSet<std::string> names;
    bool seen_metadata = false;
    if (!r.consume('}')) {
      do {
        std::string key = r.read_string();
        r.expect(':');
        if (key == "__metadata__") {
          if (seen_metadata) format_error(path, "duplicate key '__metadata__'");
          seen_metadata = true;
          parse_metadata(r, h.metadata, path);
          continue;
        }
        if (!names.insert(key).second) format_error(path, "duplicate tensor " + quote(key));
        h.tensors.emplace_back();
        h.tensors.back().name = std::move(key);
        parse_tensor(r, h.tensors.back(), path);
      } while (r.consume(','));
      r.expect('}');
    }
    if (!r.at_end()) r.fail("unexpected data after the header object");
  } catch (const JsonSyntaxError& e) {
    format_error(path, header_context(e));
  }
  if (!exact_size) {
    uint64_t extent = 0;
    for (const auto& t : h.tensors) extent = std::max(extent, t.end);
    if (extent <= h.data_size) h.data_size = extent;  // else validate_offsets names the tensor
  }
  validate_offsets(h, path);
  return h;
}

const char* const kReservedPrefix = "zerockpt.";
const char* const kVersionKey = "zerockpt.version";
const char* const kAliasesKey = "zerockpt.aliases";
const char* const kStateDictMetadataKey = "zerockpt.state_dict_metadata";
const char* const kChecksumKey = "zerockpt.crc32c";

Layout plan_layout(const std::vector<TensorSpec>& specs, const Metadata& metadata,
                   const std::string& path, bool checksums) {
  Layout layout;
  std::vector<size_t> order(specs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return dtype_bits(specs[a].dtype) > dtype_bits(specs[b].dtype);
  });
  layout.begin.resize(specs.size());
  uint64_t cursor = 0;
  for (size_t i : order) {
    layout.begin[i] = cursor;
    cursor += specs[i].nbytes;
  }
  layout.data_size = cursor;

  std::string json = "{";
  uint64_t checksum_offset = Layout::kNoChecksums;
  if (!metadata.empty() || checksums) {
    json += "\"__metadata__\":{";
    for (size_t i = 0; i < metadata.size(); ++i) {
      if (i) json += ',';
      append_json_string(json, metadata[i].first);
      json += ':';
      append_json_string(json, metadata[i].second);
    }
    if (checksums) {
      if (!metadata.empty()) json += ',';
      append_json_string(json, kChecksumKey);
      json += ":\"";
      checksum_offset = 8 + json.size();
      json.append(8 * specs.size(), '0');
      json += '"';
    }
    json += '}';
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    const auto& s = specs[i];
    if (json.size() > 1) json += ',';
    append_json_string(json, s.name);
    json += ":{\"dtype\":\"";
    json += dtype_name(s.dtype);
    json += "\",\"shape\":[";
    for (size_t d = 0; d < s.shape.size(); ++d) {
      if (d) json += ',';
      json += std::to_string(s.shape[d]);
    }
    json += "],\"data_offsets\":[";
    json += std::to_string(layout.begin[i]);
    json += ',';
    json += std::to_string(layout.begin[i] + s.nbytes);
    json += "]}";
  }
  json += '}';
  uint64_t padded = round_up(8 + json.size(), kDataAlignment);
  uint64_t n = padded - 8;
  if (n > kMaxHeaderSize) {
    throw UsageError(path + ": the header for " + std::to_string(specs.size()) +
                     " tensors would take " + std::to_string(n) + " bytes, over the " +
                     std::to_string(kMaxHeaderSize) + "-byte limit of the format");
  }
  layout.prefix.reserve(padded);
  for (int i = 0; i < 8; ++i) layout.prefix += static_cast<char>((n >> (8 * i)) & 0xFF);
  layout.prefix += json;
  layout.prefix.append(padded - layout.prefix.size(), ' ');
  layout.checksum_offset = checksum_offset;
  return layout;
}

std::vector<size_t> checksum_order(const std::vector<std::pair<uint64_t, uint64_t>>& ranges) {
  std::vector<size_t> order(ranges.size());
  std::iota(order.begin(), order.end(), 0);
  // Ranges do not overlap, so only empty tensors can tie, and their checksums are all equal.
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return ranges[a] < ranges[b]; });
  return order;
}

void encode_checksums(const std::vector<uint32_t>& crcs, char* dst) {
  static const char kHex[] = "0123456789abcdef";
  for (uint32_t crc : crcs) {
    for (int shift = 28; shift >= 0; shift -= 4) *dst++ = kHex[(crc >> shift) & 0xF];
  }
}

StoredChecksums decode_checksums(const Header& header, const std::string& path) {
  StoredChecksums out;
  const std::string* value = nullptr;
  for (const auto& [key, v] : header.metadata) {
    if (key == kChecksumKey) value = &v;
  }
  if (!value) return out;
  size_t n = header.tensors.size();
  if (value->size() != 8 * n) {
    format_error(path, std::string("metadata ") + quote(kChecksumKey) + " has " +
                           std::to_string(value->size()) + " characters; " + std::to_string(n) +
                           " tensors need " + std::to_string(8 * n));
  }
  std::vector<std::pair<uint64_t, uint64_t>> ranges(n);
  for (size_t i = 0; i < n; ++i) ranges[i] = {header.tensors[i].begin, header.tensors[i].end};
  std::vector<size_t> order = checksum_order(ranges);
  out.present = true;
  out.crcs.resize(n);
  for (size_t k = 0; k < n; ++k) {
    uint32_t crc = 0;
    for (size_t d = 0; d < 8; ++d) {
      char c = (*value)[8 * k + d];
      int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
      if (digit < 0) {
        format_error(path, std::string("metadata ") + quote(kChecksumKey) +
                               " is not lowercase hex digits (at character " +
                               std::to_string(8 * k + d) + ")");
      }
      crc = crc << 4 | static_cast<uint32_t>(digit);
    }
    out.crcs[order[k]] = crc;
  }
  return out;
}

std::string encode_aliases(const std::vector<Alias>& aliases) {
  std::string out = "[";
  for (size_t i = 0; i < aliases.size(); ++i) {
    if (i) out += ',';
    out += '[';
    append_json_string(out, aliases[i].name);
    out += ',';
    append_json_string(out, aliases[i].target);
    out += ',';
    out += std::to_string(aliases[i].position);
    out += ']';
  }
  out += ']';
  return out;
}

std::vector<Alias> decode_aliases(const std::string& json, const std::string& path) {
  std::vector<Alias> out;
  try {
    JsonReader r(json.data(), json.size());
    if (r.peek() != '[') r.fail("expected a list");
    r.expect('[');
    if (!r.consume(']')) {
      do {
        if (r.peek() != '[') r.fail("expected [name, target, position]");
        r.expect('[');
        Alias a;
        if (r.peek() != '"') r.fail("expected a name");
        a.name = r.read_string();
        r.expect(',');
        if (r.peek() != '"') r.fail("expected a target name");
        a.target = r.read_string();
        r.expect(',');
        a.position = r.read_uint64();
        r.expect(']');
        out.push_back(std::move(a));
      } while (r.consume(','));
      r.expect(']');
    }
    if (!r.at_end()) r.fail("unexpected data after the list");
  } catch (const JsonSyntaxError& e) {
    format_error(path, "invalid alias table in __metadata__ at character " +
                           std::to_string(e.offset) + ": " + e.message);
  }
  return out;
}

}  // namespace zerockpt
