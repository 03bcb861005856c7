#include "core/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#elif defined(__aarch64__)
#include <arm_acle.h>
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace zerockpt {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected

// Polynomials mod P are 32-bit values in reflected order: bit 31 is x^0, bit 30 is x^1, ...

// a * b mod P.
uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t m = 1u << 31; m != 0; m >>= 1) {
    if (a & m) product ^= b;
    b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return product;
}

// x^(8 * n) mod P: multiplying a CRC register by it runs the register over n zero bytes.
uint32_t x8nmodp(uint64_t n) {
  // x^(2^k) mod P for every k a 64-bit byte count needs: bit b of n stands for x^(2^(b+3)).
  static const std::array<uint32_t, 67> x2k = [] {
    std::array<uint32_t, 67> t{};
    t[0] = 1u << 30;  // x^1
    for (size_t k = 1; k < t.size(); ++k) t[k] = multmodp(t[k - 1], t[k - 1]);
    return t;
  }();
  uint32_t result = 1u << 31;  // x^0
  for (size_t k = 3; n != 0; n >>= 1, ++k) {
    if (n & 1) result = multmodp(x2k[k], result);
  }
  return result;
}

// Slicing-by-8 tables: kTables[k][b] is the register after byte b followed by k zero bytes.
using Tables = std::array<std::array<uint32_t, 256>, 8>;
const Tables& tables() {
  static const Tables t = [] {
    Tables out{};
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t r = b;
      for (int i = 0; i < 8; ++i) r = (r & 1) ? (r >> 1) ^ kPoly : r >> 1;
      out[0][b] = r;
    }
    for (size_t k = 1; k < 8; ++k) {
      for (uint32_t b = 0; b < 256; ++b)
        out[k][b] = (out[k - 1][b] >> 8) ^ out[0][out[k - 1][b] & 0xFF];
    }
    return out;
  }();
  return t;
}

uint64_t load_le64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // little-endian hosts only (x86-64, aarch64 Linux)
}

// Runs the raw (not inverted) register over the bytes.
uint32_t portable_extend(uint32_t r, const uint8_t* p, size_t n) {
  const Tables& t = tables();
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t v = load_le64(p) ^ r;
    r = t[7][v & 0xFF] ^ t[6][(v >> 8) & 0xFF] ^ t[5][(v >> 16) & 0xFF] ^ t[4][(v >> 24) & 0xFF] ^
        t[3][(v >> 32) & 0xFF] ^ t[2][(v >> 40) & 0xFF] ^ t[1][(v >> 48) & 0xFF] ^ t[0][v >> 56];
  }
  for (; n > 0; ++p, --n) r = (r >> 8) ^ t[0][(r ^ *p) & 0xFF];
  return r;
}

#if defined(__x86_64__) || defined(__aarch64__)
#define ZEROCKPT_HW_CRC 1

// Multiplies a register by x^(8 * L) for one fixed L: four byte-indexed tables.
class Shift {
 public:
  explicit Shift(uint64_t bytes) {
    uint32_t xn = x8nmodp(bytes);
    for (int k = 0; k < 4; ++k) {
      for (uint32_t b = 0; b < 256; ++b) table_[k][b] = multmodp(xn, b << (8 * k));
    }
  }
  uint32_t operator()(uint32_t r) const {
    return table_[0][r & 0xFF] ^ table_[1][(r >> 8) & 0xFF] ^ table_[2][(r >> 16) & 0xFF] ^
           table_[3][r >> 24];
  }

 private:
  uint32_t table_[4][256];
};

// Functions marked ZEROCKPT_CRC_TARGET may use the CRC instruction; they only run once
// pick_backend() has seen the CPU support it.
#if defined(__x86_64__)
#define ZEROCKPT_CRC_TARGET __attribute__((target("sse4.2")))
ZEROCKPT_CRC_TARGET inline uint32_t step64(uint32_t r, uint64_t v) {
  return static_cast<uint32_t>(_mm_crc32_u64(r, v));
}
ZEROCKPT_CRC_TARGET inline uint32_t step8(uint32_t r, uint8_t v) { return _mm_crc32_u8(r, v); }
#else
#if defined(__clang__)
#define ZEROCKPT_CRC_TARGET __attribute__((target("crc")))
#else
#define ZEROCKPT_CRC_TARGET __attribute__((target("+crc")))
#endif
ZEROCKPT_CRC_TARGET inline uint32_t step64(uint32_t r, uint64_t v) { return __crc32cd(r, v); }
ZEROCKPT_CRC_TARGET inline uint32_t step8(uint32_t r, uint8_t v) { return __crc32cb(r, v); }
#endif

// The CRC instruction has a latency of three cycles and a throughput of one, so three
// independent streams over adjacent blocks run about three times faster than one; their
// registers are then merged with shifts: crc(A B C) = crc(A) x^16L ^ crc(B) x^8L ^ crc(C).
ZEROCKPT_CRC_TARGET uint32_t three_way(uint32_t r, const uint8_t*& p, size_t& n, size_t block,
                                       const Shift& shift) {
  for (; n >= 3 * block; p += 3 * block, n -= 3 * block) {
    uint32_t a = r, b = 0, c = 0;
    for (size_t i = 0; i < block; i += 8) {
      a = step64(a, load_le64(p + i));
      b = step64(b, load_le64(p + block + i));
      c = step64(c, load_le64(p + 2 * block + i));
    }
    r = shift(shift(a) ^ b) ^ c;
  }
  return r;
}

ZEROCKPT_CRC_TARGET uint32_t hw_extend(uint32_t r, const uint8_t* p, size_t n) {
  constexpr size_t kLongBlock = 8192, kShortBlock = 256;
  static const Shift long_shift(kLongBlock);
  static const Shift short_shift(kShortBlock);
  for (; n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0; ++p, --n) r = step8(r, *p);
  r = three_way(r, p, n, kLongBlock, long_shift);
  r = three_way(r, p, n, kShortBlock, short_shift);
  for (; n >= 8; p += 8, n -= 8) r = step64(r, load_le64(p));
  for (; n > 0; ++p, --n) r = step8(r, *p);
  return r;
}

bool cpu_has_crc() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("sse4.2");
#else
  return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
#endif
}

#endif

using ExtendFn = uint32_t (*)(uint32_t, const uint8_t*, size_t);

struct Backend {
  ExtendFn extend;
  const char* name;
};

Backend pick_backend() {
#if defined(ZEROCKPT_HW_CRC)
#if defined(__x86_64__)
  if (cpu_has_crc()) return {hw_extend, "sse4.2"};
#else
  if (cpu_has_crc()) return {hw_extend, "armv8-crc"};
#endif
#endif
  return {portable_extend, "portable"};
}

const Backend& backend() {
  static const Backend b = pick_backend();
  return b;
}

}  // namespace

uint32_t crc32c(const void* data, size_t size, uint32_t crc) {
  return ~backend().extend(~crc, static_cast<const uint8_t*>(data), size);
}

uint32_t crc32c_portable(const void* data, size_t size, uint32_t crc) {
  return ~portable_extend(~crc, static_cast<const uint8_t*>(data), size);
}

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  // The ~0 initial value and final xor of both CRCs cancel out in the xor.
  return multmodp(x8nmodp(len_b), crc_a) ^ crc_b;
}

const char* crc32c_backend() { return backend().name; }

}  // namespace zerockpt
