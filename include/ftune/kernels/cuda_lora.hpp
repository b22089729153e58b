#pragma once
// kernels module (CUDA backend): LoRA's rank-r products with dropout applied on the fly, so
// dropout(x) is never written out (with p > 0 it used to cost a write and two re-reads of
// x per projection, the largest LoRA overhead). With keep(n, c) the mask of
// dropout_apply over the flat index n*in + c (cpu::dropout_keep, bit for bit) and
// ks = 1 / (1 - p):
//   lora_down_forward:  u[N, r]   = (ks keep o x) A^T            bf16 out, fp32 accumulation
//   lora_down_backward: dA[r, in] += du^T (ks keep o x)          fp32 accumulator; fixed
//                                                                 summation order (two passes)
//   lora_dx_backward:   dx[N, in] += ks keep o (du A)            bf16, one rounding
//   lora_up_forward:    y[N, out] += scale u B^T                 bf16, one rounding (the
//                                                                 forward's LoRA term)
//   lora_swiglu_forward: gate, up += their LoRA terms (as lora_up_forward), then
//                        h = silu(gate) up (as swiglu_forward): one pass instead of three
//   lora_up_residual_forward: out = resid + (y + scale u B^T) (as lora_up_forward then
//                        residual_add, y untouched): o and down, one pass instead of two
//   lora_up_rope_forward: x = rope(x + scale u B^T) in place (as lora_up_forward then
//                        rope_forward): q and k, one pass instead of two
//   lora_up_backward:   dB[out, r] += scale dy^T u and du[N, r] = bf16(scale dy B): the up
//                        product's backward, one tensor-core pass over dy instead of two GEMMs
// CPU twin: cpu::dropout_apply then cpu::matmul_nt / matmul_tn / matmul_nn (tests compare).
// p == 0 skips the mask's hash altogether.
// Supported when lora_fused_supported(r, in); callers fall back to dropout_apply + GEMMs.
// Plain C++ header; implemented in src/kernels/cuda/lora.cu.
#include <cstdint>

#include "ftune/kernels/cuda_device.hpp"

