// Fused LoRA rank-r products with on-the-fly dropout (see cuda_lora.hpp). CUDA cores, not
// tensor cores: r <= 16 makes these memory-bound (one pass over x, dx or y). Each kernel is
// shaped so that the big operand streams in 16-byte loads with several rows in flight per
// thread, and the small one (A, B, u, du) is read from registers or shared memory: the first
// versions re-read A through L1 for every 4 rows and reached 0.55-0.9 TB/s on an H200.
#include <type_traits>

#include "common.cuh"
#include "ftune/kernels/cuda_lora.hpp"

namespace ftune::cuda {
namespace {
using namespace detail;

// The dropout mask of dropout_apply over flat indices, and whether to evaluate it at all
// (p == 0 skips the hash).
struct Mask {
  uint32_t key, thr;
  float ks;
};

// keep-scales k[e] of elements [i, i + W), i a multiple of W (W even: W / 2 draws).
template <int W, bool DROP>
__device__ __forceinline__ void keep_scales(float (&k)[W], const Mask& m, uint64_t i) {
#pragma unroll
  for (int j = 0; j < W / 2; ++j) {
    if constexpr (DROP) {
      const uint32_t d = dropout_draw(m.key, i / 2 + j);
      k[2 * j] = keep_bit(d, 0, m.thr) ? m.ks : 0.f;
      k[2 * j + 1] = keep_bit(d, 1, m.thr) ? m.ks : 0.f;
    } else {
      k[2 * j] = k[2 * j + 1] = 1.f;
    }
  }
}

// W consecutive bf16 (W = 2, 4 or 8: one 4-, 8- or 16-byte access) as raw bits, and to floats.
template <int W>
using Raw = std::conditional_t<W == 8, uint4, std::conditional_t<W == 4, uint2, uint32_t>>;
template <int W>
__device__ __forceinline__ Raw<W> load_raw(const __nv_bfloat16* p) {
  return *reinterpret_cast<const Raw<W>*>(p);
}
template <int W>
__device__ __forceinline__ void to_floats(const Raw<W>& raw, float (&v)[W]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int j = 0; j < W / 2; ++j) {
    const float2 f = __bfloat1622float2(h[j]);
    v[2 * j] = f.x;
    v[2 * j + 1] = f.y;
  }
}

template <int W>
__device__ __forceinline__ void load_floats(const __nv_bfloat16* p, float (&v)[W]) {
  to_floats<W>(load_raw<W>(p), v);
}
template <int W>
__device__ __forceinline__ void store_floats(__nv_bfloat16* p, const float (&v)[W]) {
  Raw<W> raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int j = 0; j < W / 2; ++j) h[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
  *reinterpret_cast<Raw<W>*>(p) = raw;
}

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

// d[k] = v[n, k] for k < r, zeros for the padding ranks (one 16-byte load per 8 when r == R).
template <int R>
__device__ __forceinline__ void load_rank_row(float (&d)[R], const __nv_bfloat16* v, int64_t n,
                                              int r) {
  if (r == R) {
#pragma unroll
    for (int k = 0; k < R; k += 8) {
      float t[8];
      load8(v + n * R + k, t);
#pragma unroll
      for (int e = 0; e < 8; ++e) d[k + e] = t[e];
    }
  } else {
#pragma unroll
    for (int k = 0; k < R; ++k) d[k] = k < r ? ld(v + n * r + k) : 0.f;
  }
}

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
constexpr int kUpRows = 32;
constexpr int kUpThreads = 128;
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

// ---------------------------------------------------------------- y += scale u B^T
// The forward's LoRA term. A thread owns one 8-column group (its slice of B^T in registers)
// for kUpRows rows, kUpUnroll rows of y in flight; a warp covers 256 adjacent columns of one
// row, so y moves in 512-byte runs and u[n, :] is a broadcast. y is read in bf16, the sum
// added in fp32, rounded once.
// a[k][e] = B[c + e, k] for k < r, zeros for the padding ranks (B [cols, r] row-major; vec:
// B's rows may be read in 16-byte loads).
template <int R>
__device__ __forceinline__ void load_slice(float (&a)[R][8], const __nv_bfloat16* B, int64_t c,
                                           int r, bool vec) {
  if (r == R && vec) {
#pragma unroll
    for (int e = 0; e < 8; ++e)
#pragma unroll
      for (int k = 0; k < R; k += 8) {
        float t[8];
        load8(B + (c + e) * R + k, t);
#pragma unroll
        for (int q = 0; q < 8; ++q) a[k + q][e] = t[q];
      }
    return;
  }
#pragma unroll
  for (int k = 0; k < R; ++k)
#pragma unroll
    for (int e = 0; e < 8; ++e) a[k][e] = k < r ? ld(B + (c + e) * r + k) : 0.f;
}

constexpr int kUpUnroll = 4;
template <int R>
__global__ void __launch_bounds__(kUpThreads)
    up_forward_kernel(__nv_bfloat16* y, const __nv_bfloat16* u, const __nv_bfloat16* B,
                      int64_t N, int64_t cols, int r, float alpha, bool b_vec) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kUpThreads + threadIdx.x) * 8;
  if (c >= cols) return;
  float a[R][8];
  load_slice<R>(a, B, c, r, b_vec);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kUpRows;
  const int64_t n1 = N < n0 + kUpRows ? N : n0 + kUpRows;
  for (int64_t n = n0; n < n1; n += kUpUnroll) {
    uint4 yr[kUpUnroll];
#pragma unroll
    for (int j = 0; j < kUpUnroll; ++j)
      if (n + j < n1) yr[j] = load_raw<8>(y + (n + j) * cols + c);
#pragma unroll
    for (int j = 0; j < kUpUnroll; ++j) {
      if (n + j >= n1) break;
      float d[R], acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      load_rank_row<R>(d, u, n + j, r);
#pragma unroll
      for (int k = 0; k < R; ++k)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = fmaf(d[k], a[k][e], acc[e]);
      float out[8];
      to_floats<8>(yr[j], out);
#pragma unroll
      for (int e = 0; e < 8; ++e) out[e] += alpha * acc[e];
      store8(y + (n + j) * cols + c, out);
    }
  }
}

