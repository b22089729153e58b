#pragma once
// Hopper warpgroup MMA (wgmma.mma_async) for the sm_90a attention kernels: shared-memory
// matrix descriptors, the fences around asynchronous MMAs, and the 128-byte-swizzled tile
// layout they read. CUDA-side header (src/kernels/cuda only). Compiled to real instructions
// only for sm_90a (FTUNE_WGMMA); elsewhere the wrappers trap and the launchers never pick
// these kernels (wgmma_available()).
//
// Layouts (PTX ISA "asynchronous warpgroup level matrix", 128 threads = 4 warps):
//  * accumulator of m64nN: warp w of the group owns rows 16w..16w+15 and holds them exactly
//    like an mma.sync m16n8 C fragment repeated over the N/8 column blocks:
//    d[4j + e] = (row 16w + g + 8*(e/2), col 8j + 2t + e%2), g = lane/4, t = lane%4;
//  * register A of m64nNk16: per warp the mma.sync m16n8k16 A fragment of its 16 rows, so
//    two accumulator column blocks repacked to bf16 are an A operand (as in FlashAttention-2).
//  * shared memory, bf16, 128-byte swizzle: a tile of R rows x C columns is stored as C/64
//    column chunks of R rows x 128 bytes; in a chunk row r's 16-byte unit u lands at unit
//    u ^ (r % 8). Every chunk starts 1024-byte aligned. Read K-major (the 64 columns are the
//    reduction dimension) the descriptor has SBO = 1024 (8 rows) and steps along K by moving
//    its start 32 bytes; read MN-major (rows are the reduction dimension) SBO = 1024 again
//    (8 rows of K), LBO = the chunk stride (the next 64 of M/N), and a K step of 16 rows
//    moves the start by 2048 bytes.
#include <cuda_bf16.h>

#include <cstdint>

#include "mma.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FTUNE_WGMMA 1
#endif

#include "wgmma_ops.cuh"

namespace ftune::cuda::wg {

using tc::bf;

// Descriptor of a 128B-swizzled operand starting at smem (16-byte units for the offsets).
__device__ __forceinline__ uint64_t desc(const void* smem, uint32_t lbo_bytes,
                                         uint32_t sbo_bytes) {
  const uint64_t a = tc::smem_u32(smem);
  return ((a & 0x3FFFF) >> 4) | (uint64_t((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

__device__ __forceinline__ void fence() {
#ifdef FTUNE_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit() {
#ifdef FTUNE_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wait() {
#ifdef FTUNE_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Generic-proxy writes to shared memory (cp.async, st.shared) before wgmma reads them.
__device__ __forceinline__ void fence_async_smem() {
#ifdef FTUNE_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving accumulator reads above the wait that completes them.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Same for register A operands: an asynchronous MMA still reads them until its wait, so
// they must stay allocated (not reused by the compiler) until after it.
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}
// Barrier over the 128 threads of warpgroup 0 or 1 (ids 1, 2; 0 is __syncthreads). The ids
// are immediates: a register id makes ptxas reserve all 16 barriers, one block per SM.
__device__ __forceinline__ void group_sync(int group) {
  if (group == 0) asm volatile("bar.sync 1, 128;\n" ::: "memory");
  else asm volatile("bar.sync 2, 128;\n" ::: "memory");
}

// Byte offset of element (r, c) in a swizzled tile of R rows (see the header).
template <int R>
__device__ __forceinline__ uint32_t sw_offset(int r, int c) {
  return uint32_t((c / 64) * R * 128 + r * 128 + ((((c % 64) / 8) ^ (r % 8)) * 16) +
                  (c % 8) * 2);
}

// Rows [0, R) of a [R, D] global tile (row stride `stride` elements) into the swizzled
// layout by cp.async; rows >= valid are zero-filled without a read.
template <int R, int D, int NT>
__device__ __forceinline__ void load_tile_sw(unsigned char* sm, const bf* g, int64_t stride,
                                             int valid) {
  constexpr int kUnits = D / 8, kIters = (R * kUnits + NT - 1) / NT;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = it * NT + static_cast<int>(threadIdx.x);
    if (kIters * NT != R * kUnits && i >= R * kUnits) break;
    const int r = i / kUnits, u = i % kUnits;
    const bool ok = r < valid;
    tc::cp16(reinterpret_cast<bf*>(sm + (u / 8) * R * 128 + r * 128 + (((u % 8) ^ (r % 8)) * 16)),
             ok ? g + r * stride + u * 8 : g, ok);
  }
}

}  // namespace ftune::cuda::wg
