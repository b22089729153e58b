// Cross-entropy forward+backward over a chunk of bf16 logit rows, one block per row.
// Pass 1: each thread keeps an online (max, sum of exp) over its strided slice of the row,
// the block merges the pairs into the row's log-sum-exp. Pass 2 re-reads the row and writes
// scale * (softmax - onehot) in bf16. All math is fp32 in registers; no fp32 copy of the
// logits ever exists, so the caller can size chunks by the bf16 logits alone.
#include <cmath>

#include "common.cuh"
#include "ftune/kernels/cuda_ops.hpp"

namespace ftune::cuda {
namespace {
using namespace detail;

struct MaxSum {
  float m, s;  // running max and sum of exp(x - m)
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  if (a.m == -INFINITY) return b;  // empty slice (also avoids -inf - -inf)
  if (b.m == -INFINITY) return a;
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// Folds k values into the running pair with one rescale: m only moves to the group's max.
template <int k>
__device__ __forceinline__ void fold(MaxSum& acc, const float* v) {
  float mx = v[0];
#pragma unroll
  for (int j = 1; j < k; ++j) mx = fmaxf(mx, v[j]);
  if (mx > acc.m) {
    acc.s *= expf(acc.m - mx);  // exp(-inf) = 0 on the first group
    acc.m = mx;
  }
#pragma unroll
  for (int j = 0; j < k; ++j) acc.s += expf(v[j] - acc.m);
}

// Merge over the block (fixed order), returned to every thread.
__device__ MaxSum block_merge(MaxSum v) {
  __shared__ float sm[32], ss[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = merge(v, other);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sm[warp] = v.m;
    ss[warp] = v.s;
  }
  __syncthreads();
  const int nw = blockDim.x >> 5;
  v = lane < nw ? MaxSum{sm[lane], ss[lane]} : MaxSum{-INFINITY, 0.f};
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = merge(v, other);
  }
  return v;
}

template <bool kVec>
__global__ void cross_entropy_kernel(__nv_bfloat16* dlogits, float* row_loss,
                                     const __nv_bfloat16* logits, const int32_t* targets,
                                     int64_t V, float scale) {
  const int64_t row = blockIdx.x;
  const __nv_bfloat16* l = logits + row * V;
  __nv_bfloat16* dl = dlogits + row * V;
  const int32_t t = targets[row];
  if (t < 0) {  // ignored row: zero gradient, zero loss (uniform over the block)
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) st(dl + i, 0.f);
    if (threadIdx.x == 0) row_loss[row] = 0.f;
    return;
  }
  MaxSum acc{-INFINITY, 0.f};
  if constexpr (kVec) {
    for (int64_t i = threadIdx.x * 8; i < V; i += blockDim.x * 8) {
      float v[8];
      load8(l + i, v);
      fold<8>(acc, v);
    }
  } else {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const float v = ld(l + i);
      fold<1>(acc, &v);
    }
  }
  const MaxSum tot = block_merge(acc);
  const float lse = tot.m + logf(tot.s);
  // Every thread has read its slice (block_merge synchronised), so in-place writes are safe.
  if (threadIdx.x == 0) row_loss[row] = t < V ? lse - ld(l + t) : NAN;
  __syncthreads();  // thread 0's read of l[t] happens before anyone overwrites it
  if constexpr (kVec) {
    for (int64_t i = threadIdx.x * 8; i < V; i += blockDim.x * 8) {
      float v[8];
      load8(l + i, v);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        v[j] = scale * expf(v[j] - lse);
        if (i + j == t) v[j] -= scale;
      }
      store8(dl + i, v);
    }
  } else {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      float v = scale * expf(ld(l + i) - lse);
      if (i == t) v -= scale;
      st(dl + i, v);
    }
  }
}

}  // namespace

void cross_entropy_forward_backward(bf16* dlogits, float* row_loss, const bf16* logits,
                                    const int32_t* targets, int64_t N, int64_t V, float scale,
                                    stream_t stream) {
  if (N <= 0 || V <= 0) return;
  const bool vec = V % 8 == 0 && aligned16(logits) && aligned16(dlogits);
  // Large vocabularies: 512 threads keep ~30 16-byte loads per thread in flight per pass.
  const unsigned blocks = static_cast<unsigned>(N), threads = V >= 16384 ? 512 : 128;
  if (vec)
    cross_entropy_kernel<true><<<blocks, threads, 0, stream>>>(dev(dlogits), row_loss,
                                                               dev(logits), targets, V, scale);
  else
    cross_entropy_kernel<false><<<blocks, threads, 0, stream>>>(dev(dlogits), row_loss,
                                                                dev(logits), targets, V, scale);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace ftune::cuda
