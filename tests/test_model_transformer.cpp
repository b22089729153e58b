// CPU reference backend, whole model: finite-difference gradient checks w.r.t. LoRA
// parameters for six architecture variants, gradient checkpointing (bit-identical),
// packing equivalence, forward_loss vs forward_backward, loss-scale linearity.
// The ops themselves are checked one by one in test_kernels_cpu_grads.cpp; here the
// question is whether the transformer wires them together correctly.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "model_test_util.hpp"

using namespace ftune;
using namespace ftune::mtest;

namespace {

constexpr uint64_t kDropoutSeed = 1234;

struct Variant {
  std::string name;
  ModelConfig cfg;
  LoraSpec spec;
};

// The variants of the brief, (a) .. (f), each on the tiny shapes of tiny_config().
Variant variant(char which) {
  Variant v{std::string(1, which), tiny_config(), tiny_spec()};
  switch (which) {
    case 'a':  // llama, GQA 4/2, untied lm_head, default rope
      v.name += " llama GQA untied";
      break;
    case 'b':  // qwen2: q/k/v biases (made non-zero by build_model), tied embeddings
      v.name += " qwen2 bias+tied";
      v.cfg.model_type = "qwen2";
      v.cfg.attention_bias = true;
      v.cfg.tie_word_embeddings = true;
      v.cfg.rope.theta = 1e6;
      break;
    case 'c':  // qwen3: per-head RMSNorm on q and k (weights 1 +- 0.3 from build_model)
      v.name += " qwen3 qk_norm";
      v.cfg.model_type = "qwen3";
      v.cfg.qk_norm = true;
      v.cfg.tie_word_embeddings = true;
      break;
    case 'd':  // llama3 rope scaling on tiny contexts: with head_dim 8, theta 1e4 the
               // wavelengths 6.3, 63, 628, 6283 hit the smoothed band [4, 16] and the /factor band
      v.name += " llama3-rope rslora";
      v.cfg.rope.type = "llama3";
      v.cfg.rope.factor = 8;
      v.cfg.rope.low_freq_factor = 1;
      v.cfg.rope.high_freq_factor = 4;
      v.cfg.rope.original_max_position_embeddings = 16;
      // rslora: scale alpha/sqrt(r) = 2 (as alpha/r in the other variants, so the FD
      // curvature is comparable), while alpha/r would be 1: a mixed-up scale is 2x off.
      v.spec.use_rslora = true;
      v.spec.alpha = 4;
      break;
    case 'e':  // LoRA dropout: masks hash (seed, layer, proj, element), fixed for FD
      v.name += " dropout 0.1";
      v.spec.dropout = 0.1;
      break;
    case 'f':  // only some projections carry LoRA
      v.name += " targets q,v,down";
      v.spec.targets = LoraSpec::parse_targets({"q_proj", "v_proj", "down_proj"});
      break;
  }
  return v;
}

struct Fixture {
  BaseWeights w;
  LoraAdapter a;
  MicroBatch mb;
  explicit Fixture(const Variant& v, std::vector<int> lengths = {7, 12, 5}) {
    build_model(w, v.cfg, 101);
    build_adapter(a, v.cfg, v.spec, 202);
    const auto ex = make_examples(lengths, static_cast<int>(v.cfg.vocab_size), 303);
    mb = pack(ex);
  }
};

// ------------------------------------------------------------------ finite differences
// Central differences on the summed loss (loss_scale = 1), fp32 model. Error budget:
//   truncation  ~ h^2 |L'''| / 6
//   rounding    ~ eps_f32 * sqrt(#targets) * |per-token loss| / (2h) ~ 6e-8 * 4 * 4 / 2h
// (~16 targets of cross-entropy ~4, each a float), against gradients of O(0.1..1).
// h = 1e-2 balances the two; measured on variant (a), ||g_fd - g|| / ||g|| is 3.7e-4 at
// h = 3e-3 (rounding-bound), 9e-5 at 1e-2, 6e-4 at 3e-2 (truncation-bound).
// The denominator uses the float-rounded actual step.
constexpr float kStep = 1e-2f;
constexpr double kMaxRel = 2e-2;    // ||g_fd - g|| / ||g|| over the sampled vector
constexpr double kMinCos = 0.999;   // ~ a 4.5 degree angle
constexpr int kSamples = 40;

struct FdResult {
  double rel, cos, worst_large, worst_entry;
};

// Every sampled entry, small ones too (a wrong gradient in one small slot hardly moves the
// vector error): |fd - g| <= 2e-2 |g| + 1e-3 ||g||. The absolute part is ~10x the FD noise
// floor (|fd - g| ~1e-4 at ||g|| ~5). Returns the worst ratio of error to allowance.
double worst_entry(const std::vector<double>& g, const std::vector<double>& fd) {
  double w = 0;
  for (size_t i = 0; i < g.size(); ++i)
    w = std::max(w, std::abs(fd[i] - g[i]) / (kMaxRel * std::abs(g[i]) + 1e-3 * norm(g)));
  return w;
}

FdResult fd_check(const Variant& v) {
  Fixture f(v);
  CpuTransformer model(f.w, false);
  const Result ref = run_fb(model, f.mb, f.a, kDropoutSeed);
  std::vector<float> scratch(f.a.params.size());
  // The loss forward_backward differentiates: same dropout seed, so the same masks.
  auto loss = [&] {
    return model.forward_backward(f.mb, f.a, scratch.data(), 1.0f, kDropoutSeed).loss_sum;
  };

  // A and B alternately, cycling over every slot (both layers, all targeted projections).
  std::mt19937_64 rng(404);
  const int64_t r = f.a.spec.rank;
  std::vector<double> g, fd;
  for (int k = 0; k < kSamples; ++k) {
    const LoraSlot& s = f.a.slots[(k / 2) % f.a.slots.size()];
    const bool is_a = k % 2 == 0;
    const size_t n = static_cast<size_t>(is_a ? r * s.in : s.out * r);
    const size_t idx = (is_a ? s.a_offset : s.b_offset) + rng() % n;
    float& p = f.a.params[idx];
    const float p0 = p;
    p = p0 + kStep;
    const double x_plus = p, l_plus = loss();
    p = p0 - kStep;
    const double x_minus = p, l_minus = loss();
    p = p0;
    fd.push_back((l_plus - l_minus) / (x_plus - x_minus));
    g.push_back(ref.grads[idx]);
  }

  FdResult out{rel_err(g, fd), cosine(g, fd), 0, worst_entry(g, fd)};
  // The two largest sampled entries must also match one by one.
  std::vector<size_t> order(g.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](size_t i, size_t j) { return std::abs(g[i]) > std::abs(g[j]); });
  for (int t = 0; t < 2; ++t) {
    const size_t i = order[t];
    out.worst_large = std::max(out.worst_large, std::abs(fd[i] - g[i]) / std::abs(g[i]));
  }

