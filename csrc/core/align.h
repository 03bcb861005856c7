// The page size and the rounding that buffers, direct I/O and the file layout share. Pure data.
#pragma once

#include <cstdint>

namespace zerockpt {

// The page size that page-aligned buffers and direct I/O assume: 4 KiB, the smallest Linux page
// and the largest logical block size O_DIRECT needs on common devices.
constexpr uint64_t kPageBytes = 4096;

// `n` rounded up to a multiple of `to` (> 0); `n + to - 1` must not overflow.
constexpr uint64_t round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

}  // namespace zerockpt
