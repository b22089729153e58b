// AdamW over flat fp32 buffers, deterministic sums (grad-norm, loss), clipping scale.
#include <cmath>

#include "common.cuh"
#include "ftune/kernels/cuda_optim.hpp"

namespace ftune::cuda {
namespace {
using namespace detail;

// src/train/optimizer.cpp's loop, operation by operation. The _rn intrinsics forbid FMA
// contraction, and sqrt/div are IEEE-rounded (nvcc's default without fast-math), so each
// value equals the CPU's fp32 result.
__global__ void adamw_kernel(float* __restrict__ params, const float* __restrict__ grads,
                             float* __restrict__ m, float* __restrict__ v, int64_t n,
                             AdamWScalars s, const float* __restrict__ grad_scale) {
  const float gs = grad_scale ? *grad_scale : 1.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float g = grad_scale ? __fmul_rn(grads[i], gs) : grads[i];
    float p = __fmul_rn(params[i], s.decay);
    float mi = m[i], vi = v[i];
    mi = __fadd_rn(mi, __fmul_rn(s.w1, __fsub_rn(g, mi)));  // exp_avg.lerp_(grad, 1 - beta1)
    vi = __fadd_rn(__fmul_rn(vi, s.b2), __fmul_rn(__fmul_rn(s.w2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), s.bc2s), s.eps);
    p = __fsub_rn(p, __fmul_rn(s.step_size, __fdiv_rn(mi, denom)));
    params[i] = p;
    m[i] = mi;
    v[i] = vi;
  }
}

constexpr int kReduceThreads = 256;

// Pass 1: block b sums a fixed strided subset into partial[b] (fixed tree inside the block).
__global__ void reduce_partial_kernel(float* partial, const float* x, int64_t n, bool square) {
  __shared__ float sh[32];
  float acc = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float e = x[i];
    acc += square ? e * e : e;
  }
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Pass 2: one block folds the partials in a fixed order.
__global__ void reduce_final_kernel(float* out, const float* partial, int count,
                                    bool accumulate) {
  __shared__ float sh[32];
  float acc = 0.f;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) *out = accumulate ? *out + acc : acc;
}

__global__ void clip_scale_kernel(float* scale, float* norm, const float* sumsq,
                                  double max_norm) {
  // clip_grad_norm's coefficient, in double as the CPU forms it.
  const double nrm = sqrt(static_cast<double>(*sumsq));
  const double coef = max_norm / (nrm + 1e-6);
  *scale = (max_norm > 0 && coef < 1.0) ? static_cast<float>(coef) : 1.f;
  if (norm) *norm = static_cast<float>(nrm);
}

// One thread per block of `block` values, squares added in order in double with the
// rounding of separate multiply and add (the host's sum_of_squares, element for element).
__global__ void sum_of_squares_blocks_kernel(double* out, const float* __restrict__ x,
                                             int64_t n, int64_t block, int64_t blocks) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= blocks) return;
  const int64_t lo = b * block, hi = min(n, lo + block);
  double ss = 0.0;
  for (int64_t i = lo; i < hi; ++i) {
    const double v = static_cast<double>(x[i]);
    ss = __dadd_rn(ss, __dmul_rn(v, v));
  }
  out[b] = ss;
}

// Grid-stride: grid_for caps the grid (4096 blocks), and a layer block is far longer.
__global__ void add_into_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] += x[i];
}

__global__ void scale_kernel(float* x, int64_t n, const float* scale) {
  const float s = *scale;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __fmul_rn(x[i], s);
}

__global__ void to_bf16_kernel(__nv_bfloat16* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = __float2bfloat16_rn(src[i]);
}

}  // namespace

void to_bf16(bf16* dst, const float* src, int64_t n, stream_t stream) {
  if (n <= 0) return;
  to_bf16_kernel<<<grid_for(n, 256, 8192), 256, 0, stream>>>(
      reinterpret_cast<__nv_bfloat16*>(dst), src, n);
  FTUNE_CUDA_LAUNCH_CHECK();
}

void zero_async(float* x, int64_t n, stream_t stream) {
  if (n > 0) FTUNE_CUDA_CHECK(cudaMemsetAsync(x, 0, static_cast<size_t>(n) * sizeof(float), stream));
}

void copy_to_device_async(void* dst, const void* src, size_t bytes, stream_t stream) {
  if (bytes) FTUNE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
}

void copy_to_host_async(void* dst, const void* src, size_t bytes, stream_t stream) {
  if (bytes) FTUNE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
}

void synchronize(stream_t stream) { FTUNE_CUDA_CHECK(cudaStreamSynchronize(stream)); }

void adamw_step(float* params, const float* grads, float* m, float* v, int64_t n,
                const AdamWScalars& s, const float* grad_scale, stream_t stream) {
  if (n <= 0) return;
  const int threads = 256;
  adamw_kernel<<<grid_for(n, threads), threads, 0, stream>>>(params, grads, m, v, n, s,
                                                             grad_scale);
  FTUNE_CUDA_LAUNCH_CHECK();
}

void reduce_sum(float* out, const float* x, int64_t n, bool square, bool accumulate,
                float* workspace, stream_t stream) {
  // The block count depends on n only (never on the device), so the order is fixed.
  const int blocks = n > 0 ? static_cast<int>(grid_for(n, kReduceThreads,
                                                       kReduceWorkspaceFloats))
                           : 0;
  if (blocks > 0) {
    reduce_partial_kernel<<<blocks, kReduceThreads, 0, stream>>>(workspace, x, n, square);
    FTUNE_CUDA_LAUNCH_CHECK();
  }
  reduce_final_kernel<<<1, 1024, 0, stream>>>(out, workspace, blocks, accumulate);
  FTUNE_CUDA_LAUNCH_CHECK();
}

void sum_of_squares_blocks(double* block_sums, const float* x, int64_t n, int64_t block,
                           stream_t stream) {
  if (n <= 0) return;
  const int64_t blocks = (n + block - 1) / block;
  const int threads = 128;
  sum_of_squares_blocks_kernel<<<static_cast<unsigned>((blocks + threads - 1) / threads),
                                 threads, 0, stream>>>(block_sums, x, n, block, blocks);
  FTUNE_CUDA_LAUNCH_CHECK();
}

void add_into(float* y, const float* x, int64_t n, stream_t stream) {
  if (n <= 0) return;
  const int threads = 256;
  add_into_kernel<<<grid_for(n, threads), threads, 0, stream>>>(y, x, n);
  FTUNE_CUDA_LAUNCH_CHECK();
}

void clip_scale(float* scale, float* norm, const float* sumsq, double max_norm,
                stream_t stream) {
  clip_scale_kernel<<<1, 1, 0, stream>>>(scale, norm, sumsq, max_norm);
  FTUNE_CUDA_LAUNCH_CHECK();
}

void scale_inplace(float* x, int64_t n, const float* scale, stream_t stream) {
  if (n <= 0) return;
  const int threads = 256;
  scale_kernel<<<grid_for(n, threads), threads, 0, stream>>>(x, n, scale);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace ftune::cuda
