// Full fine-tuning's gradient on the CPU reference backend (forward_backward_full, the
// building block of use_peft = false): every base weight's gradient against central finite
// differences for the llama / qwen2 (biases, tied embeddings) / qwen3 (q/k norms) variants,
// against the PEFT-verified LoRA path (with B = 0, dB = scale dW A^T exactly), and
// checkpointing / accumulation behaviour.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "model_test_util.hpp"

using namespace ftune;
using namespace ftune::mtest;

namespace {

ModelConfig variant(char which) {
  ModelConfig c = tiny_config();
  if (which == 'b') {  // qwen2: q/k/v biases, tied embeddings
    c.model_type = "qwen2";
    c.attention_bias = true;
    c.tie_word_embeddings = true;
  } else if (which == 'c') {  // qwen3: per-head q/k RMSNorm
    c.model_type = "qwen3";
    c.qk_norm = true;
  }
  return c;
}

struct Fixture {
  BaseWeights w;
  MicroBatch mb;
  explicit Fixture(const ModelConfig& cfg) {
    build_model(w, cfg, 101);
    mb = pack(make_examples({7, 12, 5}, static_cast<int>(cfg.vocab_size), 303));
  }
  std::vector<float> grads(CpuTransformer& m, float scale = 1.f) {
    std::vector<float> g(w.storage.size(), 0.f);
    m.forward_backward_full(mb, g.data(), scale);
    return g;
  }
};

}  // namespace

// Central differences on the summed loss, h = 1e-2 (the error budget of
// test_model_transformer.cpp: fp32 rounding ~1e-4 against truncation). In every tensor the
// entry with the largest gradient and two random ones are checked: together over 80 entries
// covering embeddings, every norm, every projection and bias, lm_head.
TEST_CASE("full fine-tuning gradient of every base weight matches finite differences") {
  for (char which : {'a', 'b', 'c'}) {
    const ModelConfig cfg = variant(which);
    SUBCASE(std::string(1, which).c_str()) {
      Fixture f(cfg);
      CpuTransformer model(f.w, false);
      const std::vector<float> g = f.grads(model);
      std::vector<float> scratch(f.w.storage.size());
      auto loss = [&] { return model.forward_backward_full(f.mb, scratch.data(), 1.f).loss_sum; };
      std::mt19937_64 rng(7);
      std::vector<double> got, fd;
      int tensors = 0;
      for (const auto& e : BaseWeights::layout(cfg)) {
        ++tensors;
        const size_t n = e.numel();
        size_t top = e.offset;
        for (size_t i = e.offset; i < e.offset + n; ++i)
          if (std::abs(g[i]) > std::abs(g[top])) top = i;
        CHECK_MESSAGE(g[top] != 0.f, e.name << " has no gradient at all");
        for (size_t idx : {top, e.offset + rng() % n, e.offset + rng() % n}) {
          float& p = f.w.storage[idx];
          const float p0 = p;
          p = p0 + 1e-2f;
          const double xp = p, lp = loss();
          p = p0 - 1e-2f;
          const double xm = p, lm = loss();
          p = p0;
          fd.push_back((lp - lm) / (xp - xm));
          got.push_back(g[idx]);
          INFO(e.name << "[" << idx - e.offset << "]: analytic " << g[idx] << ", fd " << fd.back());
          CHECK(std::abs(fd.back() - g[idx]) <= 2e-2 * std::abs(g[idx]) + 2e-3);
        }
      }
      const double rel = rel_err(got, fd);
      MESSAGE("variant " << std::string(1, which) << ": " << tensors << " tensors, ||g - fd|| / ||g|| = " << rel);
      CHECK(rel < 1e-2);
      // The check has teeth: a norm-weight gradient left at zero, or 5% off overall, fails.
      std::vector<double> scaled(got);
      for (double& x : scaled) x *= 1.05;
      CHECK(rel_err(scaled, fd) > 1e-2);
    }
  }
}

// With B = 0 (PEFT's init) a LoRA model computes the base model, and its dB is exactly
// scale dW A^T (dB = scale dy^T (x A^T), dW = dy^T x): the LoRA path is checked against PEFT
// runs (test_e2e_reference), so this ties the full gradient of every projection to it.
TEST_CASE("full fine-tuning's projection gradients agree with LoRA's dB at B = 0") {
  for (char which : {'a', 'b', 'c'}) {
    const ModelConfig cfg = variant(which);
    SUBCASE(std::string(1, which).c_str()) {
      Fixture f(cfg);
      LoraAdapter a;
      a.allocate(cfg, tiny_spec());
      a.init_peft_default(5);  // B = 0
      CpuTransformer model(f.w, false);
      const std::vector<float> g = f.grads(model);
      const Result lora = run_fb(model, f.mb, a);
      const float scale = a.spec.scale();
      double worst = 0;
      for (const LoraSlot& s : a.slots) {
        const float* W = f.w.layers[s.layer].w[static_cast<int>(s.proj)];
        const float* dW = g.data() + (W - f.w.storage.data());
        const float* A = a.params.data() + s.a_offset;
        std::vector<double> want(s.out * a.spec.rank), have(want.size());
        for (int64_t o = 0; o < s.out; ++o)
          for (int64_t k = 0; k < a.spec.rank; ++k) {
            double acc = 0;
            for (int64_t i = 0; i < s.in; ++i) acc += double(dW[o * s.in + i]) * A[k * s.in + i];
            want[o * a.spec.rank + k] = scale * acc;
            have[o * a.spec.rank + k] = lora.grads[s.b_offset + o * a.spec.rank + k];
          }
        worst = std::max(worst, rel_err(want, have));
      }
      MESSAGE("variant " << std::string(1, which) << ": worst slot ||scale dW A^T - dB|| / ||dB|| = " << worst);
      CHECK(worst < 1e-5);
    }
  }
}

TEST_CASE("full fine-tuning: checkpointing bit-identical, gradients accumulate and scale") {
  const ModelConfig cfg = variant('c');
  Fixture f(cfg);
  CpuTransformer plain(f.w, false), ckpt(f.w, true);
  const std::vector<float> g0 = f.grads(plain), g1 = f.grads(ckpt);
  CHECK(std::memcmp(g0.data(), g1.data(), g0.size() * sizeof(float)) == 0);
  std::vector<float> twice(g0.size(), 0.f);
  plain.forward_backward_full(f.mb, twice.data(), 1.f);
  plain.forward_backward_full(f.mb, twice.data(), 1.f);
  const std::vector<float> half = f.grads(plain, 0.5f);
  size_t bad = 0;
  // Not bit-exact: a tensor with several contributions (lm_head chunks, tied embeddings)
  // sums them in another order the second time.
  for (size_t i = 0; i < g0.size(); ++i) {
    bad += std::abs(twice[i] - 2 * g0[i]) > 1e-6f * (std::abs(g0[i]) + 1e-3f);
    bad += std::abs(half[i] - 0.5f * g0[i]) > 1e-6f * (std::abs(g0[i]) + 1e-3f);
  }
  CHECK(bad == 0);
  // LoRA's micro-step on the same object afterwards is unaffected (no full gradients left on).
  LoraAdapter a;
  a.allocate(cfg, tiny_spec());
  a.init_peft_default(5);
  const Result r0 = run_fb(plain, f.mb, a);
  CpuTransformer fresh(f.w, false);
  const Result r1 = run_fb(fresh, f.mb, a);
  CHECK(std::memcmp(r0.grads.data(), r1.grads.data(), r0.grads.size() * sizeof(float)) == 0);
}
