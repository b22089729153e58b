// The forward's LoRA products with B (see cuda_lora.hpp): y += scale u B^T on its own, or
// folded into the pass that reads y next (SwiGLU, RoPE, the residual add), so y is not read
// and written once more just for its LoRA term. A thread owns 8 (or 4) columns, their B
// slice in registers, for kUpRows rows; the roundings are those of the separate passes.
#include "lora_common.cuh"

namespace ftune::cuda {
namespace {
using namespace lora_detail;

constexpr int kUpUnroll = 4;
// y [N, cols] += alpha u B^T (RES = false), or, folded into the residual add that follows the
// projection (RES = true), out = resid + (y + alpha u B^T) with y left as it was: the same two
// roundings as this kernel then residual_add, one pass instead of two.
template <int R, bool RES>
__global__ void __launch_bounds__(kUpThreads)
    up_forward_kernel(__nv_bfloat16* out, const __nv_bfloat16* resid, const __nv_bfloat16* y,
                      const __nv_bfloat16* u, const __nv_bfloat16* B, int64_t N, int64_t cols,
                      int r, float alpha, bool b_vec) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kUpThreads + threadIdx.x) * 8;
  if (c >= cols) return;
  float a[R][8];
  load_slice<R>(a, B, c, r, b_vec);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kUpRows;
  const int64_t n1 = N < n0 + kUpRows ? N : n0 + kUpRows;
  for (int64_t n = n0; n < n1; n += kUpUnroll) {
    uint4 yr[kUpUnroll], rr[kUpUnroll];
#pragma unroll
    for (int j = 0; j < kUpUnroll; ++j)
      if (n + j < n1) {
        yr[j] = load_raw<8>(y + (n + j) * cols + c);
        if constexpr (RES) rr[j] = load_raw<8>(resid + (n + j) * cols + c);
      }
#pragma unroll
    for (int j = 0; j < kUpUnroll; ++j) {
      if (n + j >= n1) break;
      float d[R], acc[8];
      load_rank_row<R>(d, u, n + j, r);
      rank_dot(acc, d, a);
      float v[8];
      to_floats<8>(yr[j], v);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = fmaf(alpha, acc[e], v[e]);
      if constexpr (RES) {
        float x[8];
        to_floats<8>(rr[j], x);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = x[e] + __bfloat162float(__float2bfloat16_rn(v[e]));
      }
      store8(out + (n + j) * cols + c, v);
    }
  }
}

// ---------------------------------------------------------------- q/k LoRA + RoPE
// x [N, heads * 2 half] in place: x = rope(x + alpha u B^T), rounded as up_forward_kernel then
// rope_forward. RoPE pairs column i of a head with i + half, so a thread owns columns
// i..i+3 and i+half..i+half+3 of one head (both B slices in registers; rank tile 8).
__global__ void __launch_bounds__(kUpThreads)
    up_rope_kernel(__nv_bfloat16* x, const __nv_bfloat16* u, const __nv_bfloat16* B,
                   const float* cos, const float* sin, const int32_t* positions, int64_t N,
                   int64_t heads, int64_t half, int r, float alpha, bool b_vec) {
  constexpr int R = 8;
  const int64_t grp = static_cast<int64_t>(blockIdx.x) * kUpThreads + threadIdx.x;
  const int64_t per_head = half / 4;
  if (grp >= heads * per_head) return;
  const int64_t i = (grp % per_head) * 4, c1 = (grp / per_head) * 2 * half + i, c2 = c1 + half;
  const int64_t cols = heads * 2 * half;
  float a1[R][4], a2[R][4];
  load_slice<R, 4>(a1, B, c1, r, b_vec);
  load_slice<R, 4>(a2, B, c2, r, b_vec);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kUpRows;
  const int64_t n1 = N < n0 + kUpRows ? N : n0 + kUpRows;
  for (int64_t n = n0; n < n1; n += 2) {
    uint2 xr1[2], xr2[2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
      if (n + j < n1) {
        xr1[j] = load_raw<4>(x + (n + j) * cols + c1);
        xr2[j] = load_raw<4>(x + (n + j) * cols + c2);
      }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (n + j >= n1) break;
      float d[R], acc1[4], acc2[4];
      load_rank_row<R>(d, u, n + j, r);
      rank_dot(acc1, d, a1);
      rank_dot(acc2, d, a2);
      float v1[4], v2[4], o1[4], o2[4];
      to_floats<4>(xr1[j], v1);
      to_floats<4>(xr2[j], v2);
      const int64_t t = static_cast<int64_t>(positions[n + j]) * half + i;
      const float4 cs = *reinterpret_cast<const float4*>(cos + t);
      const float4 sn = *reinterpret_cast<const float4*>(sin + t);
      const float cv[4] = {cs.x, cs.y, cs.z, cs.w}, sv[4] = {sn.x, sn.y, sn.z, sn.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float a = __bfloat162float(__float2bfloat16_rn(fmaf(alpha, acc1[e], v1[e])));
        const float b = __bfloat162float(__float2bfloat16_rn(fmaf(alpha, acc2[e], v2[e])));
        rope_rotate(a, b, cv[e], sv[e], o1[e], o2[e]);
      }
      store_floats<4>(x + (n + j) * cols + c1, o1);
      store_floats<4>(x + (n + j) * cols + c2, o2);
    }
  }
}