// ---------------------------------------------------------------- gate/up LoRA + SwiGLU
// gate += scale u_g B_g^T and up += scale u_u B_u^T (each rounded to bf16 once and written
// back: the backward reads them), then h = silu(gate) up from the rounded values, exactly as
// up_forward_kernel twice followed by swiglu_forward, in one pass over gate and up instead of
// three. Rank tile 8 only (two B slices live in registers). KEEP = false skips writing gate
// and up back (a checkpointed forward whose backward recomputes them needs h alone).
constexpr int kSwiRows = 32;
template <bool KEEP>
__global__ void __launch_bounds__(kUpThreads)
    swiglu_up_kernel(__nv_bfloat16* h, __nv_bfloat16* gate, __nv_bfloat16* up,
                     const __nv_bfloat16* ug, const __nv_bfloat16* uu, const __nv_bfloat16* Bg,
                     const __nv_bfloat16* Bu, int64_t N, int64_t I, int r, float alpha, bool vec) {
  constexpr int R = 8;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kUpThreads + threadIdx.x) * 8;
  if (c >= I) return;
  float ag[R][8], au[R][8];
  load_slice<R>(ag, Bg, c, r, vec);
  load_slice<R>(au, Bu, c, r, vec);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSwiRows;
  const int64_t n1 = N < n0 + kSwiRows ? N : n0 + kSwiRows;
  for (int64_t n = n0; n < n1; n += 2) {
    uint4 gr[2], ur[2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
      if (n + j < n1) {
        gr[j] = load_raw<8>(gate + (n + j) * I + c);
        ur[j] = load_raw<8>(up + (n + j) * I + c);
      }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (n + j >= n1) break;
      float dg[R], du[R], g[8], u[8], hv[8];
      load_rank_row<R>(dg, ug, n + j, r);
      load_rank_row<R>(du, uu, n + j, r);
      to_floats<8>(gr[j], g);
      to_floats<8>(ur[j], u);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float accg = 0.f, accu = 0.f;
#pragma unroll
        for (int k = 0; k < R; ++k) {
          accg = fmaf(dg[k], ag[k][e], accg);
          accu = fmaf(du[k], au[k][e], accu);
        }
        g[e] = __bfloat162float(__float2bfloat16_rn(g[e] + alpha * accg));
        u[e] = __bfloat162float(__float2bfloat16_rn(u[e] + alpha * accu));
        hv[e] = g[e] / (1.f + expf(-g[e])) * u[e];
      }
      if constexpr (KEEP) {
        store8(gate + (n + j) * I + c, g);
        store8(up + (n + j) * I + c, u);
      }
      store8(h + (n + j) * I + c, hv);
    }
  }
}

