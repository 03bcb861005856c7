#include "zerockpt/errors.h"

#include <cerrno>
#include <cstring>

namespace zerockpt {

IoError::IoError(int err, std::string path, const std::string& what)
    : Error(what + ": " + std::strerror(err) + " [" + path + "]"),
      err_(err),
      path_(std::move(path)),
      detail_(what + ": " + std::strerror(err)) {}

void throw_errno(const std::string& path, const std::string& what) {
  throw IoError(errno, path, what);
}

std::string quote(const std::string& s) {
  constexpr size_t kMaxShown = 200;
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < kMaxShown; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      static const char* kHex = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > kMaxShown) out += "...";
  out += "'";
  return out;
}

}  // namespace zerockpt
