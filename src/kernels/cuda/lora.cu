// Fused LoRA rank-r products with on-the-fly dropout (see cuda_lora.hpp). CUDA cores, not
// tensor cores: r <= 16 makes these memory-bound (one pass over x, dx or y). Each kernel is
// shaped so that the big operand streams in 16-byte loads with several rows in flight per
// thread, and the small one (A, B, u, du) is read from registers or shared memory: the first
// versions re-read A through L1 for every 4 rows and reached 0.55-0.9 TB/s on an H200.
#include <type_traits>

#include "lora_common.cuh"

namespace ftune::cuda {
namespace {
using namespace lora_detail;

// The projections of one backward launch: P of them (q/k/v or gate/up: P <= 3) read the same
// x [N, in] (or update the same dx), each with its own A [r, in], mask, du [N, r] and dA.
// One pass over x (dx) serves them all; P = 1 is the single-projection launch. Unused fields
// stay null.
template <int P>
struct Group {
  static constexpr int kP = P;
  const __nv_bfloat16* A[P];  // [r, in]
  const __nv_bfloat16* v[P];  // du [N, r]
  float* part[P];             // dA partial sums [chunks, r, in]
  float* dA[P];               // [r, in] fp32
  Mask m[P];
};

// ---------------------------------------------------------------- u = (keep x) A^T
// A block of 8 warps owns 8 * ROWS rows; A is staged in shared memory kFwdCols columns at a
// time and shared by the block; lanes stride over 8-column groups with ROWS 16-byte loads of
// x in flight; one warp reduction per output at the end.
constexpr int kFwdWarps = 8;
constexpr int kFwdCols = 1024;
template <int R, int ROWS, bool DROP>
__global__ void __launch_bounds__(kFwdWarps * 32, 2)
    down_forward_kernel(__nv_bfloat16* u, const __nv_bfloat16* x, const __nv_bfloat16* A,
                        int64_t N, int64_t in, int r, Mask m) {
  __shared__ __align__(16) __nv_bfloat16 a_s[R][kFwdCols];
  const int lane = threadIdx.x & 31;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kFwdWarps + threadIdx.x / 32) * ROWS;
  float acc[ROWS][R];
#pragma unroll
  for (int j = 0; j < ROWS; ++j)
#pragma unroll
    for (int k = 0; k < R; ++k) acc[j][k] = 0.f;
  for (int64_t c0 = 0; c0 < in; c0 += kFwdCols) {
    const int width = static_cast<int>(in - c0 < kFwdCols ? in - c0 : kFwdCols);  // % 8 == 0
    __syncthreads();  // the previous chunk's readers are done
    for (int t = threadIdx.x; t < R * (kFwdCols / 8); t += blockDim.x) {
      const int k = t / (kFwdCols / 8), g = (t % (kFwdCols / 8)) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (k < r && g < width) v = *reinterpret_cast<const uint4*>(A + k * in + c0 + g);
      *reinterpret_cast<uint4*>(&a_s[k][g]) = v;
    }
    __syncthreads();
    if (row0 >= N) continue;  // no early return: the block's barriers need every thread
    for (int cc = lane * 8; cc < width; cc += 32 * 8) {
      const int64_t c = c0 + cc;
      uint4 xr[ROWS];
#pragma unroll
      for (int j = 0; j < ROWS; ++j)
        xr[j] = row0 + j < N ? load_raw<8>(x + (row0 + j) * in + c) : make_uint4(0, 0, 0, 0);
      float a[R][8];
#pragma unroll
      for (int k = 0; k < R; ++k) load8(&a_s[k][cc], a[k]);
#pragma unroll
      for (int j = 0; j < ROWS; ++j) {
        float xv[8], kv[8];
        to_floats<8>(xr[j], xv);
        keep_scales<8, DROP>(kv, m, static_cast<uint64_t>((row0 + j) * in + c));
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float xm = xv[e] * kv[e];
#pragma unroll
          for (int k = 0; k < R; ++k) acc[j][k] = fmaf(xm, a[k][e], acc[j][k]);
        }
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

// ---------------------------------------------------------------- dA += du^T (keep x)
// Pass 1: block (column tile of kBwdThreads * W columns, chunk of kBwdRows rows) writes, per
// projection q, part_q[chunk, k, c] = sum over its rows of du_q[n, k] * keep_q * x[n, c]; a
// thread owns W columns and keeps kBwdUnroll rows of x in flight. Pass 2 adds the chunks in
// order, so the sum never depends on scheduling, nor on W or the group (same bits for P = 1).
constexpr int kBwdRows = 128;
constexpr int kBwdThreads = 64;
constexpr int kBwdUnroll = 8;
// Columns per thread: at most 64-96 accumulators (P * R * W).
template <int R, int P>
__host__ __device__ constexpr int bwd_cols() { return R * P <= 8 ? 8 : R * P <= 24 ? 4 : 2; }
template <int R, int P, bool DROP>
__global__ void __launch_bounds__(kBwdThreads)
    down_backward_partial(Group<P> g, const __nv_bfloat16* x, int64_t N, int64_t in, int r) {
  constexpr int W = bwd_cols<R, P>();
  __shared__ float du_s[kBwdRows][P][R];
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBwdRows;
  const int rows = static_cast<int>(N - n0 < kBwdRows ? N - n0 : kBwdRows);
#pragma unroll
  for (int q = 0; q < P; ++q)
    for (int t = threadIdx.x; t < rows * R; t += blockDim.x) {
      const int n = t / R, k = t % R;
      du_s[n][q][k] = k < r ? ld(g.v[q] + (n0 + n) * r + k) : 0.f;
    }
  __syncthreads();
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kBwdThreads + threadIdx.x) * W;
  if (c >= in) return;
  float acc[P][R][W];
#pragma unroll
  for (int q = 0; q < P; ++q)
#pragma unroll
    for (int k = 0; k < R; ++k)
#pragma unroll
      for (int e = 0; e < W; ++e) acc[q][k][e] = 0.f;
  for (int n = 0; n < rows; n += kBwdUnroll) {
    Raw<W> xr[kBwdUnroll];
#pragma unroll
    for (int j = 0; j < kBwdUnroll; ++j)
      if (n + j < rows) xr[j] = load_raw<W>(x + (n0 + n + j) * in + c);
#pragma unroll
    for (int j = 0; j < kBwdUnroll; ++j) {
      if (n + j >= rows) break;
      float xv[W];
      to_floats<W>(xr[j], xv);
#pragma unroll
      for (int q = 0; q < P; ++q) {
        float kv[W], xm[W];
        keep_scales<W, DROP>(kv, g.m[q], static_cast<uint64_t>((n0 + n + j) * in + c));
#pragma unroll
        for (int e = 0; e < W; ++e) xm[e] = xv[e] * kv[e];
#pragma unroll
        for (int k = 0; k < R; ++k) {
          const float d = du_s[n + j][q][k];
#pragma unroll
          for (int e = 0; e < W; ++e) acc[q][k][e] = fmaf(d, xm[e], acc[q][k][e]);
        }
      }
    }
  }
#pragma unroll
  for (int q = 0; q < P; ++q) {
    float* out = g.part[q] + static_cast<int64_t>(blockIdx.y) * r * in;
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (k >= r) break;
#pragma unroll
      for (int e = 0; e < W; e += 2)
        *reinterpret_cast<float2*>(out + k * in + c + e) = make_float2(acc[q][k][e], acc[q][k][e + 1]);
    }
  }
}

// Pass 2: dA_q[k, c] += alpha * sum over chunks (in chunk order) of part_q (q = blockIdx.y).
template <int P>
__global__ void down_backward_reduce(Group<P> g, int chunks, int64_t m, float alpha) {
  const float* partial = g.part[0];
  float* dA = g.dA[0];
#pragma unroll
  for (int q = 1; q < P; ++q)
    if (blockIdx.y == q) partial = g.part[q], dA = g.dA[q];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < m;
       i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int ch = 0; ch < chunks; ++ch) s += partial[ch * m + i];
    dA[i] += alpha * s;
  }
}