// Validates a launch (throws on what the kernels do not support) and returns its mask. v is
// the [N, r] operand (u or du), read in 16-byte rows when r fills the register tile.
Mask checked_mask(int64_t r, int64_t in, double p, uint64_t seed, const void* x, const void* A,
                  const void* v) {
  if (!lora_fused_supported(r, in, x, A) || !aligned16(v))
    throw CudaError("fused LoRA kernels: r = " + std::to_string(r) + ", in = " +
                    std::to_string(in) + " not supported (r <= 16, in % 8 == 0, 16-byte aligned)");
  if (!(p >= 0.0 && p < 1.0)) throw CudaError("fused LoRA kernels: p must be in [0, 1)");
  return {dropout_key(seed), dropout_threshold(p), p > 0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.f};
}

// f(std::integral_constant<int, R>, std::bool_constant<DROP>) with the kernels' register
// tile R (8 for r <= 8, else 16) and whether a mask is drawn (p > 0).
template <class F>
void dispatch(int64_t r, double p, F&& f) {
  auto with_drop = [&](auto tile) {
    if (p > 0)
      f(tile, std::true_type{});
    else
      f(tile, std::false_type{});
  };
  if (r <= 8)
    with_drop(std::integral_constant<int, 8>{});
  else
    with_drop(std::integral_constant<int, 16>{});
}

unsigned rows_grid(int64_t N, int rows) { return static_cast<unsigned>((N + rows - 1) / rows); }

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

void lora_up_forward(bf16* y, const bf16* u, const bf16* B, int64_t N, int64_t out, int64_t r,
                     float scale, stream_t stream) {
  checked_mask(r, out, 0.0, 0, y, y, u);  // B is read in scalars where misaligned
  if (N <= 0) return;
  const dim3 grid(static_cast<unsigned>((out / 8 + kUpThreads - 1) / kUpThreads), rows_grid(N, kUpRows));
  dispatch(r, 0.0, [&](auto tile, auto) {
    up_forward_kernel<decltype(tile)::value><<<grid, kUpThreads, 0, stream>>>(
        dev(y), dev(u), dev(B), N, out, static_cast<int>(r), scale, aligned16(B));
  });
  FTUNE_CUDA_LAUNCH_CHECK();
}

bool lora_swiglu_supported(int64_t r, int64_t I, const void* gate, const void* up,
                           const void* h, const void* ug, const void* uu) {
  return r >= 1 && r <= 8 && I > 0 && I % 8 == 0 && aligned16(gate) && aligned16(up) &&
         aligned16(h) && aligned16(ug) && aligned16(uu);
}

void lora_swiglu_forward(bf16* h, bf16* gate, bf16* up, const bf16* u_gate, const bf16* u_up,
                         const bf16* B_gate, const bf16* B_up, int64_t N, int64_t I, int64_t r,
                         float scale, stream_t stream, bool keep_gate_up) {
  if (!lora_swiglu_supported(r, I, gate, up, h, u_gate, u_up))
    throw CudaError("lora_swiglu_forward: r = " + std::to_string(r) + ", I = " +
                    std::to_string(I) + " not supported (r <= 8, I % 8 == 0, 16-byte aligned)");
  if (N <= 0) return;
  const dim3 grid(static_cast<unsigned>((I / 8 + kUpThreads - 1) / kUpThreads), rows_grid(N, kSwiRows));
  auto kern = keep_gate_up ? swiglu_up_kernel<true> : swiglu_up_kernel<false>;
  kern<<<grid, kUpThreads, 0, stream>>>(dev(h), dev(gate), dev(up), dev(u_gate), dev(u_up),
                                        dev(B_gate), dev(B_up), N, I, static_cast<int>(r), scale,
                                        aligned16(B_gate) && aligned16(B_up));
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace ftune::cuda
