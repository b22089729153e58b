#pragma once
// kernels module: the dropout mask, one definition for the CPU reference (cpu::dropout_keep)
// and the CUDA kernels (common.cuh), so both backends drop the same elements bit for bit.
// A 32-bit key per seed (key(), once per launch); one murmur3-finaliser draw r per pair of
// elements (draw(key, i / 2)); element i keeps iff the low (even i) or high (odd i) 16 bits
// of r are >= ceil(p * 2^16) (threshold(p): exact, a power-of-two scaling), so p is honoured
// to 1/65536. About 10 integer instructions a pair: the splitmix64 draw this replaced (three
// 64-bit multiplies) made the fused LoRA kernels hash-bound. Plain C++ (no CUDA needed).
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FTUNE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FTUNE_HOST_DEVICE inline
#endif

namespace ftune::dropout {

FTUNE_HOST_DEVICE uint64_t mix64(uint64_t z) {  // splitmix64's output function
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

FTUNE_HOST_DEVICE uint32_t key(uint64_t seed) { return static_cast<uint32_t>(mix64(seed)); }

FTUNE_HOST_DEVICE uint32_t draw(uint32_t key, uint64_t pair) {
  uint32_t h = static_cast<uint32_t>(pair) * 0x9E3779B9u + key +
               static_cast<uint32_t>(pair >> 32) * 0x632BE5ABu;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

FTUNE_HOST_DEVICE bool keep(uint32_t r, int odd, uint32_t threshold) {
  return (odd ? (r >> 16) : (r & 0xffffu)) >= threshold;
}

inline uint32_t threshold(double p) { return static_cast<uint32_t>(std::ceil(p * 65536.0)); }

}  // namespace ftune::dropout
