#pragma once
// Shared by attention_flash_fwd.cu and attention_flash_bwd.cu: the tile loader, the argument
// checks and the tuning hook, over the tensor-core primitives of mma.cuh (fragment layouts
// there). An fp32 accumulator tile of two n-blocks repacked to bf16 *is* an A fragment (P, dS
// stay in registers between the two products of a step, as in FlashAttention-2).
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "mma.cuh"
#include "ftune/kernels/cuda_attention.hpp"

namespace ftune::cuda::fa {

using namespace tc;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x on the SFU; ex2(-inf) = 0, which the masking relies on.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Rows [0, R) of a [R, D] tile at g (row stride `stride` elements) into shared memory with
// row pitch D + 8: the 16-byte pad puts the 8 rows one ldmatrix reads in 8 distinct bank
// groups. Rows >= valid are zero-filled (past the sequence: never read from global).
template <int R, int D, int NT>
__device__ __forceinline__ void load_tile(bf* sm, const bf* g, int64_t stride, int valid) {
  constexpr int kChunks = D / 8, kIters = (R * kChunks + NT - 1) / NT;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = it * NT + static_cast<int>(threadIdx.x);
    if (kIters * NT != R * kChunks && i >= R * kChunks) break;
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool ok = r < valid;
    cp16(sm + r * (D + 8) + c, ok ? g + r * stride + c : g, ok);
  }
}

// Host-side argument checks shared by the flash launchers.
inline void check_flash_args(const AttentionShape& s, const void* const* ptrs, int n) {
  if (s.d != 64 && s.d != 128)
    throw std::invalid_argument("flash attention: head_dim must be 64 or 128, got " +
                                std::to_string(s.d));
  if (s.Hq <= 0 || s.Hkv <= 0 || s.Hq % s.Hkv != 0 || s.Hq > 65535)
    throw std::invalid_argument("flash attention: need Hq a multiple of Hkv (Hq <= 65535)");
  if (s.num_seqs > 65535) throw std::invalid_argument("flash attention: over 65535 sequences");
  for (int i = 0; i < n; ++i)
    if (!detail::aligned16(ptrs[i]))
      throw std::invalid_argument("flash attention: tensors must be 16-byte aligned");
  if (detail::device_facts().major < 8)
    throw std::invalid_argument("flash attention: needs compute capability 8.0+ (bf16 mma)");
}

// Tuning hook: FTUNE_FA_FWD / FTUNE_FA_BWD pick a tile configuration (unset = 0, the
// default); read per call so a benchmark can compare them in one process.
inline int variant_from_env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : 0;
}

}  // namespace ftune::cuda::fa
