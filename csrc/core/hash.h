// Hashing for containers keyed by strings that come from files (tensor names, metadata keys):
// SipHash-1-3 under a key drawn at random once per process, so a crafted file cannot make its
// names collide and hash tables go quadratic (std::hash<std::string> is unseeded MurmurHash).
// Thread-safe.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

namespace zerockpt {

struct SeededHash {
  size_t operator()(std::string_view s) const noexcept;
};

template <typename Key, typename Value>
using SeededMap = std::unordered_map<Key, Value, SeededHash>;
template <typename Key>
using SeededSet = std::unordered_set<Key, SeededHash>;

}  // namespace zerockpt
