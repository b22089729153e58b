// RMSNorm forward/backward: one block per row, fp32 statistics, two passes over the row
// (the second re-reads it from L1/L2 instead of holding D values in registers, so any D
// works with one kernel). 16-byte accesses when the row allows them.
#include "common.cuh"
#include "ftune/kernels/cuda_ops.hpp"

namespace ftune::cuda {
namespace {
using namespace detail;

template <bool kVec>
__global__ void rms_norm_fwd_kernel(__nv_bfloat16* y, float* rstd, const __nv_bfloat16* x,
                                    const __nv_bfloat16* w, int64_t D, float eps) {
  __shared__ float sh[32];
  const int64_t row = blockIdx.x;
  const __nv_bfloat16* xr = x + row * D;
  __nv_bfloat16* yr = y + row * D;
  float ss = 0.f;
  if constexpr (kVec) {
    for (int64_t i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
      float v[8];
      load8(xr + i, v);
#pragma unroll
      for (int j = 0; j < 8; ++j) ss += v[j] * v[j];
    }
  } else {
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
      const float v = ld(xr + i);
      ss += v * v;
    }
  }
  ss = block_sum(ss, sh);
  const float r = 1.f / sqrtf(ss / static_cast<float>(D) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  // w * (x * r), the CPU twin's order.
  if constexpr (kVec) {
    for (int64_t i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
      float v[8], wv[8], o[8];
      load8(xr + i, v);
      load8(w + i, wv);
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = wv[j] * (v[j] * r);
      store8(yr + i, o);
    }
  } else {
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) st(yr + i, ld(w + i) * (ld(xr + i) * r));
  }
}

// y = w * xhat, xhat = x r:  dx = r (g - xhat mean(g xhat)), g = w dy.
template <bool kVec>
__global__ void rms_norm_bwd_kernel(__nv_bfloat16* dx, const __nv_bfloat16* dy,
                                    const __nv_bfloat16* x, const __nv_bfloat16* w,
                                    const float* rstd, int64_t D, bool accumulate) {
  __shared__ float sh[32];
  const int64_t row = blockIdx.x;
  const __nv_bfloat16* xr = x + row * D;
  const __nv_bfloat16* dyr = dy + row * D;
  __nv_bfloat16* dxr = dx + row * D;
  const float r = rstd[row];
  float dot = 0.f;
  if constexpr (kVec) {
    for (int64_t i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
      float xv[8], gv[8], wv[8];
      load8(xr + i, xv);
      load8(dyr + i, gv);
      load8(w + i, wv);
#pragma unroll
      for (int j = 0; j < 8; ++j) dot += wv[j] * gv[j] * xv[j] * r;
    }
  } else {
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
      dot += ld(w + i) * ld(dyr + i) * ld(xr + i) * r;
  }
  const float mean = block_sum(dot, sh) / static_cast<float>(D);
  if constexpr (kVec) {
    for (int64_t i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
      float xv[8], gv[8], wv[8], o[8];
      load8(xr + i, xv);
      load8(dyr + i, gv);
      load8(w + i, wv);
      if (accumulate) load8(dxr + i, o);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float v = r * (wv[j] * gv[j] - xv[j] * r * mean);
        o[j] = accumulate ? o[j] + v : v;
      }
      store8(dxr + i, o);
    }
  } else {
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
      const float v = r * (ld(w + i) * ld(dyr + i) - ld(xr + i) * r * mean);
      st(dxr + i, accumulate ? ld(dxr + i) + v : v);
    }
  }
}

// 256 threads cover a 4096-wide row in two 16-byte steps each; narrow rows use fewer.
unsigned threads_for(int64_t D) { return D >= 2048 ? 256 : D >= 512 ? 128 : 64; }

}  // namespace

void rms_norm_forward(bf16* y, float* rstd, const bf16* x, const bf16* w, int64_t N, int64_t D,
                      float eps, stream_t stream) {
  if (N <= 0 || D <= 0) return;
  const bool vec = D % 8 == 0 && aligned16(y) && aligned16(x) && aligned16(w);
  const unsigned blocks = static_cast<unsigned>(N), threads = threads_for(D);
  if (vec)
    rms_norm_fwd_kernel<true>
        <<<blocks, threads, 0, stream>>>(dev(y), rstd, dev(x), dev(w), D, eps);
  else
    rms_norm_fwd_kernel<false>
        <<<blocks, threads, 0, stream>>>(dev(y), rstd, dev(x), dev(w), D, eps);
  FTUNE_CUDA_LAUNCH_CHECK();
}

void rms_norm_backward(bf16* dx, const bf16* dy, const bf16* x, const bf16* w,
                       const float* rstd, int64_t N, int64_t D, bool accumulate,
                       stream_t stream) {
  if (N <= 0 || D <= 0) return;
  const bool vec =
      D % 8 == 0 && aligned16(dx) && aligned16(dy) && aligned16(x) && aligned16(w);
  const unsigned blocks = static_cast<unsigned>(N), threads = threads_for(D);
  if (vec)
    rms_norm_bwd_kernel<true><<<blocks, threads, 0, stream>>>(dev(dx), dev(dy), dev(x), dev(w),
                                                              rstd, D, accumulate);
  else
    rms_norm_bwd_kernel<false><<<blocks, threads, 0, stream>>>(dev(dx), dev(dy), dev(x), dev(w),
                                                               rstd, D, accumulate);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace ftune::cuda
