// Fused LoRA rank-r products with on-the-fly dropout (see cuda_lora.hpp). CUDA cores, not
// tensor cores: r <= 16 makes these memory-bound (one pass over x or dx), and what they
// replace was three passes plus a materialised dropout(x).
#include <type_traits>

#include "common.cuh"
#include "ftune/kernels/cuda_lora.hpp"

namespace ftune::cuda {
namespace {
using namespace detail;

constexpr int kWarps = 8;  // per block

// The 8 keep-scales of elements [i, i + 8), i a multiple of 8 (4 draws).
__device__ __forceinline__ void keep8(float (&k)[8], uint64_t seed, uint64_t i, uint64_t thr,
                                      float ks) {
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const uint64_t r = dropout_draw(seed, i / 2 + m);
    k[2 * m] = keep_bit(r, 0, thr) ? ks : 0.f;
    k[2 * m + 1] = keep_bit(r, 1, thr) ? ks : 0.f;
  }
}

// a[k][0..8) = A[k, c..c+8) for k < r, zeros for the padding ranks r..R-1.
template <int R>
__device__ __forceinline__ void load_a8(float (&a)[R][8], const __nv_bfloat16* A, int64_t in,
                                        int64_t c, int r) {
#pragma unroll
  for (int k = 0; k < R; ++k) {
    if (k < r) {
      load8(A + k * in + c, a[k]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) a[k][e] = 0.f;
    }
  }
}

// One warp per ROWS rows; lanes stride over 8-column groups; A is read through L1 once per
// ROWS rows. Then a warp reduction per output.
template <int R, int ROWS>
__global__ void down_forward_kernel(__nv_bfloat16* u, const __nv_bfloat16* x,
                                    const __nv_bfloat16* A, int64_t N, int64_t in, int r,
                                    uint64_t seed, uint64_t thr, float ks) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = blockIdx.x * int64_t(kWarps) + threadIdx.x / 32;
  const int64_t row0 = warp * ROWS;
  if (row0 >= N) return;
  float acc[ROWS][R];
#pragma unroll
  for (int j = 0; j < ROWS; ++j)
#pragma unroll
    for (int k = 0; k < R; ++k) acc[j][k] = 0.f;
  for (int64_t c = lane * 8; c < in; c += 32 * 8) {
    float a[R][8];
    load_a8<R>(a, A, in, c, r);
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      const int64_t n = row0 + j;
      if (n >= N) break;
      float xv[8], kv[8];
      load8(x + n * in + c, xv);
      keep8(kv, seed, static_cast<uint64_t>(n * in + c), thr, ks);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float xm = xv[e] * kv[e];
#pragma unroll
        for (int k = 0; k < R; ++k) acc[j][k] = fmaf(xm, a[k][e], acc[j][k]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < ROWS; ++j) {
    const int64_t n = row0 + j;
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const float v = warp_sum(acc[j][k]);
      if (lane == 0 && n < N && k < r) st(u + n * r + k, v);
    }
  }
}

// Pass 1: block (column tile of 2*blockDim columns, row chunk of kChunk rows) writes
// partial[chunk, k, c] = sum over its rows of du[n, k] * keep * x[n, c].
constexpr int kChunk = 256;
constexpr int kColThreads = 256;
template <int R>
__global__ void down_backward_partial(float* partial, const __nv_bfloat16* du,
                                      const __nv_bfloat16* x, int64_t N, int64_t in, int r,
                                      uint64_t seed, uint64_t thr, float ks) {
  __shared__ float du_s[kChunk][R];
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int rows = static_cast<int>(N - n0 < kChunk ? N - n0 : kChunk);
  for (int t = threadIdx.x; t < rows * R; t += blockDim.x) {
    const int n = t / R, k = t % R;
    du_s[n][k] = k < r ? ld(du + (n0 + n) * r + k) : 0.f;
  }
  __syncthreads();
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x) * 2;
  if (c >= in) return;
  float acc[R][2];
#pragma unroll
  for (int k = 0; k < R; ++k) acc[k][0] = acc[k][1] = 0.f;
  for (int n = 0; n < rows; ++n) {
    const int64_t i = (n0 + n) * in + c;  // even: in and c are even
    const __nv_bfloat162 xv = *reinterpret_cast<const __nv_bfloat162*>(x + i);
    const uint64_t d = dropout_draw(seed, static_cast<uint64_t>(i) / 2);
    const float x0 = keep_bit(d, 0, thr) ? __low2float(xv) * ks : 0.f;
    const float x1 = keep_bit(d, 1, thr) ? __high2float(xv) * ks : 0.f;
#pragma unroll
    for (int k = 0; k < R; ++k) {
      acc[k][0] = fmaf(du_s[n][k], x0, acc[k][0]);
      acc[k][1] = fmaf(du_s[n][k], x1, acc[k][1]);
    }
  }
  float* out = partial + static_cast<int64_t>(blockIdx.y) * r * in;
  for (int k = 0; k < r; ++k) {
    out[k * in + c] = acc[k][0];
    out[k * in + c + 1] = acc[k][1];
  }
}

// Pass 2: dA[k, c] += alpha * sum over chunks (in chunk order) of partial.
__global__ void down_backward_reduce(float* dA, const float* partial, int chunks, int64_t m,
                                     float alpha) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < m;
       i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int ch = 0; ch < chunks; ++ch) s += partial[ch * m + i];
    dA[i] += alpha * s;
  }
}