// ---------------------------------------------------------------- dx += sum_q keep_q (du_q A_q)
// The input gradient of the P projections in one read-modify-write of dx, the LoRA terms
// summed in fp32 and rounded once. A thread owns one CW-column group (its slices of every
// A_q in registers: CW = 8 for one projection, 4 for a group) for kUpRows rows, U rows of dx
// in flight; a warp covers 32 * CW adjacent columns of one row, so dx moves in 256-512-byte
// runs and du_q[n, :] is a broadcast.
template <int R, int P, bool DROP>
__global__ void __launch_bounds__(kUpThreads, R * P <= 8 ? 4 : R == 8 ? 3 : 1)  // r <= 8: 4 / 3 blocks per SM
    dx_kernel(__nv_bfloat16* dx, Group<P> g, int64_t N, int64_t cols, int r) {
  constexpr int CW = P == 1 ? 8 : 4, U = P == 1 ? 4 : 8;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kUpThreads + threadIdx.x) * CW;
  if (c >= cols) return;
  float a[P][R][CW];
#pragma unroll
  for (int q = 0; q < P; ++q)
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (k < r) {
        load_floats<CW>(g.A[q] + k * cols + c, a[q][k]);
      } else {
#pragma unroll
        for (int e = 0; e < CW; ++e) a[q][k][e] = 0.f;
      }
    }
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kUpRows;
  const int64_t n1 = N < n0 + kUpRows ? N : n0 + kUpRows;
  for (int64_t n = n0; n < n1; n += U) {
    Raw<CW> yr[U];
#pragma unroll
    for (int j = 0; j < U; ++j)
      if (n + j < n1) yr[j] = load_raw<CW>(dx + (n + j) * cols + c);
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (n + j >= n1) break;
      float out[CW], lora[CW];
#pragma unroll
      for (int e = 0; e < CW; ++e) lora[e] = 0.f;
#pragma unroll
      for (int q = 0; q < P; ++q) {
        float d[R], acc[CW], kv[CW];
        load_rank_row<R>(d, g.v[q], n + j, r);
#pragma unroll
        for (int e = 0; e < CW; ++e) acc[e] = 0.f;
#pragma unroll
        for (int k = 0; k < R; ++k)
#pragma unroll
          for (int e = 0; e < CW; ++e) acc[e] = fmaf(d[k], a[q][k][e], acc[e]);
        keep_scales<CW, DROP>(kv, g.m[q], static_cast<uint64_t>((n + j) * cols + c));
#pragma unroll
        for (int e = 0; e < CW; ++e) lora[e] += kv[e] * acc[e];
      }
      to_floats<CW>(yr[j], out);
#pragma unroll
      for (int e = 0; e < CW; ++e) out[e] += lora[e];
      store_floats<CW>(dx + (n + j) * cols + c, out);
    }
  }
}

}  // namespace

