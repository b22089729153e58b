#pragma once
// Shared by attention_flash_fwd.cu and attention_flash_bwd.cu: the warp-level tensor-core
// primitives (mma.sync m16n8k16 bf16 -> fp32, ldmatrix, cp.async) and the tile loader.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A 16x16: a0 (row g, cols 2t..2t+1), a1 (row g+8, same), a2 (row g, cols 2t+8..), a3 (g+8)
//   B 16x8:  b0 (k rows 2t..2t+1, col g), b1 (k rows 2t+8.., col g)
//   C 16x8:  c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, same)
// So an fp32 accumulator tile of two n-blocks repacked to bf16 *is* an A fragment (P, dS
// stay in registers between the two products of a step, as in FlashAttention-2).
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "ftune/kernels/cuda_attention.hpp"

// bf16 mma.sync and cp.async need sm_80; builds for older targets (a CMake default of
// sm_75, say) compile these to a trap, and the launchers refuse such devices up front.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FTUNE_FA_OLD_ARCH 1
#endif

namespace ftune::cuda::fa {

using bf = __nv_bfloat16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// d += a * b (16x16 row-major A, 16x8 column-major B).
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
#ifdef FTUNE_FA_OLD_ARCH
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const bf* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm4t(uint32_t (&r)[4], const bf* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// Lane address offsets (row, col) inside a 16x16 smem block for the three load patterns:
//  A operand, rows = m:                       matrices (r0-7,c0) (r8-15,c0) (r0-7,c8) (r8-15,c8)
__device__ __forceinline__ int a_row(int lane) { return lane % 16; }
__device__ __forceinline__ int a_col(int lane) { return (lane / 16) * 8; }
//  B operand of two n-blocks, stored [n][k] (non-trans): (n0-7,k0) (n0-7,k8) (n8-15,k0) (n8-15,k8)
__device__ __forceinline__ int bn_row(int lane) { return lane % 8 + (lane / 16) * 8; }
__device__ __forceinline__ int bn_col(int lane) { return ((lane / 8) % 2) * 8; }
//  B operand of two n-blocks, stored [k][n] (trans):     (k0-7,n0) (k8-15,n0) (k0-7,n8) (k8-15,n8)
__device__ __forceinline__ int bk_row(int lane) { return lane % 8 + ((lane / 8) % 2) * 8; }
__device__ __forceinline__ int bk_col(int lane) { return (lane / 16) * 8; }
// (A operand stored [k][m], loaded with .trans, uses the non-trans B pattern with rows = k.)

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lower column
  return *reinterpret_cast<uint32_t*>(&v);
}
// 2^x on the SFU; ex2(-inf) = 0, which the masking relies on.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 16-byte global -> shared copy; src_bytes 0 zero-fills without reading.
__device__ __forceinline__ void cp16(bf* dst, const bf* src, bool ok) {
#ifdef FTUNE_FA_OLD_ARCH
  __trap();
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(ok ? 16 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void cp4(float* dst, const float* src, bool ok) {
#ifdef FTUNE_FA_OLD_ARCH
  __trap();
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(ok ? 4 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_commit() {
#ifndef FTUNE_FA_OLD_ARCH
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_wait() {
#ifndef FTUNE_FA_OLD_ARCH
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
// dst[0..1] += v (8-byte vector atomic on sm_90, two 4-byte ones before).
__device__ __forceinline__ void atomic_add2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
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
  int dev = 0, major = 0;
  FTUNE_CUDA_CHECK(cudaGetDevice(&dev));
  FTUNE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  if (major < 8)
    throw std::invalid_argument("flash attention: needs compute capability 8.0+ (bf16 mma)");
}

// Tuning hook: FTUNE_FA_FWD / FTUNE_FA_BWD pick a tile configuration (unset = 0, the
// default); read per call so a benchmark can compare them in one process.
inline int variant_from_env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : 0;
}

}  // namespace ftune::cuda::fa
