// Inference forward with a KV cache. Same math as CpuTransformer::layer_forward (same ops,
// same attention formula), but queries of the new tokens attend to every cached key, and
// only the last token goes through lm_head.
#include "ftune/model/generate.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

#include "ftune/kernels/cpu_ops.hpp"
#include "ftune/model/transformer_cpu.hpp"

namespace ftune {

namespace {

// Uniform double in [0, 1) from the top 53 bits: the same stream on every platform (unlike
// std::uniform_real_distribution, whose algorithm is implementation-defined).
double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

}  // namespace

int32_t pick_token(const float* logits, int64_t V, const SamplingParams& p, std::mt19937_64& rng) {
  if (V <= 0) throw std::runtime_error("pick_token: empty vocabulary");
  if (p.temperature <= 0)
    return static_cast<int32_t>(std::max_element(logits, logits + V) - logits);
  // Softmax of logits / T in double, most likely first (ties: lower id first).
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int64_t keep = (p.top_k > 0 && p.top_k < V) ? p.top_k : V;
  std::vector<double> prob(keep);
  const double mx = logits[order[0]];
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i)
    sum += prob[i] = std::exp((logits[order[i]] - mx) / p.temperature);
  if (p.top_p < 1.0) {
    // Smallest prefix whose mass reaches top_p (at least one token), as HF's TopPLogitsWarper.
    double cum = 0;
    int64_t n = 0;
    while (n < keep && cum < p.top_p * sum) cum += prob[n++];
    keep = std::max<int64_t>(n, 1);
    sum = 0;
    for (int64_t i = 0; i < keep; ++i) sum += prob[i];
  }
  const double u = uniform01(rng) * sum;
  double cum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    cum += prob[i];
    if (u < cum) return order[i];
  }
  return order[keep - 1];  // u within rounding of sum
}

struct CpuGenerator::Impl {
  const BaseWeights& w;
  const ModelConfig& c;
  std::vector<double> inv_freq;
  std::vector<float> rope_cos, rope_sin;  // [positions, head_dim/2]
  int64_t rope_positions = 0;
  int64_t cached = 0;
  std::vector<std::vector<float>> kcache, vcache;  // per layer [cached, kv_dim], after RoPE
  // Buffers for the tokens of one feed() (T rows).
  std::vector<float> x, xn, q, k, v, qk_pre, rstd, att, tmp, gate, up, h, logits;
  std::vector<int32_t> positions;

  explicit Impl(const BaseWeights& weights)
      : w(weights), c(weights.cfg), inv_freq(rope_inv_freq(weights.cfg)),
        kcache(c.num_hidden_layers), vcache(c.num_hidden_layers) {}

  // Same tables as the training forward (angle formed in fp32, as HF does).
  void ensure_rope(int64_t n) {
    if (n <= rope_positions) return;
    const int64_t half = c.head_dim / 2;
    const int64_t cap = std::max<int64_t>(n, 2 * rope_positions);
    rope_cos.resize(cap * half);
    rope_sin.resize(cap * half);
    for (int64_t p = rope_positions; p < cap; ++p)
      for (int64_t i = 0; i < half; ++i) {
        const float angle = static_cast<float>(inv_freq[i]) * static_cast<float>(p);
        rope_cos[p * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
        rope_sin[p * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
    rope_positions = cap;
  }

  void linear(float* y, const float* in, int64_t T, int layer, Proj p) {
    const int pi = static_cast<int>(p);
    const int64_t nin = proj_in_features(c, p), nout = proj_out_features(c, p);
    cpu::matmul_nt<float>(y, in, w.layers[layer].w[pi], T, nout, nin, 1.0f, false);
    if (const float* b = w.layers[layer].b[pi])
      for (int64_t t = 0; t < T; ++t)
        for (int64_t o = 0; o < nout; ++o) y[t * nout + o] += b[o];
  }

  // att[T, Hq*d]: new token t (position p0 + t) attends to cached positions 0..p0 + t,
  // with the arithmetic of cpu::attention_forward.
  void attend(int layer, int64_t T, int64_t p0) {
    const int64_t d = c.head_dim, Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;
    const int64_t group = Hq / Hkv, qs = Hq * d, kvs = Hkv * d;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    const float* K = kcache[layer].data();
    const float* Vc = vcache[layer].data();
#pragma omp parallel
    {
      std::vector<float> s;
#pragma omp for schedule(dynamic, 4) collapse(2)
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t hh = 0; hh < Hq; ++hh) {
          const int64_t i = p0 + t, kh = hh / group;
          const float* qi = q.data() + t * qs + hh * d;
          s.resize(i + 1);
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j <= i; ++j) {
            const float* kj = K + j * kvs + kh * d;
            float dot = 0;
            for (int64_t e = 0; e < d; ++e) dot += qi[e] * kj[e];
            s[j] = dot * scale;
            mx = std::max(mx, s[j]);
          }
          float sum = 0;
          for (float& e : s) sum += e = std::exp(e - mx);
          float* o = att.data() + t * qs + hh * d;
          std::fill(o, o + d, 0.0f);
          for (int64_t j = 0; j <= i; ++j) {
            const float pj = s[j] / sum;
            const float* vj = Vc + j * kvs + kh * d;
            for (int64_t e = 0; e < d; ++e) o[e] += pj * vj[e];
          }
        }
      }
    }
  }