  // The check has teeth: a gradient off by 5% (a wrong scale such as alpha/r vs
  // alpha/sqrt(r) is far worse) fails it, and so does one wrong sign among the top entries.
  std::vector<double> scaled(g), flipped(g);
  for (double& x : scaled) x *= 1.05;
  flipped[order[1]] = -flipped[order[1]];
  CHECK(rel_err(scaled, fd) > kMaxRel);
  CHECK((rel_err(flipped, fd) > kMaxRel && cosine(flipped, fd) < kMinCos));
  // ... and a median-sized entry off by 2x fails the per-entry check.
  std::vector<double> small_off(g);
  small_off[order[order.size() / 2]] *= 2;
  CHECK(worst_entry(small_off, fd) > 1);
  return out;
}

}  // namespace

TEST_CASE("whole-model gradient w.r.t. LoRA A and B matches finite differences") {
  // Measured (print with -s): rel 1.1e-4 .. 4.7e-4 for all six variants, 40-180x below
  // the bar; per-entry ratio <= 0.04. Deterministic: fixed seeds, thread-count-free ops.
  for (char which : {'a', 'b', 'c', 'd', 'e', 'f'}) {
    const Variant v = variant(which);
    SUBCASE(v.name.c_str()) {
      const FdResult r = fd_check(v);
      MESSAGE(v.name << ": rel " << r.rel << ", 1-cos " << 1 - r.cos << ", top-2 entries "
                     << r.worst_large << ", per-entry " << r.worst_entry);
      CHECK(r.rel < kMaxRel);
      CHECK(r.cos > kMinCos);
      CHECK(r.worst_large < kMaxRel);
      CHECK(r.worst_entry < 1);
    }
  }
}

// ------------------------------------------------------------------ checkpointing
TEST_CASE("gradient checkpointing gives bit-identical loss and gradients") {
  for (char which : {'a', 'c', 'e'}) {
    Variant v = variant(which);
    v.cfg.num_hidden_layers = 3;  // the shared activation buffer is then reused twice
    SUBCASE(v.name.c_str()) {
      Fixture f(v);
      CpuTransformer plain(f.w, false), ckpt(f.w, true);
      const Result r0 = run_fb(plain, f.mb, f.a);
      const Result r1 = run_fb(ckpt, f.mb, f.a);
      CHECK(std::memcmp(&r0.loss.loss_sum, &r1.loss.loss_sum, sizeof(double)) == 0);
      CHECK(r0.loss.num_targets == r1.loss.num_targets);
      REQUIRE(r0.grads.size() == r1.grads.size());
      CHECK(std::memcmp(r0.grads.data(), r1.grads.data(), r0.grads.size() * sizeof(float)) == 0);
      // A second step on the same object (buffers already sized) is still identical.
      const Result r2 = run_fb(ckpt, f.mb, f.a);
      CHECK(std::memcmp(r0.grads.data(), r2.grads.data(), r0.grads.size() * sizeof(float)) == 0);
    }
  }
}

