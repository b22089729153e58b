// CPU reference backend: one training micro-step from tokens to LoRA gradients (or, for full
// fine-tuning, to the gradients of every base weight).
// Reading order: forward_backward() -> layer_forward() / layer_backward() -> ops in
// kernels/cpu/ops.cpp. Shapes: N tokens, H hidden, I intermediate, V vocab.
#include "ftune/model/transformer_cpu.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "ftune/kernels/cpu_ops.hpp"
#include "ftune/model/zero3_trained.hpp"
#include "ftune/model/zero3_weights.hpp"

namespace ftune {

namespace {

using f32 = float;

// Per-layer activations kept for backward (or recomputed under gradient checkpointing).
struct LayerActs {
  std::vector<f32> xn1, rstd1;          // input RMSNorm
  std::vector<f32> q, k, v;             // after q/k norm and RoPE
  std::vector<f32> q_pre, k_pre;        // before q/k norm (qwen3)
  std::vector<f32> rstd_q, rstd_k;
  std::vector<f32> att, lse;            // attention output (input of o_proj)
  std::vector<f32> x_mid;               // residual after attention
  std::vector<f32> xn2, rstd2;          // post-attention RMSNorm
  std::vector<f32> gate, up, h;         // MLP
  std::vector<std::vector<f32>> lora_u; // per projection: dropout(x) A^T, [N, r]
};

uint64_t mix_seed(uint64_t a, uint64_t b) {
  uint64_t z = a * 0x9E3779B97F4A7C15ull + b + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

std::vector<double> rope_inv_freq(const ModelConfig& c) {
  const int64_t half = c.head_dim / 2;
  std::vector<double> inv(half);
  for (int64_t i = 0; i < half; ++i)
    inv[i] = 1.0 / std::pow(c.rope.theta, static_cast<double>(2 * i) / c.head_dim);
  const RopeConfig& r = c.rope;
  if (r.type == "linear") {
    for (double& f : inv) f /= r.factor;
  } else if (r.type == "llama3") {
    // transformers' _compute_llama3_parameters: long wavelengths are slowed by `factor`,
    // short ones kept, the band between interpolated smoothly.
    const double old_ctx = static_cast<double>(r.original_max_position_embeddings);
    const double low_wavelen = old_ctx / r.low_freq_factor;
    const double high_wavelen = old_ctx / r.high_freq_factor;
    for (double& f : inv) {
      const double wavelen = 2 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = f / r.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth =
            (old_ctx / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        f = (1 - smooth) * f / r.factor + smooth * f;
      }
    }
  } else if (r.type != "default") {
    throw std::runtime_error("unsupported rope type '" + r.type + "'");
  }
  return inv;
}

struct CpuTransformer::Impl {
  const BaseWeights* dense = nullptr;    // the whole model, or
  std::unique_ptr<Zero3Weights> zero3;  // ZeRO-3: this rank's shards, a layer gathered at a time
  Zero3TrainedWeights* trained = nullptr;  // ZeRO-3 full fine-tuning: the trained shards
  const ModelConfig c;
  bool checkpointing;
  std::vector<double> inv_freq;
  std::vector<float> rope_cos, rope_sin;  // [positions, head_dim/2]
  int64_t rope_positions = 0;

  // Buffers sized for the current micro-batch.
  int64_t N = 0;
  std::vector<std::vector<f32>> resid;  // residual stream entering each layer, + final
  std::vector<LayerActs> acts;          // one per layer, or one shared when checkpointing
  std::vector<f32> tmp_h, dx, dmid, dxn, dtmp, datt, dq, dk, dv, dgate, dup, dh, xd, du;
  // Full fine-tuning: gradients of every base weight (full_grads), laid out like
  // dense->storage in `full`, or in the trained shards' block scratch under ZeRO-3.
  bool full_grads = false;
  float* full = nullptr;
  float* grad_of(const float* weight) const {
    return trained ? trained->grad_of(weight) : full + (weight - dense->storage.data());
  }

  // The weights, wherever they are held. Under ZeRO-3 the accessors gather (collectives).
  const LayerWeights& layer(int l) {
    return trained ? trained->layer(l) : zero3 ? zero3->layer(l) : dense->layers[l];
  }
  const float* embed_table() {
    return trained ? trained->embed() : zero3 ? zero3->embed() : dense->embed;
  }
  const float* final_norm_w() {
    return trained ? trained->final_norm() : zero3 ? zero3->final_norm() : dense->final_norm;
  }
  const float* lm_head_w() {
    return trained ? trained->lm_head() : zero3 ? zero3->lm_head() : dense->lm_head;
  }

  LoraAdapter no_lora;  // full fine-tuning's adapter: no projection carries LoRA

  Impl(const BaseWeights* weights, std::unique_ptr<Zero3Weights> shards,
       Zero3TrainedWeights* trained_shards, bool ckpt)
      : dense(weights), zero3(std::move(shards)), trained(trained_shards),
        c(dense ? dense->cfg : zero3 ? zero3->config() : trained->config()),
        checkpointing(ckpt), inv_freq(rope_inv_freq(c)) {
    no_lora.model = c;
    no_lora.spec.rank = 0;
    no_lora.slot_of.assign(c.num_hidden_layers * kNumProj, -1);
  }

  void ensure_rope(int64_t positions) {
    if (positions <= rope_positions) return;
    const int64_t half = c.head_dim / 2;
    rope_cos.resize(positions * half);
    rope_sin.resize(positions * half);
    for (int64_t p = 0; p < positions; ++p)
      for (int64_t i = 0; i < half; ++i) {
        // HF forms the angle in fp32 (inv_freq * position) before cos/sin.
        const float angle = static_cast<float>(inv_freq[i]) * static_cast<float>(p);
        rope_cos[p * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
        rope_sin[p * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
    rope_positions = positions;
  }

  void size_acts(LayerActs& a, int rank, int64_t n) {
    const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kvd = c.kv_dim();
    a.xn1.resize(n * H); a.rstd1.resize(n);
    a.q.resize(n * qd); a.k.resize(n * kvd); a.v.resize(n * kvd);
    if (c.qk_norm) {
      a.q_pre.resize(n * qd); a.k_pre.resize(n * kvd);
      a.rstd_q.resize(n * c.num_attention_heads); a.rstd_k.resize(n * c.num_key_value_heads);
    }
    a.att.resize(n * qd); a.lse.resize(n * c.num_attention_heads);
    a.x_mid.resize(n * H);
    a.xn2.resize(n * H); a.rstd2.resize(n);
    a.gate.resize(n * I); a.up.resize(n * I); a.h.resize(n * I);
    a.lora_u.resize(kNumProj);
    for (auto& u : a.lora_u) u.resize(n * rank);
  }

  void prepare(const MicroBatch& mb, const LoraAdapter& a) {
    N = mb.num_tokens();
    const int64_t H = c.hidden_size, I = c.intermediate_size;
    const int64_t widest = std::max({H, I, c.q_dim()});
    resid.resize(c.num_hidden_layers + 1);
    for (auto& r : resid) r.resize(N * H);
    acts.resize(checkpointing ? 1 : c.num_hidden_layers);
    for (auto& la : acts) size_acts(la, a.spec.rank, N);
    tmp_h.resize(N * H); dx.resize(N * H); dmid.resize(N * H); dxn.resize(N * H);
    dtmp.resize(N * widest); datt.resize(N * c.q_dim());
    dq.resize(N * c.q_dim()); dk.resize(N * c.kv_dim()); dv.resize(N * c.kv_dim());
    dgate.resize(N * I); dup.resize(N * I); dh.resize(N * I);
    xd.resize(N * widest); du.resize(N * a.spec.rank);
    ensure_rope(mb.max_position() + 1);
  }

  uint64_t proj_seed(uint64_t seed, int layer, Proj p) const {
    return mix_seed(seed, static_cast<uint64_t>(layer) * kNumProj + static_cast<int>(p));
  }

  // y = x W^T + b + scale * (dropout(x) A^T) B^T ; keeps u = dropout(x) A^T for backward.
  void linear_forward(f32* y, const f32* x, int layer, Proj p, const LoraAdapter& a,
                      std::vector<f32>& u, double dropout, uint64_t seed) {
    const int pi = static_cast<int>(p);
    const int64_t in = proj_in_features(c, p), out = proj_out_features(c, p);
    cpu::matmul_nt<f32>(y, x, this->layer(layer).w[pi], N, out, in, 1.0f, false);
    if (const f32* b = this->layer(layer).b[pi]) {
#pragma omp parallel for schedule(static)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t o = 0; o < out; ++o) y[n * out + o] += b[o];
    }
    const LoraSlot* s = a.slot(layer, p);
    if (!s) return;
    const int64_t r = a.spec.rank;
    const f32* xin = x;
    if (dropout > 0) {
      cpu::dropout_apply<f32>(xd.data(), x, N * in, dropout, proj_seed(seed, layer, p), false);
      xin = xd.data();
    }
    cpu::matmul_nt<f32>(u.data(), xin, a.params.data() + s->a_offset, N, r, in, 1.0f, false);
    cpu::matmul_nt<f32>(y, u.data(), a.params.data() + s->b_offset, N, out, r, a.spec.scale(),
                        true);
  }

  // dx (+)= dy W + LoRA path; LoRA gradients added into grads.
  void linear_backward(f32* dxo, bool accumulate, const f32* dy, const f32* x, int layer, Proj p,
                       const LoraAdapter& a, const std::vector<f32>& u, float* grads,
                       double dropout, uint64_t seed) {
    const int pi = static_cast<int>(p);
    const int64_t in = proj_in_features(c, p), out = proj_out_features(c, p);
    cpu::matmul_nn<f32>(dxo, dy, this->layer(layer).w[pi], N, in, out, 1.0f, accumulate);
    if (full_grads) {  // dW += dy^T x, db += column sums of dy
      cpu::matmul_tn<f32>(grad_of(this->layer(layer).w[pi]), dy, x, out, in, N, 1.0f, true);
      if (const f32* b = this->layer(layer).b[pi]) {
        f32* db = grad_of(b);
#pragma omp parallel for schedule(static)
        for (int64_t o = 0; o < out; ++o) {
          f32 sum = 0;
          for (int64_t n = 0; n < N; ++n) sum += dy[n * out + o];
          db[o] += sum;
        }
      }
    }
    const LoraSlot* s = a.slot(layer, p);
    if (!s) return;
    const int64_t r = a.spec.rank;
    const f32 scale = a.spec.scale();
    // dB += scale * dy^T u ; du = scale * dy B ; dA += du^T dropout(x) ; dx += dropout'(du A)
    cpu::matmul_tn<f32>(grads + s->b_offset, dy, u.data(), out, r, N, scale, true);
    cpu::matmul_nn<f32>(du.data(), dy, a.params.data() + s->b_offset, N, r, out, scale, false);
    const f32* xin = x;
    if (dropout > 0) {
      cpu::dropout_apply<f32>(xd.data(), x, N * in, dropout, proj_seed(seed, layer, p), false);
      xin = xd.data();
    }
    cpu::matmul_tn<f32>(grads + s->a_offset, du.data(), xin, r, in, N, 1.0f, true);
    if (dropout > 0) {
      cpu::matmul_nn<f32>(xd.data(), du.data(), a.params.data() + s->a_offset, N, in, r, 1.0f,
                          false);
      cpu::dropout_apply<f32>(dxo, xd.data(), N * in, dropout, proj_seed(seed, layer, p), true);
    } else {
      cpu::matmul_nn<f32>(dxo, du.data(), a.params.data() + s->a_offset, N, in, r, 1.0f, true);
    }
  }

  LayerActs& acts_for(int layer) { return acts[checkpointing ? 0 : layer]; }

  void layer_forward(int l, const MicroBatch& mb, const LoraAdapter& a, double dropout,
                     uint64_t seed) {
    const LayerWeights& L = layer(l);
    LayerActs& A = acts_for(l);
    const f32* x = resid[l].data();
    f32* x_out = resid[l + 1].data();
    const int64_t H = c.hidden_size, I = c.intermediate_size, d = c.head_dim;
    const int64_t Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;

    cpu::rms_norm_forward<f32>(A.xn1.data(), A.rstd1.data(), x, L.input_norm, N, H, c.rms_norm_eps);
    auto& U = A.lora_u;
    linear_forward(A.q.data(), A.xn1.data(), l, Proj::q, a, U[0], dropout, seed);
    linear_forward(A.k.data(), A.xn1.data(), l, Proj::k, a, U[1], dropout, seed);
    linear_forward(A.v.data(), A.xn1.data(), l, Proj::v, a, U[2], dropout, seed);
    if (c.qk_norm) {
      A.q_pre = A.q;
      A.k_pre = A.k;
      cpu::rms_norm_forward<f32>(A.q.data(), A.rstd_q.data(), A.q_pre.data(), L.q_norm, N * Hq, d,
                                 c.rms_norm_eps);
      cpu::rms_norm_forward<f32>(A.k.data(), A.rstd_k.data(), A.k_pre.data(), L.k_norm, N * Hkv, d,
                                 c.rms_norm_eps);
    }
    cpu::rope_forward<f32>(A.q.data(), rope_cos.data(), rope_sin.data(), mb.positions.data(), N, Hq, d);
    cpu::rope_forward<f32>(A.k.data(), rope_cos.data(), rope_sin.data(), mb.positions.data(), N, Hkv, d);
    cpu::attention_forward<f32>(A.att.data(), A.lse.data(), A.q.data(), A.k.data(), A.v.data(),
                                mb.seq_start.data(), mb.num_seqs(), Hq, Hkv, d);
    linear_forward(tmp_h.data(), A.att.data(), l, Proj::o, a, U[3], dropout, seed);
    for (int64_t i = 0; i < N * H; ++i) A.x_mid[i] = x[i] + tmp_h[i];

    cpu::rms_norm_forward<f32>(A.xn2.data(), A.rstd2.data(), A.x_mid.data(), L.post_norm, N, H,
                               c.rms_norm_eps);
    linear_forward(A.gate.data(), A.xn2.data(), l, Proj::gate, a, U[4], dropout, seed);
    linear_forward(A.up.data(), A.xn2.data(), l, Proj::up, a, U[5], dropout, seed);
    cpu::swiglu_forward<f32>(A.h.data(), A.gate.data(), A.up.data(), N * I);
    linear_forward(tmp_h.data(), A.h.data(), l, Proj::down, a, U[6], dropout, seed);
    for (int64_t i = 0; i < N * H; ++i) x_out[i] = A.x_mid[i] + tmp_h[i];
  }

  // On entry dx = dLoss/d(layer output); on exit dx = dLoss/d(layer input).
  void layer_backward(int l, const MicroBatch& mb, const LoraAdapter& a, float* grads,
                      double dropout, uint64_t seed) {
    const LayerWeights& L = layer(l);
    LayerActs& A = acts_for(l);
    const f32* x = resid[l].data();
    const int64_t H = c.hidden_size, I = c.intermediate_size, d = c.head_dim;
    const int64_t Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;
    auto& U = A.lora_u;

    // MLP: x_out = x_mid + down(swiglu(gate(xn2), up(xn2)))
    dmid = dx;
    linear_backward(dh.data(), false, dx.data(), A.h.data(), l, Proj::down, a, U[6], grads, dropout, seed);
    cpu::swiglu_backward<f32>(dgate.data(), dup.data(), dh.data(), A.gate.data(), A.up.data(), N * I);
    linear_backward(dxn.data(), false, dgate.data(), A.xn2.data(), l, Proj::gate, a, U[4], grads, dropout, seed);
    linear_backward(dxn.data(), true, dup.data(), A.xn2.data(), l, Proj::up, a, U[5], grads, dropout, seed);
    cpu::rms_norm_backward<f32>(dmid.data(), dxn.data(), A.x_mid.data(), L.post_norm, A.rstd2.data(), N, H, true);
    if (full_grads) cpu::rms_norm_weight_backward<f32>(grad_of(L.post_norm), dxn.data(), A.x_mid.data(), A.rstd2.data(), N, H);

    // Attention: x_mid = x + o(attn(rope(q), rope(k), v))
    linear_backward(datt.data(), false, dmid.data(), A.att.data(), l, Proj::o, a, U[3], grads, dropout, seed);
    cpu::attention_backward<f32>(dq.data(), dk.data(), dv.data(), datt.data(), A.att.data(),
                                 A.lse.data(), A.q.data(), A.k.data(), A.v.data(),
                                 mb.seq_start.data(), mb.num_seqs(), Hq, Hkv, d);
    cpu::rope_backward<f32>(dq.data(), rope_cos.data(), rope_sin.data(), mb.positions.data(), N, Hq, d);
    cpu::rope_backward<f32>(dk.data(), rope_cos.data(), rope_sin.data(), mb.positions.data(), N, Hkv, d);
    if (c.qk_norm) {
      // dtmp holds the pre-norm gradient; copy back so dq/dk are w.r.t. the projections.
      cpu::rms_norm_backward<f32>(dtmp.data(), dq.data(), A.q_pre.data(), L.q_norm, A.rstd_q.data(), N * Hq, d, false);
      if (full_grads) cpu::rms_norm_weight_backward<f32>(grad_of(L.q_norm), dq.data(), A.q_pre.data(), A.rstd_q.data(), N * Hq, d);
      std::copy_n(dtmp.data(), N * c.q_dim(), dq.data());
      cpu::rms_norm_backward<f32>(dtmp.data(), dk.data(), A.k_pre.data(), L.k_norm, A.rstd_k.data(), N * Hkv, d, false);
      if (full_grads) cpu::rms_norm_weight_backward<f32>(grad_of(L.k_norm), dk.data(), A.k_pre.data(), A.rstd_k.data(), N * Hkv, d);
      std::copy_n(dtmp.data(), N * c.kv_dim(), dk.data());
    }
    linear_backward(dxn.data(), false, dq.data(), A.xn1.data(), l, Proj::q, a, U[0], grads, dropout, seed);
    linear_backward(dxn.data(), true, dk.data(), A.xn1.data(), l, Proj::k, a, U[1], grads, dropout, seed);
    linear_backward(dxn.data(), true, dv.data(), A.xn1.data(), l, Proj::v, a, U[2], grads, dropout, seed);
    dx = dmid;
    cpu::rms_norm_backward<f32>(dx.data(), dxn.data(), x, L.input_norm, A.rstd1.data(), N, H, true);
    if (full_grads) cpu::rms_norm_weight_backward<f32>(grad_of(L.input_norm), dxn.data(), x, A.rstd1.data(), N, H);
  }

  // Final norm, lm_head and cross-entropy over the rows that carry a label, in chunks so
  // full logits [N, V] never exist. Writes dx = dLoss/d(last residual) when grads wanted.
  LossSum head(const MicroBatch& mb, bool want_grad, float loss_scale) {
    const int64_t H = c.hidden_size, V = c.vocab_size;
    const f32* xl = resid[c.num_hidden_layers].data();
    std::vector<f32> xf(N * H), rstd(N);
    cpu::rms_norm_forward<f32>(xf.data(), rstd.data(), xl, final_norm_w(), N, H, c.rms_norm_eps);
    std::vector<int64_t> rows;
    for (int64_t n = 0; n < N; ++n)
      if (mb.targets[n] >= 0) {
        if (mb.targets[n] >= V)
          throw std::runtime_error("label id " + std::to_string(mb.targets[n]) +
                                   " is outside the vocabulary (" + std::to_string(V) + ")");
        rows.push_back(n);
      }
    LossSum out;
    out.num_targets = static_cast<int64_t>(rows.size());
    std::vector<f32> dxf;
    if (want_grad) dxf.assign(N * H, 0.0f);
    const int64_t chunk = 256;
    std::vector<f32> xc, logits, dlogits, dxc;
    std::vector<int32_t> tc;
    for (size_t r0 = 0; r0 < rows.size(); r0 += chunk) {
      const int64_t m = std::min<int64_t>(chunk, rows.size() - r0);
      xc.resize(m * H); tc.resize(m); logits.resize(m * V); dlogits.resize(m * V);
      for (int64_t i = 0; i < m; ++i) {
        std::copy_n(xf.data() + rows[r0 + i] * H, H, xc.data() + i * H);
        tc[i] = mb.targets[rows[r0 + i]];
      }
      cpu::matmul_nt<f32>(logits.data(), xc.data(), lm_head_w(), m, V, H, 1.0f, false);
      out.loss_sum += cpu::cross_entropy_forward_backward<f32>(dlogits.data(), logits.data(),
                                                               tc.data(), m, V, loss_scale);
      if (!want_grad) continue;
      dxc.resize(m * H);
      cpu::matmul_nn<f32>(dxc.data(), dlogits.data(), lm_head_w(), m, H, V, 1.0f, false);
      if (full_grads) cpu::matmul_tn<f32>(grad_of(lm_head_w()), dlogits.data(), xc.data(), V, H, m, 1.0f, true);
      for (int64_t i = 0; i < m; ++i)
        std::copy_n(dxc.data() + i * H, H, dxf.data() + rows[r0 + i] * H);
    }
    if (want_grad)
      cpu::rms_norm_backward<f32>(dx.data(), dxf.data(), xl, final_norm_w(), rstd.data(), N, H, false);
    if (want_grad && full_grads)
      cpu::rms_norm_weight_backward<f32>(grad_of(final_norm_w()), dxf.data(), xl, rstd.data(), N, H);
    return out;
  }

  void embed(const MicroBatch& mb) {
    const int64_t H = c.hidden_size;
    for (int64_t n = 0; n < N; ++n) {
      const int32_t t = mb.tokens[n];
      if (t < 0 || t >= c.vocab_size)
        throw std::runtime_error("token id " + std::to_string(t) + " is outside the vocabulary (" +
                                 std::to_string(c.vocab_size) + ")");
      std::copy_n(embed_table() + static_cast<int64_t>(t) * H, H, resid[0].data() + n * H);
    }
  }

  // Full fine-tuning, after the last layer's backward (dx = dLoss/d(embeddings)): scatter-add
  // into the embedding rows, tokens in order (deterministic). Tied: the lm_head's gradient
  // is already in the same rows.
  void embed_backward(const MicroBatch& mb) {
    const int64_t H = c.hidden_size;
    f32* g = grad_of(embed_table());
    for (int64_t n = 0; n < N; ++n) {
      f32* row = g + static_cast<int64_t>(mb.tokens[n]) * H;
      for (int64_t i = 0; i < H; ++i) row[i] += dx[n * H + i];
    }
  }

  // An empty micro-batch computes nothing, but under ZeRO-3 it still takes part in the layer
  // gathers the other ranks run: the same layers in the same order as a real step.
  void walk_layers(bool backward) {
    const int L = static_cast<int>(c.num_hidden_layers);
    if (trained) {  // full fine-tuning's blocks: run()'s gathers and flushes, in its order
      embed_table();
      for (int l = 0; l < L; ++l) layer(l);
      final_norm_w();
      lm_head_w();
      if (!backward) return;
      trained->flush_tail();
      for (int l = L - 1; l >= 0; --l) {
        layer(l);
        trained->flush_layer(l);
      }
      embed_table();
      trained->flush_embed();
      return;
    }
    for (int l = 0; l < L; ++l) layer(l);
    if (backward)
      for (int l = L - 2; l >= 0; --l) layer(l);
  }

  LossSum run(const MicroBatch& mb, const LoraAdapter& adapter, float* grads, float loss_scale,
              uint64_t dropout_seed) {
    prepare(mb, adapter);
    const double p = adapter.spec.dropout;
    embed(mb);
    for (int l = 0; l < c.num_hidden_layers; ++l) layer_forward(l, mb, adapter, p, dropout_seed);
    LossSum out = head(mb, true, loss_scale);
    if (trained) trained->flush_tail();
    for (int l = c.num_hidden_layers - 1; l >= 0; --l) {
      // Under checkpointing the shared activations hold the last layer run: recompute.
      if (checkpointing && l != c.num_hidden_layers - 1)
        layer_forward(l, mb, adapter, p, dropout_seed);
      layer_backward(l, mb, adapter, grads, p, dropout_seed);
      if (trained) trained->flush_layer(l);
    }
    if (full_grads) embed_backward(mb);
    if (trained) trained->flush_embed();
    return out;
  }
};

CpuTransformer::CpuTransformer(const BaseWeights& weights, bool gradient_checkpointing)
    : impl_(std::make_unique<Impl>(&weights, nullptr, nullptr, gradient_checkpointing)) {}
CpuTransformer::CpuTransformer(std::unique_ptr<Zero3Weights> shards, bool gradient_checkpointing)
    : impl_(std::make_unique<Impl>(nullptr, std::move(shards), nullptr, gradient_checkpointing)) {}
CpuTransformer::CpuTransformer(Zero3TrainedWeights& shards, bool gradient_checkpointing)
    : impl_(std::make_unique<Impl>(nullptr, nullptr, &shards, gradient_checkpointing)) {}
CpuTransformer::~CpuTransformer() = default;

const Zero3Weights* CpuTransformer::zero3() const { return impl_->zero3.get(); }

LossSum CpuTransformer::forward_backward(const MicroBatch& mb, const LoraAdapter& adapter,
                                         float* grads, float loss_scale, uint64_t dropout_seed) {
  Impl& m = *impl_;
  if (m.trained)
    throw std::logic_error("forward_backward: ZeRO-3 full fine-tuning trains through "
                           "forward_backward_full");
  if (mb.num_tokens() == 0) {
    if (m.zero3) m.walk_layers(true);
    return {};
  }
  return m.run(mb, adapter, grads, loss_scale, dropout_seed);
}

LossSum CpuTransformer::forward_backward_full(const MicroBatch& mb, float* grads,
                                              float loss_scale) {
  Impl& m = *impl_;
  if (m.zero3)
    throw std::logic_error("forward_backward_full: the frozen ZeRO-3 shards cannot be trained");
  if (m.trained ? grads != nullptr : grads == nullptr)
    throw std::logic_error("forward_backward_full: grads go to the trained shards under ZeRO-3, "
                           "and to `grads` otherwise");
  if (mb.num_tokens() == 0) {
    if (m.trained) m.walk_layers(true);
    return {};
  }
  m.full = grads;
  m.full_grads = true;
  struct Reset {  // LoRA steps after this one (or after a throw) form no base gradients
    Impl& m;
    ~Reset() { m.full = nullptr; m.full_grads = false; }
  } reset{m};
  return m.run(mb, m.no_lora, nullptr, loss_scale, 0);
}

LossSum CpuTransformer::forward_loss(const MicroBatch& mb, const LoraAdapter& adapter) {
  Impl& m = *impl_;
  if (mb.num_tokens() == 0) {
    if (m.zero3 || m.trained) m.walk_layers(false);
    return {};
  }
  m.prepare(mb, adapter);
  m.embed(mb);
  for (int l = 0; l < m.c.num_hidden_layers; ++l) m.layer_forward(l, mb, adapter, 0.0, 0);
  return m.head(mb, false, 1.0f);
}

}  // namespace ftune
