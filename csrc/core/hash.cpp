#include "core/hash.h"

#include <cstdint>
#include <cstring>
#include <random>

namespace zerockpt {
namespace {

struct SipKey {
  uint64_t k0, k1;
};

const SipKey& sip_key() {
  static const SipKey key = [] {
    std::random_device rd;
    auto draw = [&rd] { return static_cast<uint64_t>(rd()) << 32 | rd(); };
    return SipKey{draw(), draw()};
  }();
  return key;
}

inline uint64_t rotl(uint64_t x, int b) { return (x << b) | (x >> (64 - b)); }

inline void sip_round(uint64_t& v0, uint64_t& v1, uint64_t& v2, uint64_t& v3) {
  v0 += v1;
  v1 = rotl(v1, 13);
  v1 ^= v0;
  v0 = rotl(v0, 32);
  v2 += v3;
  v3 = rotl(v3, 16);
  v3 ^= v2;
  v0 += v3;
  v3 = rotl(v3, 21);
  v3 ^= v0;
  v2 += v1;
  v1 = rotl(v1, 17);
  v1 ^= v2;
  v2 = rotl(v2, 32);
}

// SipHash-1-3 (one compression round, three finalisation rounds: what CPython and Rust use for
// their hash tables), on little-endian words.
uint64_t siphash13(const SipKey& key, const unsigned char* p, size_t n) {
  uint64_t v0 = 0x736f6d6570736575ULL ^ key.k0;
  uint64_t v1 = 0x646f72616e646f6dULL ^ key.k1;
  uint64_t v2 = 0x6c7967656e657261ULL ^ key.k0;
  uint64_t v3 = 0x7465646279746573ULL ^ key.k1;
  const unsigned char* end = p + (n & ~size_t{7});
  for (; p != end; p += 8) {
    uint64_t m;
    std::memcpy(&m, p, 8);
    v3 ^= m;
    sip_round(v0, v1, v2, v3);
    v0 ^= m;
  }
  uint64_t last = static_cast<uint64_t>(n) << 56;
  for (size_t i = 0; i < (n & 7); ++i) last |= static_cast<uint64_t>(p[i]) << (8 * i);
  v3 ^= last;
  sip_round(v0, v1, v2, v3);
  v0 ^= last;
  v2 ^= 0xff;
  for (int i = 0; i < 3; ++i) sip_round(v0, v1, v2, v3);
  return v0 ^ v1 ^ v2 ^ v3;
}

}  // namespace

size_t SeededHash::operator()(std::string_view s) const noexcept {
  return static_cast<size_t>(
      siphash13(sip_key(), reinterpret_cast<const unsigned char*>(s.data()), s.size()));
}

}  // namespace zerockpt
