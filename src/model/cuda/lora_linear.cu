// LoRA projections on the device (see lora_linear.cuh). With dropout, the products with A
// go through the fused kernels of kernels/cuda_lora.hpp (mask applied on the fly); without
// it, or where those do not apply, through cuBLASLt on an explicit dropout(x).
#include <stdexcept>

#include "ftune/kernels/cuda_lora.hpp"
#include "ftune/kernels/cuda_ops.hpp"
#include "lora_linear.cuh"
#include "model_kernels.cuh"

namespace ftune::cuda::model {

namespace {
// With dropout, the fused kernels apply the mask on the fly (no dropout(x) buffer).
bool fused(const LinearOp& op, const LoraCtx& lc, const void* x_or_dx) {
  return lc.dropout > 0 && op.lora_ws &&
         lora_fused_supported(lc.adapter->spec.rank, op.in, x_or_dx,
                              lc.params + op.slot->a_offset);
}

// The unfused path's LoRA input: x itself, or dropout(x) written to op.xd.
// dB += scale dy^T u ; du = scale dy B: one pass over dy where lora_up_backward applies and
// the workspace holds its partials, else two GEMMs.
void up_backward(const LinearOp& op, const LoraCtx& lc, const bf16* dy, const bf16* u, bf16* du) {
  const LoraSlot& s = *op.slot;
  const int64_t r = lc.adapter->spec.rank;
  const float scale = lc.adapter->spec.scale();
  ProfileScope ps(op.prof, Phase::lora_bwd, op.stream);
  if (op.lora_ws && lora_up_backward_supported(r, op.out, dy) &&
      lora_up_backward_workspace(op.N, op.out, r) <= op.lora_ws_floats) {
    lora_up_backward(lc.grads + s.b_offset, du, dy, u, lc.params + s.b_offset, op.N, op.out, r,
                     scale, op.lora_ws, op.stream);
    return;
  }
  op.gemm.matmul(GemmOp::TN, lc.grads + s.b_offset, dy, u, op.out, r, op.N, scale, 1.f,
                 op.stream);
  op.gemm.matmul(GemmOp::NN, du, dy, lc.params + s.b_offset, op.N, r, op.out, scale, 0.f,
                 op.stream);
}

const bf16* dropout_input(const LinearOp& op, const LoraCtx& lc, const bf16* x) {
  if (lc.dropout <= 0) return x;
  if (!op.xd) throw std::logic_error("lora_linear: unfused LoRA path without its dropout scratch");
  ProfileScope ps(op.prof, Phase::dropout, op.stream);
  dropout_apply(op.xd, x, op.N * op.in, lc.dropout, op.dropout_seed, false, op.stream);
  return op.xd;
}
}  // namespace

void lora_input_product(const LinearOp& op, const LoraCtx& lc, const bf16* x, bf16* u) {
  const LoraSlot& s = *op.slot;
  const int64_t r = lc.adapter->spec.rank;
  if (fused(op, lc, x)) {
    ProfileScope ps(op.prof, Phase::lora_fwd, op.stream);
    lora_down_forward(u, x, lc.params + s.a_offset, op.N, op.in, r, lc.dropout, op.dropout_seed,
                      op.stream);
    return;
  }
  const bf16* xin = dropout_input(op, lc, x);
  ProfileScope ps(op.prof, Phase::lora_fwd, op.stream);
  op.gemm.matmul(GemmOp::NT, u, xin, lc.params + s.a_offset, op.N, r, op.in, 1.f, 0.f,
                 op.stream);
}

void linear_forward_base(const LinearOp& op, const LoraCtx& lc, bf16* y, const bf16* x,
                         bf16* u, bool u_ready) {
  {
    ProfileScope ps(op.prof, Phase::base_gemm_fwd, op.stream);
    op.gemm.matmul(GemmOp::NT, y, x, op.W, op.N, op.out, op.in, 1.f, 0.f, op.stream);
    if (op.b) add_bias(y, op.b, op.N, op.out, op.stream);
  }
  if (op.slot && !u_ready) lora_input_product(op, lc, x, u);
}

void linear_forward(const LinearOp& op, const LoraCtx& lc, bf16* y, const bf16* x, bf16* u,
                    bool u_ready) {
  linear_forward_base(op, lc, y, x, u, u_ready);
  if (!op.slot) return;
  // y was rounded to bf16 once already; the LoRA term is added with one more rounding, as a
  // bf16 PEFT model does (base output + lora output). The fused kernel streams y once at
  // bandwidth; cuBLASLt's K = r product with beta = 1 reached about 2 TB/s of it.
  ProfileScope ps(op.prof, Phase::lora_fwd, op.stream);
  const int64_t r = lc.adapter->spec.rank;
  const bf16* B = lc.params + op.slot->b_offset;
  if (lora_fused_supported(r, op.out, y, u))
    lora_up_forward(y, u, B, op.N, op.out, r, lc.adapter->spec.scale(), op.stream);
  else
    op.gemm.matmul(GemmOp::NT, y, u, B, op.N, op.out, r, lc.adapter->spec.scale(), 1.f,
                   op.stream);
}

void linear_forward_residual(const LinearOp& op, const LoraCtx& lc, bf16* out, const bf16* resid,
                             bf16* y, const bf16* x, bf16* u, bool u_ready) {
  const int64_t r = op.slot ? lc.adapter->spec.rank : 0;
  if (op.slot && lora_up_residual_supported(r, op.out, out, resid, y, u)) {
    linear_forward_base(op, lc, y, x, u, u_ready);
    ProfileScope ps(op.prof, Phase::lora_fwd, op.stream);
    lora_up_residual_forward(out, resid, y, u, lc.params + op.slot->b_offset, op.N, op.out, r,
                             lc.adapter->spec.scale(), op.stream);
    return;
  }
  linear_forward(op, lc, y, x, u, u_ready);
  ProfileScope ps(op.prof, Phase::elementwise, op.stream);
  residual_add(out, resid, y, op.N * op.out, op.stream);
}

void linear_forward_rope(const LinearOp& op, const LoraCtx& lc, bf16* y, const bf16* x, bf16* u,
                         bool u_ready, const RopeTables& rope) {
  const int64_t r = op.slot ? lc.adapter->spec.rank : 0;
  if (op.slot && rope.heads * rope.head_dim == op.out &&
      lora_up_rope_supported(r, rope.head_dim, y, u, rope.cos, rope.sin)) {
    linear_forward_base(op, lc, y, x, u, u_ready);
    ProfileScope ps(op.prof, Phase::lora_fwd, op.stream);
    lora_up_rope_forward(y, u, lc.params + op.slot->b_offset, rope.cos, rope.sin,
                         rope.positions, op.N, rope.heads, rope.head_dim, r,
                         lc.adapter->spec.scale(), op.stream);
    return;
  }
  linear_forward(op, lc, y, x, u, u_ready);
  ProfileScope ps(op.prof, Phase::rope, op.stream);
  rope_forward(y, rope.cos, rope.sin, rope.positions, op.N, rope.heads, rope.head_dim,
               op.stream);
}

void linear_backward(const LinearOp& op, const LoraCtx& lc, bf16* dx, bool accumulate,
                     const bf16* dy, const bf16* x, const bf16* u) {
  // Everything that reads x runs before the base product writes dx, so dx may alias x (the
  // transformer writes the down projection's input gradient over its input).
  auto base_dx = [&] {
    ProfileScope ps(op.prof, Phase::base_gemm_bwd, op.stream);
    op.gemm.matmul(GemmOp::NN, dx, dy, op.W, op.N, op.in, op.out, 1.f,
                   accumulate ? 1.f : 0.f, op.stream);
  };
  if (!op.slot) return base_dx();
  const LoraSlot& s = *op.slot;
  const int64_t r = lc.adapter->spec.rank;
  // dB += scale dy^T u ; du = scale dy B ; dA += du^T dropout(x) ; dx += dropout'(du A)
  up_backward(op, lc, dy, u, op.du);
  if (fused(op, lc, x) && fused(op, lc, dx)) {
    {
      ProfileScope ps(op.prof, Phase::lora_bwd, op.stream);
      lora_down_backward(lc.grads + s.a_offset, op.du, x, op.N, op.in, r, lc.dropout,
                         op.dropout_seed, 1.f, op.lora_ws, op.stream);
    }
    base_dx();
    ProfileScope ps(op.prof, Phase::lora_bwd, op.stream);
    lora_dx_backward(dx, op.du, lc.params + s.a_offset, op.N, op.in, r, lc.dropout,
                     op.dropout_seed, op.stream);
    return;
  }
  const bf16* xin = dropout_input(op, lc, x);
  {
    ProfileScope ps(op.prof, Phase::lora_bwd, op.stream);
    op.gemm.matmul(GemmOp::TN, lc.grads + s.a_offset, op.du, xin, r, op.in, op.N, 1.f, 1.f,
                   op.stream);
  }
  base_dx();
  {
    ProfileScope ps(op.prof, Phase::lora_bwd, op.stream);
    if (lc.dropout > 0)
      op.gemm.matmul(GemmOp::NN, op.xd, op.du, lc.params + s.a_offset, op.N, op.in, r, 1.f,
                     0.f, op.stream);
    else
      op.gemm.matmul(GemmOp::NN, dx, op.du, lc.params + s.a_offset, op.N, op.in, r, 1.f, 1.f,
                     op.stream);
  }
  if (lc.dropout > 0) {
    // The mask is a function of (seed, element index) only: the same call masks the gradient.
    ProfileScope ps(op.prof, Phase::dropout, op.stream);
    dropout_apply(dx, op.xd, op.N * op.in, lc.dropout, op.dropout_seed, true, op.stream);
  }
}

namespace {
// Whether a group takes the fused group kernels: every member fused over x and over dx.
bool group_fused(const LinearOp* ops, int count, const LoraCtx& lc, const bf16* x,
                 const bf16* dx) {
  if (count < 1 || count > kLoraGroupMax) return false;
  for (int i = 0; i < count; ++i)
    if (!ops[i].slot || !fused(ops[i], lc, x) || !fused(ops[i], lc, dx)) return false;
  return true;
}

LoraGroup group_of(const LinearOp* ops, int count, const LoraCtx& lc) {
  LoraGroup g;
  g.count = count;
  for (int i = 0; i < count; ++i) {
    g.A[i] = lc.params + ops[i].slot->a_offset;
    g.seed[i] = ops[i].dropout_seed;
  }
  return g;
}
}  // namespace

void linear_backward_group(const LinearOp* ops, int count, const LoraCtx& lc, bf16* dx,
                           const bf16* const* dy, const bf16* x, const bf16* const* u,
                           bf16* const* du) {
  if (!group_fused(ops, count, lc, x, dx)) {
    for (int i = 0; i < count; ++i) linear_backward(ops[i], lc, dx, i > 0, dy[i], x, u[i]);
    return;
  }
  const int64_t r = lc.adapter->spec.rank;
  const LinearOp& op0 = ops[0];
  const LoraGroup g = group_of(ops, count, lc);
  // Per member, as linear_backward: dB += scale dy^T u ; du = scale dy B. Then, for the
  // group: dA_i += du_i^T dropout_i(x) in one pass over x; the base products into dx; the
  // LoRA input gradients added in one pass over dx.
  float* dA[kLoraGroupMax];
  for (int i = 0; i < count; ++i) {
    up_backward(ops[i], lc, dy[i], u[i], du[i]);
    dA[i] = lc.grads + ops[i].slot->a_offset;
  }
  {
    ProfileScope ps(op0.prof, Phase::lora_bwd, op0.stream);
    lora_down_backward_group(g, dA, du, x, op0.N, op0.in, r, lc.dropout, 1.f, op0.lora_ws,
                             op0.stream);
  }
  {
    ProfileScope ps(op0.prof, Phase::base_gemm_bwd, op0.stream);
    for (int i = 0; i < count; ++i)
      ops[i].gemm.matmul(GemmOp::NN, dx, dy[i], ops[i].W, op0.N, op0.in, ops[i].out, 1.f,
                         i > 0 ? 1.f : 0.f, op0.stream);
  }
  ProfileScope ps(op0.prof, Phase::lora_bwd, op0.stream);
  lora_dx_backward_group(g, dx, du, op0.N, op0.in, r, lc.dropout, op0.stream);
}

}  // namespace ftune::cuda::model
