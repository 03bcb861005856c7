// CRC-32C (Castagnoli; reflected polynomial 0x82F63B78, initial value and final xor ~0: the
// checksum of iSCSI, ext4 and Snappy), with the CPU's CRC instruction where it has one (SSE4.2
// on x86-64, the CRC extension on ARMv8) and a table-driven fallback. Pure functions;
// thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>

namespace zerockpt {

// The CRC-32C of `size` bytes at `data` following bytes whose CRC-32C is `crc` (0 for none):
// crc32c(b, nb, crc32c(a, na)) == crc32c(a + b, na + nb).
uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);

// The CRC-32C of a + b from crc_a = crc32c(a), crc_b = crc32c(b) and b's length, in O(log len_b).
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

// Which implementation crc32c() uses here: "sse4.2", "armv8-crc" or "portable".
const char* crc32c_backend();

// The table-driven implementation, whatever the CPU (for tests against the hardware one).
uint32_t crc32c_portable(const void* data, size_t size, uint32_t crc = 0);

}  // namespace zerockpt