bool lora_fused_supported(int64_t r, int64_t in, const void* x, const void* A) {
  return r >= 1 && r <= 16 && in > 0 && in % 8 == 0 && aligned16(x) && aligned16(A);
}

namespace {
// f(Group<P>&) with the group's members filled in (A and masks; the caller adds the rest),
// after checking every member's operands: x (or dx) [N, in], A_i, and the [N, r] operand v_i.
template <class F>
void with_group(const LoraGroup& lg, const bf16* const* v, int64_t r, int64_t in, double p,
                const void* x, F&& f) {
  if (lg.count < 1 || lg.count > kLoraGroupMax)
    throw CudaError("fused LoRA kernels: a group has 1.." + std::to_string(kLoraGroupMax) +
                    " members, not " + std::to_string(lg.count));
  auto fill = [&](auto& g) {
    for (int i = 0; i < lg.count; ++i) {
      g.m[i] = checked_mask(r, in, p, lg.seed[i], x, lg.A[i] ? lg.A[i] : x, v[i]);
      g.A[i] = dev(lg.A[i]);
      g.v[i] = nullptr;
      g.part[i] = g.dA[i] = nullptr;
    }
    f(g);
  };
  if (lg.count == 1) {
    Group<1> g;
    fill(g);
  } else if (lg.count == 2) {
    Group<2> g;
    fill(g);
  } else {
    Group<3> g;
    fill(g);
  }
}
}  // namespace