namespace ftune::cuda {

// r <= 16, in a multiple of 8 and the two row-major operands (x or dx, and A) 16-byte
// aligned (16-byte rows throughout); the launchers also need the [N, r] operand (u or du)
// 16-byte aligned.
bool lora_fused_supported(int64_t r, int64_t in, const void* x, const void* A);

// x [N, in], A [r, in], u [N, r].
void lora_down_forward(bf16* u, const bf16* x, const bf16* A, int64_t N, int64_t in, int64_t r,
                       double p, uint64_t seed, stream_t stream);

// Floats of workspace lora_down_backward needs for these sizes (count: a group's members).
int64_t lora_down_backward_workspace(int64_t N, int64_t in, int64_t r, int count = 1);
// dA [r, in] fp32 (+=, scaled by alpha); du [N, r]; x [N, in].
void lora_down_backward(float* dA, const bf16* du, const bf16* x, int64_t N, int64_t in,
                        int64_t r, double p, uint64_t seed, float alpha, float* workspace,
                        stream_t stream);

// dx [N, in] (+=); du [N, r]; A [r, in].
void lora_dx_backward(bf16* dx, const bf16* du, const bf16* A, int64_t N, int64_t in, int64_t r,
                      double p, uint64_t seed, stream_t stream);

// Projections that read the same input (q/k/v of one normed x, gate/up of another): the two
// backward products above for up to kLoraGroupMax of them in one pass over x (or over dx)
// instead of one pass each. Member i has its own A[i] [r, in], dropout seed[i] and du[i]
// [N, r], and gets what one call per member gives: dA the same bits; dx the members' terms
// summed in fp32 and rounded once (one call per member rounds after each). Each member must
// pass lora_fused_supported. (A forward group, u for all members from one pass over x, was
// measured slower than one call each on an H200: 0.178 against 3 x 0.049 ms at q/k/v's
// shape; the products are bound by the mask hash and FMAs per element, not by reading x.)
constexpr int kLoraGroupMax = 3;
struct LoraGroup {
  int count = 0;
  const bf16* A[kLoraGroupMax] = {};  // lora_down_backward_group does not read A
  uint64_t seed[kLoraGroupMax] = {};
};
// workspace: lora_down_backward_workspace(N, in, r, g.count) floats.
void lora_down_backward_group(const LoraGroup& g, float* const* dA, const bf16* const* du,
                              const bf16* x, int64_t N, int64_t in, int64_t r, double p,
                              float alpha, float* workspace, stream_t stream);
void lora_dx_backward_group(const LoraGroup& g, bf16* dx, const bf16* const* du, int64_t N,
                            int64_t in, int64_t r, double p, stream_t stream);

// y [N, out] (+=); u [N, r]; B [out, r] (PEFT's lora_B layout, any alignment). Supported
// when lora_fused_supported(r, out, y, u).
void lora_up_forward(bf16* y, const bf16* u, const bf16* B, int64_t N, int64_t out, int64_t r,
                     float scale, stream_t stream);

// The residual add after a projection (o, down) with its LoRA term folded in: out = resid +
// (y + scale u B^T), every array [N, cols]; y is read, not written (out may alias resid).
bool lora_up_residual_supported(int64_t r, int64_t cols, const void* out, const void* resid,
                                const void* y, const void* u);
void lora_up_residual_forward(bf16* out, const bf16* resid, const bf16* y, const bf16* u,
                              const bf16* B, int64_t N, int64_t cols, int64_t r, float scale,
                              stream_t stream);

// RoPE after q or k with the projection's LoRA term folded in: x [N, heads * head_dim] =
// rope(x + scale u B^T) in place (cos/sin/positions as rope_forward's).
bool lora_up_rope_supported(int64_t r, int64_t head_dim, const void* x, const void* u,
                            const float* cos, const float* sin);
void lora_up_rope_forward(bf16* x, const bf16* u, const bf16* B, const float* cos,
                          const float* sin, const int32_t* positions, int64_t N, int64_t heads,
                          int64_t head_dim, int64_t r, float scale, stream_t stream);

// The MLP's gate and up LoRA terms fused with SwiGLU: gate, up [N, I] updated in place, h
// [N, I] written; u_* [N, r]; B_* [I, r]. Supported when lora_swiglu_supported (r <= 8).
// keep_gate_up = false writes h only (gate and up keep the products without their LoRA
// terms): for a checkpointed forward whose backward recomputes gate and up anyway.
bool lora_swiglu_supported(int64_t r, int64_t I, const void* gate, const void* up,
                           const void* h, const void* u_gate, const void* u_up);
void lora_swiglu_forward(bf16* h, bf16* gate, bf16* up, const bf16* u_gate, const bf16* u_up,
                         const bf16* B_gate, const bf16* B_up, int64_t N, int64_t I, int64_t r,
                         float scale, stream_t stream, bool keep_gate_up = true);

// The backward of the up product y += scale u B^T: dB [out, r] fp32 += scale dy^T u and du
// [N, r] = bf16(scale dy B), fp32 accumulation in a fixed order (two passes, as
// lora_down_backward). dy [N, out]; u [N, r]; B [out, r] (any alignment). Supported when
// lora_up_backward_supported (r <= 8, out % 8 == 0, dy 16-byte aligned, sm_80+); callers fall
// back to the two GEMMs. workspace: lora_up_backward_workspace(N, out, r) floats.
bool lora_up_backward_supported(int64_t r, int64_t out, const void* dy);
int64_t lora_up_backward_workspace(int64_t N, int64_t out, int64_t r);
void lora_up_backward(float* dB, bf16* du, const bf16* dy, const bf16* u, const bf16* B,
                      int64_t N, int64_t out, int64_t r, float scale, float* workspace,
                      stream_t stream);

}  // namespace ftune::cuda
