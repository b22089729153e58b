// Random initialisation of base weights: the serial mt19937 reference, and a counter-based
// generator for models too large to fill serially (init-model of 8B shapes).
#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "ftune/model/weights.hpp"

namespace ftune {
namespace {

enum class Role { random, one, zero };

// transformers' _init_weights: norms start at 1, biases at 0, every other tensor random.
Role role_of(const std::string& name) {
  if (name.find("norm.weight") != std::string::npos) return Role::one;
  if (name.ends_with(".bias")) return Role::zero;
  return Role::random;
}

// The layout of w, checked against its storage: init must never write past it.
std::vector<BaseWeights::Entry> checked_layout(const BaseWeights& w) {
  std::vector<BaseWeights::Entry> entries = BaseWeights::layout(w.cfg);
  if (w.storage.size() != BaseWeights::layout_size(entries))
    throw std::runtime_error("init_random_weights: weights are not allocated for their config");
  return entries;
}

// splitmix64 (Steele et al.): its output for state s is mix64(s + kGamma), and distinct
// states give well-mixed, independent-looking outputs; that is all a counter-based
// generator needs.
constexpr uint64_t kGamma = 0x9e3779b97f4a7c15ull;
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t tensor_key(uint64_t seed, size_t tensor_index) {
  return mix64(mix64(seed + kGamma) + (static_cast<uint64_t>(tensor_index) + 1) * kGamma);
}

// Two independent N(0, 1) values for element pair `pair` of a tensor, by Marsaglia's polar
// form of Box-Muller (no sin/cos: measured 2x faster than the trigonometric form). A
// rejected point draws again from the pair's own splitmix64 stream, so the result still
// depends on (key, pair) alone.
struct Pair { double a, b; };
Pair normal_pair(uint64_t key, uint64_t pair) {
  const uint64_t stream = mix64(key + (pair + 1) * kGamma);
  uint64_t h = stream;
  for (uint64_t attempt = 1;; ++attempt) {
    // x, y uniform in [-1, 1) with 32 bits each; about 1 point in 5 falls outside the disc.
    const double x = static_cast<double>(h >> 32) * 0x1p-31 - 1.0;
    const double y = static_cast<double>(h & 0xffffffffu) * 0x1p-31 - 1.0;
    const double q = x * x + y * y;
    if (q < 1.0 && q > 0.0) {
      const double f = std::sqrt(-2.0 * std::log(q) / q);
      return {x * f, y * f};
    }
    h = mix64(stream + attempt * kGamma);
  }
}

// Below this many pairs a slice is filled by the calling thread alone: starting a parallel
// region costs more than norms and small slices take.
constexpr int64_t kParallelPairs = 1 << 14;

void fill_normal_slice(uint64_t key, double std, size_t begin, size_t count, float* dst) {
  if (count == 0) return;
  const size_t end = begin + count;
  const int64_t first = static_cast<int64_t>(begin / 2), last = static_cast<int64_t>((end + 1) / 2);
  // Elements 2p and 2p+1 share pair p; a slice may start or end in the middle of a pair.
#pragma omp parallel for schedule(static) if (last - first > kParallelPairs)
  for (int64_t p = first; p < last; ++p) {
    const Pair z = normal_pair(key, static_cast<uint64_t>(p));
    const size_t i = 2 * static_cast<size_t>(p);  // < end for every p in the loop
    if (i >= begin) dst[i - begin] = static_cast<float>(std * z.a);
    if (i + 1 < end) dst[i + 1 - begin] = static_cast<float>(std * z.b);
  }
}

}  // namespace

void init_random_weights(BaseWeights& w, uint64_t seed, double std) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, static_cast<float>(std));
  for (const auto& e : checked_layout(w)) {
    const size_t n = e.numel();
    float* p = w.storage.data() + e.offset;
    const Role role = role_of(e.name);
    for (size_t i = 0; i < n; ++i)
      p[i] = role == Role::one ? 1.0f : role == Role::zero ? 0.0f : normal(rng);
  }
}

void init_random_slice_fast(const BaseWeights::Entry& e, size_t tensor_index, uint64_t seed,
                            double std, size_t begin, size_t count, float* dst) {
  if (begin + count > e.numel())
    throw std::runtime_error("init_random_slice_fast: slice past the end of " + e.name);
  switch (role_of(e.name)) {
    case Role::one: std::fill(dst, dst + count, 1.0f); return;
    case Role::zero: std::fill(dst, dst + count, 0.0f); return;
    case Role::random: fill_normal_slice(tensor_key(seed, tensor_index), std, begin, count, dst);
  }
}

void init_random_weights_fast(BaseWeights& w, uint64_t seed, double std) {
  const std::vector<BaseWeights::Entry> entries = checked_layout(w);
  for (size_t t = 0; t < entries.size(); ++t)
    init_random_slice_fast(entries[t], t, seed, std, 0, entries[t].numel(),
                           w.storage.data() + entries[t].offset);
}

}  // namespace ftune
