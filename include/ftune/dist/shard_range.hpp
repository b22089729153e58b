#pragma once
// dist module: how ZeRO splits a vector of n elements over ranks. Header-only, so modules
// that shard without talking (model: ZeRO-3's layer shards) need not link dist.
#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>

namespace ftune {

// [begin, end) of rank r's shard when n elements are split over `size` ranks.
struct ShardRange {
  size_t begin = 0, end = 0;
  size_t size() const { return end - begin; }
};

// The first n % size ranks get one element more: sizes differ by at most one.
inline ShardRange shard_range(size_t n, int rank, int size) {
  if (size < 1 || rank < 0 || rank >= size)
    throw std::invalid_argument("shard_range: rank " + std::to_string(rank) + " not in [0, " +
                                std::to_string(size) + ")");
  const size_t s = static_cast<size_t>(size), r = static_cast<size_t>(rank);
  const size_t base = n / s, extra = n % s;
  const size_t begin = r * base + std::min(r, extra);
  return {begin, begin + base + (r < extra ? 1 : 0)};
}

}  // namespace ftune