// ---------------------------------------------------------------- gate/up LoRA + SwiGLU
// gate += scale u_g B_g^T and up += scale u_u B_u^T (each rounded to bf16 once and written
// back: the backward reads them), then h = silu(gate) up from the rounded values, exactly as
// up_forward_kernel twice followed by swiglu_forward, in one pass over gate and up instead of
// three. Rank tile 8 only (two B slices live in registers). KEEP = false skips writing gate
// and up back (a checkpointed forward whose backward recomputes them needs h alone).
// A thread owns kSwiCols = 4 columns (both B slices, 64 floats, in registers) and keeps
// kSwiUnroll rows of gate and up in flight: at 8 columns the kernel needed 204 registers, two
// blocks per SM, and ran at a third of plain swiglu_forward's bandwidth (0.56-0.61 against
// 0.18 ms at N = 8192, I = 14336 on an H200).
constexpr int kSwiRows = 32, kSwiCols = 4, kSwiUnroll = 4;
template <bool KEEP>
__global__ void __launch_bounds__(kUpThreads, 4)
    swiglu_up_kernel(__nv_bfloat16* h, __nv_bfloat16* gate, __nv_bfloat16* up,
                     const __nv_bfloat16* ug, const __nv_bfloat16* uu, const __nv_bfloat16* Bg,
                     const __nv_bfloat16* Bu, int64_t N, int64_t I, int r, float alpha, bool vec) {
  constexpr int R = 8, W = kSwiCols, U = kSwiUnroll;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kUpThreads + threadIdx.x) * W;
  if (c >= I) return;
  float ag[R][W], au[R][W];
  load_slice<R, W>(ag, Bg, c, r, vec);
  load_slice<R, W>(au, Bu, c, r, vec);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSwiRows;
  const int64_t n1 = N < n0 + kSwiRows ? N : n0 + kSwiRows;
  for (int64_t n = n0; n < n1; n += U) {
    Raw<W> gr[U], ur[U];
#pragma unroll
    for (int j = 0; j < U; ++j)
      if (n + j < n1) {
        gr[j] = load_raw<W>(gate + (n + j) * I + c);
        ur[j] = load_raw<W>(up + (n + j) * I + c);
      }
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (n + j >= n1) break;
      float dg[R], du[R], g[W], u[W], hv[W], accg[W], accu[W];
      load_rank_row<R>(dg, ug, n + j, r);
      load_rank_row<R>(du, uu, n + j, r);
      rank_dot(accg, dg, ag);
      rank_dot(accu, du, au);
      to_floats<W>(gr[j], g);
      to_floats<W>(ur[j], u);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        g[e] = __bfloat162float(__float2bfloat16_rn(fmaf(alpha, accg[e], g[e])));
        u[e] = __bfloat162float(__float2bfloat16_rn(fmaf(alpha, accu[e], u[e])));
        hv[e] = g[e] / (1.f + expf(-g[e])) * u[e];
      }
      if constexpr (KEEP) {
        store_floats<W>(gate + (n + j) * I + c, g);
        store_floats<W>(up + (n + j) * I + c, u);
      }
      store_floats<W>(h + (n + j) * I + c, hv);
    }
  }
}

