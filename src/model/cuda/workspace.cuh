#pragma once
// Per-micro-batch device buffers of the CUDA transformer, carved out of one arena. carve()
// runs twice per micro-batch: with a null base to measure, then over the real allocation
// (which only grows), so a new batch shape costs no cudaMalloc unless it is the largest yet.
#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "ftune/kernels/cuda_device.hpp"
#include "ftune/kernels/cuda_lora.hpp"
#include "ftune/model/model_config.hpp"
#include "ftune/model/weights.hpp"

namespace ftune::cuda::model {

// Bump allocator over [base, ...): 256-byte aligned pieces (flash attention and the 16-byte
// vector paths of the row kernels need >= 16). A null base only measures.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <typename T>
  T* take(int64_t n) {
    off_ = (off_ + 255) / 256 * 256;
    T* p = base_ ? reinterpret_cast<T*>(base_ + off_) : nullptr;
    off_ += static_cast<size_t>(n) * sizeof(T);
    return p;
  }
  size_t used() const { return off_; }

 private:
  char* base_;
  size_t off_ = 0;
};

// Activations one layer keeps for its backward (one set per layer, or one shared set under
// gradient checkpointing, whose att/lse then point at the layer's saved copies). q/k/v are after q/k-norm and RoPE; q_pre/k_pre before (qwen3).
struct LayerActs {
  bf16 *xn1, *q, *k, *v, *q_pre, *k_pre, *att, *x_mid, *xn2, *gate, *up, *h;
  float *rstd1, *rstd_q, *rstd_k, *lse, *rstd2;
  std::array<bf16*, kNumProj> u;  // dropout(x) A^T per projection, [N, r]
};

struct Dims {
  int64_t N = 0;      // tokens
  int64_t S = 0;      // sequences
  int64_t R = 0;      // rows that carry a label
  int64_t chunk = 0;  // head rows per logits chunk
  int64_t rank = 0;
  size_t attn_ws = 0; // flash backward workspace bytes
  bool keep_mid = false;  // checkpointing keeps each layer's x_mid (selective recompute)
  // The unfused LoRA path may run (rank > 16, or a width / A offset the fused kernels do
  // not take): it needs the [N, widest] dropout scratch xd (224 MiB at the 8B shape, batch 4).
  bool unfused_lora = true;
};

struct Buffers {
  std::vector<bf16*> resid;     // [L + 1] residual stream entering each layer, + final
  std::vector<LayerActs> acts;  // L, or 1 under checkpointing
  // Under checkpointing: each layer's attention output and lse, kept from the forward so
  // the recompute skips attention (empty without checkpointing: acts hold them).
  std::vector<bf16*> att_saved;
  std::vector<float*> lse_saved;
  // ... and each layer's LoRA input products u (7 x [N, r]: 29 MB at the 8B shape, batch 4),
  // so the recompute runs no LoRA down product at all.
  std::vector<std::array<bf16*, kNumProj>> u_saved;
  // ... and with Dims::keep_mid each layer's x_mid (x + attention's projection), so the
  // recompute skips the o projection and its residual add (one [N, H] per layer).
  std::vector<bf16*> mid_saved;
  bf16 *tmp_h, *dx, *dxn, *datt, *dq, *dk, *dv, *dq_pre, *dk_pre, *xd;  // MLP grads: in acts
  std::array<bf16*, kLoraGroupMax> du;  // [N, r] each: a projection group's LoRA du
  bf16 *xf, *dxf, *xc, *logits, *dxc;  // loss head
  float* lora_ws;                      // fused LoRA backward partial sums
  int64_t lora_ws_floats;              // its size
  float *rstd_f, *row_loss;
  int32_t *tokens, *positions, *rows, *row_targets;
  int64_t* seq_start;
  void* attn_ws;
};

