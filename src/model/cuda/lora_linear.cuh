#pragma once
// One projection with its LoRA pair on the device, PEFT semantics:
//   y = x W^T + b + scale * (dropout(x) A^T) B^T
// W, b frozen bf16; A, B bf16 copies of the fp32 adapter; LoRA gradients accumulate in an
// fp32 buffer laid out like adapter.params. The same steps as CpuTransformer's
// linear_forward / linear_backward, in the same order.
#include <cstdint>

#include "ftune/kernels/cuda_device.hpp"
#include "ftune/kernels/cuda_gemm.hpp"
#include "ftune/model/lora.hpp"
#include "profiler.cuh"

namespace ftune::cuda::model {

// The adapter as the device sees it during one micro-batch.
struct LoraCtx {
  const LoraAdapter* adapter = nullptr;  // host: slots, spec
  const bf16* params = nullptr;          // bf16 copy of adapter->params
  float* grads = nullptr;                // fp32, adapter layout (null: forward only)
  double dropout = 0;
  uint64_t seed = 0;
};

// One projection of one layer, plus the scratch it may use.
struct LinearOp {
  Gemm& gemm;
  stream_t stream;
  int64_t N;              // tokens
  int64_t in, out;
  const bf16* W;          // [out, in]
  const bf16* b;          // [out] or null
  const LoraSlot* slot;   // null: no LoRA on this projection
  uint64_t dropout_seed;  // per (seed, layer, proj), as the CPU derives it
  bf16* xd;               // scratch [N, max(in)] for dropout(x) / the LoRA input gradient
  bf16* du;               // scratch [N, r]
  PhaseProfiler* prof = nullptr;
  float* lora_ws = nullptr;  // lora_down_backward's / lora_up_backward's workspace
                             // (null: the GEMM paths only)
  int64_t lora_ws_floats = 0;
};

// u = dropout(x) A^T [N, r] only (op.slot must be set): what backward needs of a projection
// whose output a checkpointed recompute does not need.
void lora_input_product(const LinearOp& op, const LoraCtx& lc, const bf16* x, bf16* u);
// y = ...; keeps u = dropout(x) A^T [N, r] for backward (u_ready: u holds it already, as in a
// checkpointed recompute, whose mask and inputs are those of the forward).
void linear_forward(const LinearOp& op, const LoraCtx& lc, bf16* y, const bf16* x, bf16* u,
                    bool u_ready = false);
// linear_forward without the LoRA term: y = x W^T + b, and u as above. For a caller that
// adds scale u B^T itself, fused into its next kernel (the MLP's gate/up into SwiGLU).
void linear_forward_base(const LinearOp& op, const LoraCtx& lc, bf16* y, const bf16* x,
                         bf16* u, bool u_ready = false);
// out = resid + linear_forward(x): the residual add after o and down, with the LoRA term
// folded into the add where the fused kernel applies (same bits as the two steps). y:
// scratch [N, out] for x W^T + b.
void linear_forward_residual(const LinearOp& op, const LoraCtx& lc, bf16* out, const bf16* resid,
                             bf16* y, const bf16* x, bf16* u, bool u_ready = false);
// y = rope(linear_forward(x)) in place (q and k without q/k norm), the LoRA term folded into
// RoPE's pass where the fused kernel applies (same bits as the two steps).
struct RopeTables {
  const float* cos;
  const float* sin;
  const int32_t* positions;  // [N]
  int64_t heads, head_dim;
};
void linear_forward_rope(const LinearOp& op, const LoraCtx& lc, bf16* y, const bf16* x, bf16* u,
                         bool u_ready, const RopeTables& rope);
// dx (+)= dy W + the LoRA path's input gradient; dA, dB added into lc.grads. dx may alias x
// when accumulate is false (x is read before dx is written).
void linear_backward(const LinearOp& op, const LoraCtx& lc, bf16* dx, bool accumulate,
                     const bf16* dy, const bf16* x, const bf16* u);

// Projections of one layer that read the same input x (q/k/v of xn1, gate/up of xn2). With
// LoRA on each, dropout and shapes the fused kernels take, their backward products with A run
// as one pass over x and one over dx for the whole group (kernels/cuda_lora.hpp's groups);
// otherwise projection by projection, as linear_backward.
// dx = sum_i (dy_i W_i + member i's LoRA input gradient); each member's dA, dB added into
// lc.grads. du: count scratch buffers [N, r]; the ops' lora_ws must hold
// lora_down_backward_workspace(N, in, r, count) floats. dx must not alias x.
void linear_backward_group(const LinearOp* ops, int count, const LoraCtx& lc, bf16* dx,
                           const bf16* const* dy, const bf16* x, const bf16* const* u,
                           bf16* const* du);

}  // namespace ftune::cuda::model