// dx[n, c..c+8) += keep * sum_k du[n, k] A[k, c..c+8). A thread owns one 8-column group
// (its A slice stays in registers) for kDxRows rows; a warp covers 256 adjacent columns of
// one row, so dx moves in 512-byte runs and du[n, :] is a broadcast.
constexpr int kDxRows = 64;
constexpr int kDxThreads = 128;
template <int R>
__global__ void dx_backward_kernel(__nv_bfloat16* dx, const __nv_bfloat16* du,
                                   const __nv_bfloat16* A, int64_t N, int64_t in, int r,
                                   uint64_t seed, uint64_t thr, float ks) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kDxThreads + threadIdx.x) * 8;
  if (c >= in) return;
  float a[R][8];
  load_a8<R>(a, A, in, c, r);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kDxRows;
  const int64_t n1 = N < n0 + kDxRows ? N : n0 + kDxRows;
  for (int64_t n = n0; n < n1; ++n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const float d = k < r ? ld(du + n * r + k) : 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = fmaf(d, a[k][e], acc[e]);
    }
    float kv[8], y[8];
    keep8(kv, seed, static_cast<uint64_t>(n * in + c), thr, ks);
    load8(dx + n * in + c, y);
#pragma unroll
    for (int e = 0; e < 8; ++e) y[e] += kv[e] * acc[e];
    store8(dx + n * in + c, y);
  }
}

// The dropout mask of dropout_apply: keep threshold and keep scale 1 / (1 - p).
struct Mask {
  uint64_t thr;
  float ks;
};

// Validates a launch (throws on what the kernels do not support) and returns its mask.
Mask checked_mask(int64_t r, int64_t in, double p, const void* x, const void* A) {
  if (!lora_fused_supported(r, in, x, A))
    throw CudaError("fused LoRA kernels: r = " + std::to_string(r) + ", in = " +
                    std::to_string(in) + " not supported (r <= 16, in % 8 == 0, 16-byte aligned)");
  if (!(p >= 0.0 && p < 1.0)) throw CudaError("fused LoRA kernels: p must be in [0, 1)");
  return {dropout_threshold(p), p > 0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.f};
}

// f(std::integral_constant<int, R>) with the kernels' register tile R: 8 for r <= 8, else 16.
template <class F>
void with_rank_tile(int64_t r, F&& f) {
  if (r <= 8)
    f(std::integral_constant<int, 8>{});
  else
    f(std::integral_constant<int, 16>{});
}

}  // namespace

bool lora_fused_supported(int64_t r, int64_t in, const void* x, const void* A) {
  return r >= 1 && r <= 16 && in > 0 && in % 8 == 0 && aligned16(x) && aligned16(A);
}

void lora_down_forward(bf16* u, const bf16* x, const bf16* A, int64_t N, int64_t in, int64_t r,
                       double p, uint64_t seed, stream_t stream) {
  const Mask m = checked_mask(r, in, p, x, A);
  if (N <= 0) return;
  with_rank_tile(r, [&](auto tile) {
    constexpr int R = decltype(tile)::value, ROWS = 32 / R;  // 32 accumulators per lane
    const unsigned blocks = static_cast<unsigned>((N + kWarps * ROWS - 1) / (kWarps * ROWS));
    down_forward_kernel<R, ROWS><<<blocks, kWarps * 32, 0, stream>>>(
        dev(u), dev(x), dev(A), N, in, static_cast<int>(r), seed, m.thr, m.ks);
  });
  FTUNE_CUDA_LAUNCH_CHECK();
}

int64_t lora_down_backward_workspace(int64_t N, int64_t in, int64_t r) {
  return (N + kChunk - 1) / kChunk * r * in;
}

void lora_down_backward(float* dA, const bf16* du, const bf16* x, int64_t N, int64_t in,
                        int64_t r, double p, uint64_t seed, float alpha, float* workspace,
                        stream_t stream) {
  const Mask m = checked_mask(r, in, p, x, x);
  if (N <= 0) return;
  const int chunks = static_cast<int>((N + kChunk - 1) / kChunk);
  const dim3 grid(static_cast<unsigned>((in / 2 + kColThreads - 1) / kColThreads),
                  static_cast<unsigned>(chunks));
  with_rank_tile(r, [&](auto tile) {
    down_backward_partial<decltype(tile)::value><<<grid, kColThreads, 0, stream>>>(
        workspace, dev(du), dev(x), N, in, static_cast<int>(r), seed, m.thr, m.ks);
  });
  FTUNE_CUDA_LAUNCH_CHECK();
  const int64_t n = r * in;
  down_backward_reduce<<<grid_for(n, 256), 256, 0, stream>>>(dA, workspace, chunks, n, alpha);
  FTUNE_CUDA_LAUNCH_CHECK();
}

void lora_dx_backward(bf16* dx, const bf16* du, const bf16* A, int64_t N, int64_t in, int64_t r,
                      double p, uint64_t seed, stream_t stream) {
  const Mask m = checked_mask(r, in, p, dx, A);
  if (N <= 0) return;
  const dim3 grid(static_cast<unsigned>((in / 8 + kDxThreads - 1) / kDxThreads),
                  static_cast<unsigned>((N + kDxRows - 1) / kDxRows));
  with_rank_tile(r, [&](auto tile) {
    dx_backward_kernel<decltype(tile)::value><<<grid, kDxThreads, 0, stream>>>(
        dev(dx), dev(du), dev(A), N, in, static_cast<int>(r), seed, m.thr, m.ks);
  });
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace ftune::cuda
