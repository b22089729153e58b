#pragma once
// Warp-level tensor-core primitives shared by the flash attention kernels and the LoRA
// up-backward pass: mma.sync m16n8k16 bf16 -> fp32, ldmatrix, cp.async and the lane address
// patterns that feed them. CUDA-side header (src/kernels/cuda only).
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A 16x16: a0 (row g, cols 2t..2t+1), a1 (row g+8, same), a2 (row g, cols 2t+8..), a3 (g+8)
//   B 16x8:  b0 (k rows 2t..2t+1, col g), b1 (k rows 2t+8.., col g)
//   C 16x8:  c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, same)
#include <cuda_bf16.h>

#include <cstdint>

// bf16 mma.sync and cp.async need sm_80; builds for older targets (a CMake default of
// sm_75, say) compile these to a trap, and the launchers refuse such devices up front.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FTUNE_TC_OLD_ARCH 1
#endif

namespace ftune::cuda::tc {

using bf = __nv_bfloat16;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// d += a * b (16x16 row-major A, 16x8 column-major B).
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
#ifdef FTUNE_TC_OLD_ARCH
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

// 16-byte global -> shared copy; src_bytes 0 zero-fills without reading.
__device__ __forceinline__ void cp16(bf* dst, const bf* src, bool ok) {
#ifdef FTUNE_TC_OLD_ARCH
  __trap();
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(ok ? 16 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void cp4(float* dst, const float* src, bool ok) {
#ifdef FTUNE_TC_OLD_ARCH
  __trap();
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(ok ? 4 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_commit() {
#ifndef FTUNE_TC_OLD_ARCH
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_wait() {
#ifndef FTUNE_TC_OLD_ARCH
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

}  // namespace ftune::cuda::tc
