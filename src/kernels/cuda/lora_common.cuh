#pragma once
// Shared by the fused LoRA kernels (lora.cu: products with A; lora_up.cu: products with B
// and the passes they are folded into): the dropout mask as the kernels draw it, 16-byte
// row loads and stores, the rank-r operand loaders, launch checks and the tile dispatch.
// CUDA-side header (src/kernels/cuda only).
#include <string>
#include <type_traits>

#include "common.cuh"
#include "ftune/kernels/cuda_lora.hpp"

namespace ftune::cuda::lora_detail {
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

// ---------------------------------------------------------------- y += scale u B^T
// The forward's LoRA term. A thread owns one 8-column group (its slice of B^T in registers)
// for kUpRows rows, kUpUnroll rows of y in flight; a warp covers 256 adjacent columns of one
// row, so y moves in 512-byte runs and u[n, :] is a broadcast. y is read in bf16, the sum
// added in fp32, rounded once.
// acc[e] = sum over k (ascending) of d[k] a[k][e]: one row's rank-R product with a slice.
template <int R, int W>
__device__ __forceinline__ void rank_dot(float (&acc)[W], const float (&d)[R],
                                         const float (&a)[R][W]) {
#pragma unroll
  for (int e = 0; e < W; ++e) acc[e] = 0.f;
#pragma unroll
  for (int k = 0; k < R; ++k)
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] = fmaf(d[k], a[k][e], acc[e]);
}

// a[k][e] = B[c + e, k] for e < W, k < r, zeros for the padding ranks (B [cols, r]
// row-major; vec: B's rows may be read in 16-byte loads).
template <int R, int W = 8>
__device__ __forceinline__ void load_slice(float (&a)[R][W], const __nv_bfloat16* B, int64_t c,
                                           int r, bool vec) {
  if (r == R && vec) {
#pragma unroll
    for (int e = 0; e < W; ++e)
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
    for (int e = 0; e < W; ++e) a[k][e] = k < r ? ld(B + (c + e) * r + k) : 0.f;
}

// Rows a column-owning block walks (the B slice, or A slice, stays in registers) and its
// threads.
constexpr int kUpRows = 32;
constexpr int kUpThreads = 128;

// the [N, r] operand (u or du), read in 16-byte rows when r fills the register tile.
inline Mask checked_mask(int64_t r, int64_t in, double p, uint64_t seed, const void* x, const void* A,
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

inline unsigned rows_grid(int64_t N, int rows) { return static_cast<unsigned>((N + rows - 1) / rows); }

}  // namespace ftune::cuda::lora_detail
