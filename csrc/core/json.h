// A strict RFC 8259 JSON cursor for the safetensors header, and string escaping for writing
// one. The reader allocates only what the caller keeps (strings, integers): unknown values are
// skipped without building a tree, and nesting is bounded, so hostile input cannot make memory
// or recursion grow beyond a small multiple of its size. Not thread-safe; one per parse.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace zerockpt {

// Thrown by JsonReader; the header parser turns it into a FormatError with file context.
struct JsonSyntaxError {
  std::string message;
  size_t offset;
};

class JsonReader {
 public:
  static constexpr int kMaxDepth = 64;

  JsonReader(const char* data, size_t size) : p_(data), begin_(data), end_(data + size) {}

  void skip_ws();
  // Consumes `c` (after whitespace) or throws.
  void expect(char c);
  // Consumes `c` if it comes next (after whitespace).
  bool consume(char c);
  // Next non-whitespace character, or '\0' at the end.
  char peek();
  std::string read_string();
  // A JSON integer >= 0 without fraction or exponent that fits in uint64_t.
  uint64_t read_uint64();
  // Skips any JSON value, nesting at most kMaxDepth - depth levels.
  void skip_value(int depth);
  bool at_end();
  size_t offset() const { return static_cast<size_t>(p_ - begin_); }
  [[noreturn]] void fail(const std::string& what) const;

 private:
  void skip_number();
  const char* p_;
  const char* begin_;
  const char* end_;
};

// Is [data, data + size) valid UTF-8 (no overlongs, surrogates or code points > U+10FFFF)?
// Returns the offset of the first bad byte, or size if valid.
size_t find_invalid_utf8(const char* data, size_t size);

// Appends `s` as a JSON string literal (quotes included).
void append_json_string(std::string& out, const std::string& s);

}  // namespace zerockpt
