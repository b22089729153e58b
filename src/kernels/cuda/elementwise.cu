// Elementwise bf16 ops: SwiGLU and residual add over one generic grid-stride kernel:
// 8 values per step with 16-byte accesses when every pointer is 16-byte aligned, a scalar
// tail for n % 8, or a scalar loop otherwise; dropout in its own kernel (below). Each op
// sees fp32 values and rounds once.
#include <cmath>

#include "common.cuh"
#include "ftune/kernels/cuda_ops.hpp"

namespace ftune::cuda {
namespace {
using namespace detail;

template <int NI, int NO>
struct Ptrs {
  const __nv_bfloat16* in[NI];
  __nv_bfloat16* out[NO];
  bool aligned() const {
    for (int k = 0; k < NI; ++k)
      if (!aligned16(in[k])) return false;
    for (int k = 0; k < NO; ++k)
      if (!aligned16(out[k])) return false;
    return true;
  }
};

// op(i, x[NI], y[NO]) computes element i. Outputs may alias inputs: each element is read
// and written by the same thread.
template <bool kVec, int NI, int NO, class Op>
__global__ void ew_kernel(Ptrs<NI, NO> p, int64_t n, Op op) {
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if constexpr (kVec) {
    const int64_t chunks = n / 8;
    for (int64_t c = tid; c < chunks; c += stride) {
      float x[NI][8], y[NO][8];
#pragma unroll
      for (int k = 0; k < NI; ++k) load8(p.in[k] + c * 8, x[k]);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float xs[NI], ys[NO];
#pragma unroll
        for (int k = 0; k < NI; ++k) xs[k] = x[k][j];
        op(c * 8 + j, xs, ys);
#pragma unroll
        for (int k = 0; k < NO; ++k) y[k][j] = ys[k];
      }
#pragma unroll
      for (int k = 0; k < NO; ++k) store8(p.out[k] + c * 8, y[k]);
    }
    done = chunks * 8;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    float xs[NI], ys[NO];
#pragma unroll
    for (int k = 0; k < NI; ++k) xs[k] = ld(p.in[k] + i);
    op(i, xs, ys);
#pragma unroll
    for (int k = 0; k < NO; ++k) st(p.out[k] + i, ys[k]);
  }
}

template <int NI, int NO, class Op>
void ew_launch(const Ptrs<NI, NO>& p, int64_t n, Op op, stream_t stream) {
  if (n <= 0) return;
  const int threads = 256;
  if (p.aligned())
    ew_kernel<true><<<grid_for((n + 7) / 8, threads), threads, 0, stream>>>(p, n, op);
  else
    ew_kernel<false><<<grid_for(n, threads), threads, 0, stream>>>(p, n, op);
  FTUNE_CUDA_LAUNCH_CHECK();
}

struct SwigluFwd {
  __device__ void operator()(int64_t, const float (&x)[2], float (&y)[1]) const {
    const float g = x[0];
    y[0] = g / (1.f + expf(-g)) * x[1];
  }
};
struct SwigluBwd {  // in: dh, gate, up   out: dgate, dup
  __device__ void operator()(int64_t, const float (&x)[3], float (&y)[2]) const {
    const float dh = x[0], g = x[1], up = x[2];
    const float sg = 1.f / (1.f + expf(-g));
    y[0] = dh * up * sg * (1.f + g * (1.f - sg));
    y[1] = dh * (g * sg);
  }
};
struct Add {
  __device__ void operator()(int64_t, const float (&x)[2], float (&y)[1]) const {
    y[0] = x[0] + x[1];
  }
};

// Dropout: one 32-bit draw per pair of elements (dropout_draw / keep_bit, common.cuh);
// a dedicated kernel (not ew_kernel) so each thread draws once per pair: 8 elements, 4 draws.
template <bool kAccumulate>
__global__ void dropout_kernel(__nv_bfloat16* y, const __nv_bfloat16* x, int64_t n,
                               uint32_t key, uint32_t threshold, float scale, bool vec) {
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (vec) {
    const int64_t chunks = n / 8;
    for (int64_t c = tid; c < chunks; c += stride) {
      float xv[8], yv[8];
      load8(x + c * 8, xv);
      if constexpr (kAccumulate) load8(y + c * 8, yv);
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const uint32_t r = dropout_draw(key, static_cast<uint64_t>(c * 4 + m));
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float v = keep_bit(r, h, threshold) ? xv[2 * m + h] * scale : 0.f;
          yv[2 * m + h] = kAccumulate ? yv[2 * m + h] + v : v;
        }
      }
      store8(y + c * 8, yv);
    }
    done = chunks * 8;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    const uint32_t r = dropout_draw(key, static_cast<uint64_t>(i) >> 1);
    const float v = keep_bit(r, static_cast<int>(i & 1), threshold) ? ld(x + i) * scale : 0.f;
    st(y + i, kAccumulate ? ld(y + i) + v : v);
  }
}

}  // namespace

void swiglu_forward(bf16* h, const bf16* gate, const bf16* up, int64_t n, stream_t stream) {
  ew_launch(Ptrs<2, 1>{{dev(gate), dev(up)}, {dev(h)}}, n, SwigluFwd{}, stream);
}

void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dh, const bf16* gate, const bf16* up,
                     int64_t n, stream_t stream) {
  ew_launch(Ptrs<3, 2>{{dev(dh), dev(gate), dev(up)}, {dev(dgate), dev(dup)}}, n, SwigluBwd{},
            stream);
}

void residual_add(bf16* out, const bf16* a, const bf16* b, int64_t n, stream_t stream) {
  ew_launch(Ptrs<2, 1>{{dev(a), dev(b)}, {dev(out)}}, n, Add{}, stream);
}

void dropout_apply(bf16* y, const bf16* x, int64_t n, double p, uint64_t seed,
                   bool accumulate, stream_t stream) {
  if (!(p >= 0.0 && p < 1.0)) throw CudaError("dropout_apply: p must be in [0, 1)");
  if (n <= 0) return;
  const uint32_t threshold = dropout_threshold(p), key = dropout_key(seed);
  const float scale = p > 0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.f;  // CPU's keep_scale
  const bool vec = aligned16(x) && aligned16(y);
  const int threads = 256;
  const int blocks = grid_for(vec ? (n + 7) / 8 : n, threads);
  if (accumulate)
    dropout_kernel<true><<<blocks, threads, 0, stream>>>(dev(y), dev(x), n, key, threshold,
                                                         scale, vec);
  else
    dropout_kernel<false><<<blocks, threads, 0, stream>>>(dev(y), dev(x), n, key, threshold,
                                                          scale, vec);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace ftune::cuda