inline void carve(Carver& cv, Buffers& b, const ModelConfig& c, const Dims& d, bool ckpt) {
  const int64_t N = d.N, H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(),
                kvd = c.kv_dim(), Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;
  const int64_t L = c.num_hidden_layers, widest = std::max({H, I, qd});
  b.resid.resize(L + 1);
  for (auto& r : b.resid) r = cv.take<bf16>(N * H);
  b.acts.resize(ckpt ? 1 : L);
  for (LayerActs& a : b.acts) {
    a.xn1 = cv.take<bf16>(N * H);
    a.rstd1 = cv.take<float>(N);
    a.q = cv.take<bf16>(N * qd);
    a.k = cv.take<bf16>(N * kvd);
    a.v = cv.take<bf16>(N * kvd);
    a.q_pre = c.qk_norm ? cv.take<bf16>(N * qd) : nullptr;
    a.k_pre = c.qk_norm ? cv.take<bf16>(N * kvd) : nullptr;
    a.rstd_q = c.qk_norm ? cv.take<float>(N * Hq) : nullptr;
    a.rstd_k = c.qk_norm ? cv.take<float>(N * Hkv) : nullptr;
    a.att = ckpt ? nullptr : cv.take<bf16>(N * qd);
    a.lse = ckpt ? nullptr : cv.take<float>(N * Hq);
    a.x_mid = d.keep_mid ? nullptr : cv.take<bf16>(N * H);  // keep_mid: mid_saved's
    a.xn2 = cv.take<bf16>(N * H);
    a.rstd2 = cv.take<float>(N);
    a.gate = cv.take<bf16>(N * I);
    a.up = cv.take<bf16>(N * I);
    a.h = cv.take<bf16>(N * I);
    if (!ckpt)
      for (auto& u : a.u) u = cv.take<bf16>(N * d.rank);
  }
  b.att_saved.assign(ckpt ? L : 0, nullptr);
  b.lse_saved.assign(ckpt ? L : 0, nullptr);
  for (auto& a : b.att_saved) a = cv.take<bf16>(N * qd);
  for (auto& a : b.lse_saved) a = cv.take<float>(N * Hq);
  b.u_saved.assign(ckpt ? L : 0, {});
  for (auto& us : b.u_saved)
    for (auto& u : us) u = cv.take<bf16>(N * d.rank);
  b.mid_saved.assign(ckpt && d.keep_mid ? L : 0, nullptr);
  for (auto& m : b.mid_saved) m = cv.take<bf16>(N * H);
  b.tmp_h = cv.take<bf16>(N * H);
  b.dx = cv.take<bf16>(N * H);
  b.dxn = cv.take<bf16>(N * H);
  b.datt = cv.take<bf16>(N * qd);
  b.dq = cv.take<bf16>(N * qd);
  b.dk = cv.take<bf16>(N * kvd);
  b.dv = cv.take<bf16>(N * kvd);
  b.dq_pre = c.qk_norm ? cv.take<bf16>(N * qd) : nullptr;
  b.dk_pre = c.qk_norm ? cv.take<bf16>(N * kvd) : nullptr;
  b.xd = d.unfused_lora ? cv.take<bf16>(N * widest) : nullptr;
  for (auto& du : b.du) du = cv.take<bf16>(N * d.rank);
  // One projection of up to `widest` inputs, or the q/k/v group over H.
  // The up products' backward (lora_up_backward) reuses it, one projection at a time.
  b.lora_ws_floats = std::max({lora_down_backward_workspace(N, widest, d.rank),
                               lora_down_backward_workspace(N, H, d.rank, kLoraGroupMax),
                               lora_up_backward_workspace(N, qd, d.rank),
                               lora_up_backward_workspace(N, kvd, d.rank),
                               lora_up_backward_workspace(N, H, d.rank),
                               lora_up_backward_workspace(N, I, d.rank)});
  b.lora_ws = cv.take<float>(b.lora_ws_floats);
  b.xf = cv.take<bf16>(N * H);
  b.dxf = cv.take<bf16>(N * H);
  b.xc = cv.take<bf16>(d.chunk * H);
  b.logits = cv.take<bf16>(d.chunk * c.vocab_size);
  b.dxc = cv.take<bf16>(d.chunk * H);
  b.rstd_f = cv.take<float>(N);
  b.row_loss = cv.take<float>(d.R);
  b.tokens = cv.take<int32_t>(N);
  b.positions = cv.take<int32_t>(N);
  b.rows = cv.take<int32_t>(d.R);
  b.row_targets = cv.take<int32_t>(d.R);
  b.seq_start = cv.take<int64_t>(d.S + 1);
  b.attn_ws = d.attn_ws ? cv.take<char>(static_cast<int64_t>(d.attn_ws)) : nullptr;
}

}  // namespace ftune::cuda::model