int64_t lora_down_backward_workspace(int64_t N, int64_t in, int64_t r, int count) {
  return count * ((N + kBwdRows - 1) / kBwdRows) * r * in;
}

void lora_down_backward_group(const LoraGroup& lg, float* const* dA, const bf16* const* du,
                              const bf16* x, int64_t N, int64_t in, int64_t r, double p,
                              float alpha, float* workspace, stream_t stream) {
  with_group(lg, du, r, in, p, x, [&](auto& g) {
    constexpr int P = std::decay_t<decltype(g)>::kP;
    const int chunks = static_cast<int>((N + kBwdRows - 1) / kBwdRows);
    for (int i = 0; i < P; ++i) {
      g.v[i] = dev(du[i]);
      g.part[i] = workspace + i * (chunks * r * in);
      g.dA[i] = dA[i];
    }
    if (N <= 0) return;
    dispatch(r, p, [&](auto tile, auto drop) {
      constexpr int R = decltype(tile)::value, W = bwd_cols<R, P>();
      const dim3 grid(static_cast<unsigned>((in / W + kBwdThreads - 1) / kBwdThreads),
                      static_cast<unsigned>(chunks));
      down_backward_partial<R, P, decltype(drop)::value><<<grid, kBwdThreads, 0, stream>>>(
          g, dev(x), N, in, static_cast<int>(r));
    });
    FTUNE_CUDA_LAUNCH_CHECK();
    const int64_t n = r * in;
    down_backward_reduce<P><<<dim3(grid_for(n, 256), P), 256, 0, stream>>>(g, chunks, n, alpha);
    FTUNE_CUDA_LAUNCH_CHECK();
  });
}

void lora_dx_backward_group(const LoraGroup& lg, bf16* dx, const bf16* const* du, int64_t N,
                            int64_t in, int64_t r, double p, stream_t stream) {
  with_group(lg, du, r, in, p, dx, [&](auto& g) {
    constexpr int P = std::decay_t<decltype(g)>::kP;
    for (int i = 0; i < P; ++i) g.v[i] = dev(du[i]);
    if (N <= 0) return;
    constexpr int CW = P == 1 ? 8 : 4;
    const dim3 grid(static_cast<unsigned>((in / CW + kUpThreads - 1) / kUpThreads),
                    rows_grid(N, kUpRows));
    dispatch(r, p, [&](auto tile, auto drop) {
      dx_kernel<decltype(tile)::value, P, decltype(drop)::value>
          <<<grid, kUpThreads, 0, stream>>>(dev(dx), g, N, in, static_cast<int>(r));
    });
    FTUNE_CUDA_LAUNCH_CHECK();
  });
}

void lora_down_forward(bf16* u, const bf16* x, const bf16* A, int64_t N, int64_t in, int64_t r,
                       double p, uint64_t seed, stream_t stream) {
  const Mask m = checked_mask(r, in, p, seed, x, A, u);
  if (N <= 0) return;
  dispatch(r, p, [&](auto tile, auto drop) {
    constexpr int R = decltype(tile)::value, ROWS = 32 / R;  // 32 accumulators per lane
    down_forward_kernel<R, ROWS, decltype(drop)::value>
        <<<rows_grid(N, kFwdWarps * ROWS), kFwdWarps * 32, 0, stream>>>(
            dev(u), dev(x), dev(A), N, in, static_cast<int>(r), m);
  });
  FTUNE_CUDA_LAUNCH_CHECK();
}

void lora_down_backward(float* dA, const bf16* du, const bf16* x, int64_t N, int64_t in,
                        int64_t r, double p, uint64_t seed, float alpha, float* workspace,
                        stream_t stream) {
  lora_down_backward_group(LoraGroup{1, {nullptr}, {seed}}, &dA, &du, x, N, in, r, p, alpha,
                           workspace, stream);
}

void lora_dx_backward(bf16* dx, const bf16* du, const bf16* A, int64_t N, int64_t in, int64_t r,
                      double p, uint64_t seed, stream_t stream) {
  lora_dx_backward_group(LoraGroup{1, {A}, {seed}}, dx, &du, N, in, r, p, stream);
}

}  // namespace ftune::cuda