// ------------------------------------------------------------------ packing
// Attention never crosses sequence boundaries, so a packed micro-batch is the sum of its
// sequences. Only float summation order differs (gradient sums over tokens), hence 1e-5.
TEST_CASE("a packed micro-batch equals the sum of its sequences run alone") {
  for (char which : {'a', 'b', 'c'}) {
    const Variant v = variant(which);
    SUBCASE(v.name.c_str()) {
      Fixture f(v);
      const auto ex = make_examples({7, 12}, static_cast<int>(v.cfg.vocab_size), 505);
      CpuTransformer model(f.w, false);
      const Result both = run_fb(model, pack(ex), f.a);
      const Result one = run_fb(model, pack({ex[0]}), f.a);
      const Result two = run_fb(model, pack({ex[1]}), f.a);
      CHECK(both.loss.num_targets == one.loss.num_targets + two.loss.num_targets);
      const double sum_loss = one.loss.loss_sum + two.loss.loss_sum;
      CHECK(std::abs(both.loss.loss_sum - sum_loss) <= 1e-5 * std::abs(sum_loss));
      std::vector<double> packed = to_double(both.grads), summed(packed.size());
      for (size_t i = 0; i < summed.size(); ++i)
        summed[i] = static_cast<double>(one.grads[i]) + two.grads[i];
      const double e = rel_err(summed, packed);
      MESSAGE(v.name << ": packed vs summed rel " << e);
      CHECK(e < 1e-5);
      // Not vacuous: each sequence contributes a sizeable part of the gradient.
      CHECK(rel_err(summed, to_double(one.grads)) > 0.1);
      CHECK(rel_err(summed, to_double(two.grads)) > 0.1);
    }
  }
}

// ------------------------------------------------------------------ loss-only path
TEST_CASE("forward_loss equals the loss of forward_backward without dropout") {
  for (char which : {'a', 'b', 'c', 'd', 'f'}) {
    const Variant v = variant(which);
    SUBCASE(v.name.c_str()) {
      Fixture f(v);
      CpuTransformer model(f.w, false);
      const Result r = run_fb(model, f.mb, f.a);
      const LossSum l = model.forward_loss(f.mb, f.a);
      CHECK(l.num_targets == f.mb.num_targets());
      CHECK(l.num_targets == r.loss.num_targets);
      CHECK(l.loss_sum == r.loss.loss_sum);  // same forward, same order: exact
      // Sanity of the value: a random model is near uniform, ln(64) ~ 4.16 per token.
      const double mean = l.loss_sum / static_cast<double>(l.num_targets);
      CHECK(mean > 2.0);
      CHECK(mean < 8.0);
    }
  }
  SUBCASE("with dropout the training loss differs, evaluation has none") {
    Fixture f(variant('e'));
    CpuTransformer model(f.w, false);
    const double train = run_fb(model, f.mb, f.a).loss.loss_sum;
    LoraAdapter no_drop = f.a;
    no_drop.spec.dropout = 0;
    CHECK(model.forward_loss(f.mb, f.a).loss_sum == run_fb(model, f.mb, no_drop).loss.loss_sum);
    CHECK(train != model.forward_loss(f.mb, f.a).loss_sum);
  }
}

// Scaling dlogits by a power of two is exact in float, and the backward is linear in it.
TEST_CASE("gradients are linear in loss_scale and accumulate into the buffer") {
  Fixture f(variant('a'));
  CpuTransformer model(f.w, false);
  const Result r1 = run_fb(model, f.mb, f.a, kDropoutSeed, 1.0f);
  const Result rq = run_fb(model, f.mb, f.a, kDropoutSeed, 0.25f);
  CHECK(rq.loss.loss_sum == r1.loss.loss_sum);  // the loss sum is not scaled
  std::vector<float> acc(r1.grads.size(), 0.0f);
  model.forward_backward(f.mb, f.a, acc.data(), 1.0f, kDropoutSeed);
  model.forward_backward(f.mb, f.a, acc.data(), 1.0f, kDropoutSeed);
  bool exact_scale = true, exact_acc = true;
  for (size_t i = 0; i < acc.size(); ++i) {
    exact_scale &= rq.grads[i] == 0.25f * r1.grads[i];
    exact_acc &= acc[i] == 2.0f * r1.grads[i];
  }
  CHECK(exact_scale);
  CHECK(exact_acc);
}

TEST_CASE("ids outside the vocabulary are rejected") {
  Fixture f(variant('a'));
  CpuTransformer model(f.w, false);
  MicroBatch bad = f.mb;
  bad.tokens[3] = 64;
  CHECK_THROWS_AS(model.forward_loss(bad, f.a), std::runtime_error);
  bad = f.mb;
  bad.targets[3] = 64;
  CHECK_THROWS_AS(model.forward_loss(bad, f.a), std::runtime_error);
  CHECK(model.forward_loss(MicroBatch{{}, {}, {}, {0}}, f.a).num_targets == 0);
}