  void layer(int l, int64_t T, int64_t p0) {
    const LayerWeights& L = w.layers[l];
    const int64_t H = c.hidden_size, I = c.intermediate_size, d = c.head_dim;
    const int64_t Hq = c.num_attention_heads, Hkv = c.num_key_value_heads, kvd = c.kv_dim();
    const double eps = c.rms_norm_eps;
    cpu::rms_norm_forward<float>(xn.data(), rstd.data(), x.data(), L.input_norm, T, H, eps);
    linear(q.data(), xn.data(), T, l, Proj::q);
    linear(k.data(), xn.data(), T, l, Proj::k);
    linear(v.data(), xn.data(), T, l, Proj::v);
    if (c.qk_norm) {
      qk_pre.assign(q.begin(), q.end());
      cpu::rms_norm_forward<float>(q.data(), rstd.data(), qk_pre.data(), L.q_norm, T * Hq, d, eps);
      qk_pre.assign(k.begin(), k.end());
      cpu::rms_norm_forward<float>(k.data(), rstd.data(), qk_pre.data(), L.k_norm, T * Hkv, d, eps);
    }
    const int32_t* pos = positions.data();
    cpu::rope_forward<float>(q.data(), rope_cos.data(), rope_sin.data(), pos, T, Hq, d);
    cpu::rope_forward<float>(k.data(), rope_cos.data(), rope_sin.data(), pos, T, Hkv, d);
    kcache[l].insert(kcache[l].end(), k.begin(), k.begin() + T * kvd);
    vcache[l].insert(vcache[l].end(), v.begin(), v.begin() + T * kvd);
    attend(l, T, p0);
    linear(tmp.data(), att.data(), T, l, Proj::o);
    for (int64_t i = 0; i < T * H; ++i) x[i] += tmp[i];

    cpu::rms_norm_forward<float>(xn.data(), rstd.data(), x.data(), L.post_norm, T, H, eps);
    linear(gate.data(), xn.data(), T, l, Proj::gate);
    linear(up.data(), xn.data(), T, l, Proj::up);
    cpu::swiglu_forward<float>(h.data(), gate.data(), up.data(), T * I);
    linear(tmp.data(), h.data(), T, l, Proj::down);
    for (int64_t i = 0; i < T * H; ++i) x[i] += tmp[i];
  }

  const std::vector<float>& feed(const std::vector<int32_t>& tokens) {
    const int64_t T = static_cast<int64_t>(tokens.size());
    if (T == 0) throw std::runtime_error("CpuGenerator::feed: no tokens");
    const int64_t H = c.hidden_size, I = c.intermediate_size, p0 = cached;
    const int64_t rows = std::max<int64_t>(T * c.num_attention_heads, T);
    x.resize(T * H); xn.resize(T * H); tmp.resize(T * H); rstd.resize(rows);
    q.resize(T * c.q_dim()); att.resize(T * c.q_dim());
    k.resize(T * c.kv_dim()); v.resize(T * c.kv_dim());
    gate.resize(T * I); up.resize(T * I); h.resize(T * I);
    positions.resize(T);
    for (int64_t t = 0; t < T; ++t) {
      const int32_t id = tokens[t];
      if (id < 0 || id >= c.vocab_size)
        throw std::runtime_error("token id " + std::to_string(id) + " is outside the vocabulary (" +
                                 std::to_string(c.vocab_size) + ")");
      std::copy_n(w.embed + static_cast<int64_t>(id) * H, H, x.data() + t * H);
      positions[t] = static_cast<int32_t>(p0 + t);
    }
    ensure_rope(p0 + T);
    for (int l = 0; l < c.num_hidden_layers; ++l) layer(l, T, p0);
    cached = p0 + T;
    // Final norm and lm_head on the last token only.
    cpu::rms_norm_forward<float>(xn.data(), rstd.data(), x.data() + (T - 1) * H, w.final_norm, 1, H,
                                 c.rms_norm_eps);
    logits.resize(c.vocab_size);
    cpu::matmul_nt<float>(logits.data(), xn.data(), w.lm_head, 1, c.vocab_size, H, 1.0f, false);
    return logits;
  }

  void reset() {
    cached = 0;
    for (auto& kc : kcache) kc.clear();
    for (auto& vc : vcache) vc.clear();
  }
};

CpuGenerator::CpuGenerator(const BaseWeights& w) : impl_(std::make_unique<Impl>(w)) {
  if (w.layers.size() != static_cast<size_t>(w.cfg.num_hidden_layers) || !w.embed || !w.lm_head)
    throw std::runtime_error("CpuGenerator: weights are not allocated");
}
CpuGenerator::~CpuGenerator() = default;

void CpuGenerator::reset() { impl_->reset(); }
int64_t CpuGenerator::num_cached() const { return impl_->cached; }
const std::vector<float>& CpuGenerator::feed(const std::vector<int32_t>& tokens) {
  return impl_->feed(tokens);
}

std::vector<int32_t> CpuGenerator::generate(const std::vector<int32_t>& prompt,
                                            const GenerateOptions& o,
                                            const std::function<bool(int32_t)>& on_token) {
  if (prompt.empty()) throw std::runtime_error("generate: the prompt has no tokens");
  const int64_t V = impl_->c.vocab_size;
  const int64_t limit = o.vocab_limit > 0 ? std::min(o.vocab_limit, V) : V;
  std::mt19937_64 rng(o.sampling.seed);
  reset();
  std::vector<int32_t> out;
  const std::vector<float>* logits = &feed(prompt);
  for (int64_t i = 0; i < o.max_new_tokens; ++i) {
    const int32_t t = pick_token(logits->data(), limit, o.sampling, rng);
    if (std::find(o.stop_ids.begin(), o.stop_ids.end(), t) != o.stop_ids.end()) break;
    out.push_back(t);
    if (on_token && !on_token(t)) break;
    if (i + 1 < o.max_new_tokens) logits = &feed({t});
  }
  return out;
}

std::vector<float> last_token_logits(const BaseWeights& w, const std::vector<int32_t>& tokens) {
  CpuGenerator g(w);
  return g.feed(tokens);
}

}  // namespace ftune