// Validates a launch (throws on what the kernels do not support) and returns its mask. v is
}  // namespace

void lora_up_forward(bf16* y, const bf16* u, const bf16* B, int64_t N, int64_t out, int64_t r,
                     float scale, stream_t stream) {
  checked_mask(r, out, 0.0, 0, y, y, u);  // B is read in scalars where misaligned
  if (N <= 0) return;
  const dim3 grid(static_cast<unsigned>((out / 8 + kUpThreads - 1) / kUpThreads), rows_grid(N, kUpRows));
  dispatch(r, 0.0, [&](auto tile, auto) {
    up_forward_kernel<decltype(tile)::value, false><<<grid, kUpThreads, 0, stream>>>(
        dev(y), nullptr, dev(y), dev(u), dev(B), N, out, static_cast<int>(r), scale,
        aligned16(B));
  });
  FTUNE_CUDA_LAUNCH_CHECK();
}

bool lora_up_residual_supported(int64_t r, int64_t cols, const void* out, const void* resid,
                                const void* y, const void* u) {
  return lora_fused_supported(r, cols, y, u) && aligned16(out) && aligned16(resid);
}

void lora_up_residual_forward(bf16* out, const bf16* resid, const bf16* y, const bf16* u,
                              const bf16* B, int64_t N, int64_t cols, int64_t r, float scale,
                              stream_t stream) {
  if (!lora_up_residual_supported(r, cols, out, resid, y, u))
    throw CudaError("lora_up_residual_forward: r = " + std::to_string(r) + ", cols = " +
                    std::to_string(cols) + " not supported (r <= 16, cols % 8 == 0, 16-byte aligned)");
  if (N <= 0) return;
  const dim3 grid(static_cast<unsigned>((cols / 8 + kUpThreads - 1) / kUpThreads), rows_grid(N, kUpRows));
  dispatch(r, 0.0, [&](auto tile, auto) {
    up_forward_kernel<decltype(tile)::value, true><<<grid, kUpThreads, 0, stream>>>(
        dev(out), dev(resid), dev(y), dev(u), dev(B), N, cols, static_cast<int>(r), scale,
        aligned16(B));
  });
  FTUNE_CUDA_LAUNCH_CHECK();
}

bool lora_up_rope_supported(int64_t r, int64_t head_dim, const void* x, const void* u,
                            const float* cos, const float* sin) {
  return r >= 1 && r <= 8 && head_dim > 0 && head_dim % 8 == 0 && aligned16(x) &&
         aligned16(u) && aligned16(cos) && aligned16(sin);
}

void lora_up_rope_forward(bf16* x, const bf16* u, const bf16* B, const float* cos,
                          const float* sin, const int32_t* positions, int64_t N, int64_t heads,
                          int64_t head_dim, int64_t r, float scale, stream_t stream) {
  if (!lora_up_rope_supported(r, head_dim, x, u, cos, sin))
    throw CudaError("lora_up_rope_forward: r = " + std::to_string(r) + ", head_dim = " +
                    std::to_string(head_dim) + " not supported (r <= 8, head_dim % 8 == 0, 16-byte aligned)");
  if (N <= 0 || heads <= 0) return;
  const int64_t half = head_dim / 2, groups = heads * (half / 4);
  const dim3 grid(static_cast<unsigned>((groups + kUpThreads - 1) / kUpThreads), rows_grid(N, kUpRows));
  up_rope_kernel<<<grid, kUpThreads, 0, stream>>>(dev(x), dev(u), dev(B), cos, sin, positions, N,
                                                  heads, half, static_cast<int>(r), scale,
                                                  aligned16(B));
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
  const dim3 grid(static_cast<unsigned>((I / kSwiCols + kUpThreads - 1) / kUpThreads),
                  rows_grid(N, kSwiRows));
  auto kern = keep_gate_up ? swiglu_up_kernel<true> : swiglu_up_kernel<false>;
  kern<<<grid, kUpThreads, 0, stream>>>(dev(h), dev(gate), dev(up), dev(u_gate), dev(u_up),
                                        dev(B_gate), dev(B_up), N, I, static_cast<int>(r), scale,
                                        aligned16(B_gate) && aligned16(B_up));
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace ftune::cuda
