#include "core/json.h"

#include <cstring>

namespace zerockpt {

void JsonReader::fail(const std::string& what) const { throw JsonSyntaxError{what, offset()}; }

void JsonReader::skip_ws() {
  while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
}

char JsonReader::peek() {
  skip_ws();
  return p_ < end_ ? *p_ : '\0';
}

bool JsonReader::at_end() {
  skip_ws();
  return p_ == end_;
}

void JsonReader::expect(char c) {
  skip_ws();
  if (p_ >= end_) fail(std::string("unexpected end of JSON, expected '") + c + "'");
  if (*p_ != c) fail(std::string("expected '") + c + "'");
  ++p_;
}

bool JsonReader::consume(char c) {
  skip_ws();
  if (p_ < end_ && *p_ == c) {
    ++p_;
    return true;
  }
  return false;
}

namespace {

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

}  // namespace

std::string JsonReader::read_string() {
  expect('"');
  std::string out;
  while (true) {
    if (p_ >= end_) fail("unterminated string");
    char c = *p_++;
    if (c == '"') return out;
    if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
    if (c != '\\') {
      out += c;
      continue;
    }
    if (p_ >= end_) fail("unterminated escape");
    char e = *p_++;
    switch (e) {
      case '"':
        out += '"';
        break;
      case '\\':
        out += '\\';
        break;
      case '/':
        out += '/';
        break;
      case 'b':
        out += '\b';
        break;
      case 'f':
        out += '\f';
        break;
      case 'n':
        out += '\n';
        break;
      case 'r':
        out += '\r';
        break;
      case 't':
        out += '\t';
        break;
      case 'u': {
        auto read_hex4 = [this]() -> uint32_t {
          if (end_ - p_ < 4) fail("truncated \\u escape");
          uint32_t v = 0;
          for (int i = 0; i < 4; ++i) {
            int h = hex_value(p_[i]);
            if (h < 0) fail("invalid \\u escape");
            v = (v << 4) | static_cast<uint32_t>(h);
          }
          p_ += 4;
          return v;
        };
        uint32_t cp = read_hex4();
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') fail("unpaired surrogate escape");
          p_ += 2;
          uint32_t lo = read_hex4();
          if (lo < 0xDC00 || lo > 0xDFFF) fail("unpaired surrogate escape");
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
          fail("unpaired surrogate escape");
        }
        append_utf8(out, cp);
        break;
      }
      default:
        fail("invalid escape in string");
    }
  }
}

uint64_t JsonReader::read_uint64() {
  skip_ws();
  const char* start = p_;
  if (p_ < end_ && *p_ == '-') fail("expected a non-negative integer, got a negative number");
  if (p_ >= end_ || *p_ < '0' || *p_ > '9') fail("expected a non-negative integer");
  if (*p_ == '0' && p_ + 1 < end_ && p_[1] >= '0' && p_[1] <= '9') fail("leading zero in number");
  uint64_t v = 0;
  while (p_ < end_ && *p_ >= '0' && *p_ <= '9') {
    uint64_t digit = static_cast<uint64_t>(*p_ - '0');
    if (v > (UINT64_MAX - digit) / 10) {
      p_ = start;
      fail("integer does not fit in 64 bits");
    }
    v = v * 10 + digit;
    ++p_;
  }
  if (p_ < end_ && (*p_ == '.' || *p_ == 'e' || *p_ == 'E')) {
    p_ = start;
    fail("expected an integer, got a fraction or exponent");
  }
  return v;
}

void JsonReader::skip_number() {
  if (p_ < end_ && *p_ == '-') ++p_;
  if (p_ >= end_ || *p_ < '0' || *p_ > '9') fail("invalid number");
  if (*p_ == '0') {
    ++p_;
  } else {
    while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
  }
  if (p_ < end_ && *p_ == '.') {
    ++p_;
    if (p_ >= end_ || *p_ < '0' || *p_ > '9') fail("invalid number");
    while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
  }
  if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
    ++p_;
    if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
    if (p_ >= end_ || *p_ < '0' || *p_ > '9') fail("invalid number");
    while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
  }
}

void JsonReader::skip_value(int depth) {
  if (depth >= kMaxDepth) fail("JSON nested too deeply");
  char c = peek();
  switch (c) {
    case '{':
      ++p_;
      if (consume('}')) return;
      do {
        read_string();
        expect(':');
        skip_value(depth + 1);
      } while (consume(','));
      expect('}');
      return;
    case '[':
      ++p_;
      if (consume(']')) return;
      do {
        skip_value(depth + 1);
      } while (consume(','));
      expect(']');
      return;
    case '"':
      read_string();
      return;
    case 't':
    case 'f':
    case 'n': {
      const char* word = c == 't' ? "true" : c == 'f' ? "false" : "null";
      size_t len = std::strlen(word);
      if (static_cast<size_t>(end_ - p_) < len || std::memcmp(p_, word, len) != 0) {
        fail("invalid literal");
      }
      p_ += len;
      return;
    }
    case '\0':
      fail("unexpected end of JSON");
    default:
      skip_number();
  }
}

size_t find_invalid_utf8(const char* data, size_t size) {
  const auto* s = reinterpret_cast<const unsigned char*>(data);
  size_t i = 0;
  while (i < size) {
    unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t n;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      n = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return i;
    }
    if (size - i <= n) return i;
    for (size_t k = 1; k <= n; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += n + 1;
  }
  return size;
}

void append_json_string(std::string& out, const std::string& s) {
  static const char* kHex = "0123456789abcdef";
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

}  // namespace zerockpt
