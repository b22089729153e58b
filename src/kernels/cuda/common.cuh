#pragma once
// Shared by the CUDA backend's .cu files only: error macros, bf16 <-> float vector access,
// warp/block reductions. Never included by host-only code (use the plain headers under
// include/ftune/kernels/).
#include <cuda_bf16.h>

#include <cmath>
#include <cuda_runtime.h>

#include <cstdint>

#include "ftune/kernels/cuda_device.hpp"
#include "ftune/kernels/dropout_mask.hpp"

namespace ftune::cuda::detail {

// Throws CudaError with library, error name and text, call, file, line and rank.
[[noreturn]] void fail(const char* lib, const char* name, const char* text, const char* call,
                       const char* file, int line);
// Destructors cannot throw: they print the same message to stderr instead.
void warn(const char* lib, const char* name, const char* text, const char* call,
          const char* file, int line);

// What launchers ask of the current device, read once per device (device.cu).
struct DeviceFacts {
  int sms = 0, major = 0, minor = 0;
};
DeviceFacts device_facts();

}  // namespace ftune::cuda::detail

#define FTUNE_CUDA_CHECK(call)                                                            \
  do {                                                                                    \
    const cudaError_t ftune_err_ = (call);                                                \
    if (ftune_err_ != cudaSuccess)                                                        \
      ::ftune::cuda::detail::fail("CUDA", cudaGetErrorName(ftune_err_),                   \
                                  cudaGetErrorString(ftune_err_), #call, __FILE__,        \
                                  __LINE__);                                              \
  } while (0)

#define FTUNE_CUDA_WARN(call)                                                             \
  do {                                                                                    \
    const cudaError_t ftune_err_ = (call);                                                \
    if (ftune_err_ != cudaSuccess)                                                        \
      ::ftune::cuda::detail::warn("CUDA", cudaGetErrorName(ftune_err_),                   \
                                  cudaGetErrorString(ftune_err_), #call, __FILE__,        \
                                  __LINE__);                                              \
  } while (0)

// Needs <cublasLt.h> where it is expanded (gemm.cu).
#define FTUNE_CUBLAS_CHECK(call)                                                          \
  do {                                                                                    \
    const cublasStatus_t ftune_st_ = (call);                                              \
    if (ftune_st_ != CUBLAS_STATUS_SUCCESS)                                               \
      ::ftune::cuda::detail::fail("cuBLASLt", cublasLtGetStatusName(ftune_st_),           \
                                  cublasLtGetStatusString(ftune_st_), #call, __FILE__,    \
                                  __LINE__);                                              \
  } while (0)

// After every kernel launch: reports bad launch configurations at the launch site.
#define FTUNE_CUDA_LAUNCH_CHECK() FTUNE_CUDA_CHECK(cudaGetLastError())

namespace ftune::cuda::detail {

static_assert(sizeof(bf16) == sizeof(__nv_bfloat16), "bf16 must mirror __nv_bfloat16");
inline __nv_bfloat16* dev(bf16* p) { return reinterpret_cast<__nv_bfloat16*>(p); }
inline const __nv_bfloat16* dev(const bf16* p) {
  return reinterpret_cast<const __nv_bfloat16*>(p);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Blocks for a grid-stride loop over `work` items: never more than the grid needs, capped at
// a device-independent count (results never depend on the grid anyway).
inline unsigned grid_for(int64_t work, int threads, int64_t cap = 4096) {
  int64_t b = (work + threads - 1) / threads;
  if (b < 1) b = 1;
  return static_cast<unsigned>(b < cap ? b : cap);
}

__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// 8 bf16 = one 16-byte access.
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(h[j]);
    v[2 * j] = f.x;
    v[2 * j + 1] = f.y;
  }
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&v)[8]) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024), returned to every thread.
// Fixed tree: the result depends only on the inputs and blockDim. Reuses `sh` (32 floats)
// after a barrier, so back-to-back calls are safe.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // sh may still be read by a previous call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  v = lane < nw ? sh[lane] : 0.f;
  return warp_sum(v);
}

// One RoPE rotation (oa, ob) = (a c - b s, b c + a s) in the CPU twin's order with explicitly
// rounded multiplies (no FMA contraction): rope.cu and the LoRA term folded into RoPE.
__device__ __forceinline__ void rope_rotate(float a, float b, float c, float s, float& oa,
                                            float& ob) {
  oa = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
  ob = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

// The dropout mask of cpu::dropout_keep (ftune/kernels/dropout_mask.hpp), under the names the
// kernels use.
__device__ __forceinline__ uint32_t dropout_draw(uint32_t key, uint64_t pair) {
  return dropout::draw(key, pair);
}
__device__ __forceinline__ bool keep_bit(uint32_t r, int odd, uint32_t threshold) {
  return dropout::keep(r, odd, threshold);
}
inline uint32_t dropout_key(uint64_t seed) { return dropout::key(seed); }
inline uint32_t dropout_threshold(double p) { return dropout::threshold(p); }

}  // namespace ftune::cuda::detail
