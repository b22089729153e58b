#pragma once
// Helpers for the whole-model tests (tests/test_model_*.cpp): tiny random decoders in the
// Llama / Qwen2 / Qwen3 styles, random non-zero LoRA adapters, packed batches, and vector
// error metrics. Only the model module is used (these tests link ftune_model alone).
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "ftune/model/batch.hpp"
#include "ftune/model/lora.hpp"
#include "ftune/model/model_config.hpp"
#include "ftune/model/transformer_cpu.hpp"
#include "ftune/model/weights.hpp"

namespace ftune::mtest {

// hidden 32, 2 layers, 4 query heads / 2 kv heads of 8, vocab 64, intermediate 48.
inline ModelConfig tiny_config(const std::string& model_type = "llama") {
  ModelConfig c;
  c.model_type = model_type;
  c.vocab_size = 64;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-6;
  return c;
}

// rank 4, alpha 8 (scale 2), every projection targeted, no dropout.
inline LoraSpec tiny_spec() {
  LoraSpec s;
  s.rank = 4;
  s.alpha = 8.0;
  s.targets.fill(true);
  return s;
}

// A random base model. Weights ~ N(0, std) with std ~ 1/sqrt(hidden) so attention and the
// MLP are far from linear; unlike a fresh HF init, every norm weight is 1 + U(-0.3, 0.3) and
// biases (when present) are N(0, 0.3), so a backward that ignores them shows up.
inline void build_model(BaseWeights& w, const ModelConfig& cfg, uint64_t seed,
                        double std = 0.15) {
  const auto entries = w.allocate(cfg);
  init_random_weights(w, seed, std);
  std::mt19937_64 rng(seed ^ 0x5eedull);
  std::uniform_real_distribution<float> around_one(0.7f, 1.3f);
  std::normal_distribution<float> bias(0.0f, 0.3f);
  for (const auto& e : entries) {
    const bool is_norm = e.name.find("norm.weight") != std::string::npos;
    const bool is_bias = e.name.size() > 5 && e.name.rfind(".bias") == e.name.size() - 5;
    if (!is_norm && !is_bias) continue;
    float* p = w.storage.data() + e.offset;
    for (int64_t i = 0; i < e.shape[0]; ++i) p[i] = is_norm ? around_one(rng) : bias(rng);
  }
}

// PEFT's A init, then B ~ U(-b_mag, b_mag): with B = 0 the A gradients vanish and the
// whole LoRA input-gradient path would go untested.
inline void build_adapter(LoraAdapter& a, const ModelConfig& cfg, const LoraSpec& spec,
                          uint64_t seed, float b_mag = 0.3f) {
  a.allocate(cfg, spec);
  a.init_peft_default(seed);
  std::mt19937_64 rng(seed ^ 0xb0b0ull);
  std::uniform_real_distribution<float> U(-b_mag, b_mag);
  for (const LoraSlot& s : a.slots)
    for (int64_t i = 0; i < s.out * spec.rank; ++i) a.params[s.b_offset + i] = U(rng);
}

// Random examples of the given lengths. The first two labels of each are -100 (a prompt),
// and a few more are dropped at random, so ignored targets occur mid-sequence too.
inline std::vector<Example> make_examples(const std::vector<int>& lengths, int vocab,
                                          uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> tok(0, vocab - 1);
  std::bernoulli_distribution drop(0.2);
  std::vector<Example> out(lengths.size());
  for (size_t e = 0; e < lengths.size(); ++e) {
    for (int t = 0; t < lengths[e]; ++t) {
      const int32_t id = tok(rng);
      out[e].input_ids.push_back(id);
      out[e].labels.push_back(t < 2 || drop(rng) ? -100 : id);
    }
  }
  return out;
}

inline MicroBatch pack(const std::vector<Example>& ex) {
  std::vector<const Example*> ptrs;
  for (const Example& e : ex) ptrs.push_back(&e);
  return make_micro_batch(ptrs);
}

struct Result {
  LossSum loss;
  std::vector<float> grads;
};

// One forward_backward from zeroed gradients.
inline Result run_fb(CpuTransformer& m, const MicroBatch& mb, const LoraAdapter& a,
                     uint64_t dropout_seed = 1234, float loss_scale = 1.0f) {
  Result r;
  r.grads.assign(a.params.size(), 0.0f);
  r.loss = m.forward_backward(mb, a, r.grads.data(), loss_scale, dropout_seed);
  return r;
}

inline double norm(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

// ||ref - got|| / ||ref||
inline double rel_err(const std::vector<double>& ref, const std::vector<double>& got) {
  std::vector<double> d(ref.size());
  for (size_t i = 0; i < ref.size(); ++i) d[i] = ref[i] - got[i];
  return norm(d) / norm(ref);
}

inline double cosine(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s / (norm(a) * norm(b));
}

inline std::vector<double> to_double(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

}  // namespace ftune::mtest
