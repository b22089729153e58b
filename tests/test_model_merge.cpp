// merge_lora: the merged model with no adapter computes what base + adapter computes (the
// loss through the training forward, within fp32 rounding), for Llama-, Qwen2- and
// Qwen3-style tiny models, with PEFT's scale (alpha/r, alpha/sqrt(r) with rslora) and partial
// target sets; the merged weight is W + scale * B A element by element.
#include <doctest/doctest.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "ftune/model/merge.hpp"
#include "model_test_util.hpp"

using namespace ftune;
using namespace ftune::mtest;

namespace {

ModelConfig style(const std::string& name) {
  ModelConfig c = tiny_config(name);
  if (name == "qwen2") {
    c.attention_bias = true;  // q/k/v biases, kept as is by the merge
    c.tie_word_embeddings = true;
  }
  if (name == "qwen3") c.qk_norm = true;
  return c;
}

double mean_loss(const BaseWeights& w, const MicroBatch& mb, const LoraAdapter& a) {
  CpuTransformer m(w, false);
  const LossSum l = m.forward_loss(mb, a);
  return l.loss_sum / static_cast<double>(l.num_targets);
}

// Loss of base + adapter, of the merged model (zero adapter), and of the base alone.
struct Losses { double lora, merged, base; };

Losses compare(const ModelConfig& cfg, const LoraSpec& spec) {
  const std::vector<Example> ex = make_examples({9, 14, 5}, static_cast<int>(cfg.vocab_size), 7);
  const MicroBatch mb = pack(ex);
  BaseWeights base, merged;
  build_model(base, cfg, 11);
  build_model(merged, cfg, 11);  // same seed: an identical, separately owned copy
  LoraAdapter a, zero;
  build_adapter(a, cfg, spec, 5);
  zero.allocate(cfg, spec);  // all-zero A and B: the LoRA path adds exactly nothing
  merge_lora(merged, a);
  return {mean_loss(base, mb, a), mean_loss(merged, mb, zero), mean_loss(base, mb, zero)};
}

}  // namespace

TEST_CASE("merged model == base + adapter (loss) for llama, qwen2 and qwen3 styles") {
  for (const std::string name : {"llama", "qwen2", "qwen3"}) {
    CAPTURE(name);
    const Losses l = compare(style(name), tiny_spec());
    CHECK(std::abs(l.merged - l.lora) <= 1e-5 * std::abs(l.lora));
    // The adapter must matter, or the equality above says nothing.
    CHECK(std::abs(l.base - l.lora) > 1e-3 * std::abs(l.lora));
  }
}

TEST_CASE("merge uses the rslora scale and touches only the targeted projections") {
  LoraSpec spec = tiny_spec();
  spec.rank = 4;
  spec.alpha = 6.0;
  spec.use_rslora = true;  // scale 6 / sqrt(4) = 3 (alpha / r would be 1.5)
  spec.targets = LoraSpec::parse_targets({"q_proj", "v_proj", "down_proj"});
  for (const std::string name : {"llama", "qwen2"}) {
    CAPTURE(name);
    const Losses l = compare(style(name), spec);
    CHECK(std::abs(l.merged - l.lora) <= 1e-5 * std::abs(l.lora));
    CHECK(std::abs(l.base - l.lora) > 1e-3 * std::abs(l.lora));
  }
}

TEST_CASE("merged weights are W + scale * B A, untargeted ones unchanged") {
  const ModelConfig cfg = style("qwen2");
  LoraSpec spec = tiny_spec();
  spec.targets = LoraSpec::parse_targets({"k_proj", "up_proj"});
  BaseWeights base, merged;
  build_model(base, cfg, 3);
  build_model(merged, cfg, 3);
  LoraAdapter a;
  build_adapter(a, cfg, spec, 9);
  merge_lora(merged, a);
  const double scale = spec.alpha / spec.rank;
  for (int l = 0; l < cfg.num_hidden_layers; ++l) {
    for (Proj p : kAllProj) {
      const int pi = static_cast<int>(p);
      const int64_t out = proj_out_features(cfg, p), in = proj_in_features(cfg, p);
      const float* W0 = base.layers[l].w[pi];
      const float* W1 = merged.layers[l].w[pi];
      const LoraSlot* s = a.slot(l, p);
      double max_err = 0;
      for (int64_t o = 0; o < out; ++o)
        for (int64_t i = 0; i < in; ++i) {
          double expect = W0[o * in + i];
          if (s)
            for (int r = 0; r < spec.rank; ++r)
              expect += scale * a.params[s->b_offset + o * spec.rank + r] *
                        a.params[s->a_offset + r * in + i];
          max_err = std::max(max_err, std::abs(expect - W1[o * in + i]));
        }
      CAPTURE(l);
      CAPTURE(proj_name(p));
      if (s)
        CHECK(max_err < 1e-5);
      else
        CHECK(max_err == 0.0);  // bitwise untouched
    }
    // Biases and norms are not part of the merge.
    CHECK(base.layers[l].b[0][0] == merged.layers[l].b[0][0]);
    CHECK(base.layers[l].input_norm[0] == merged.layers[l].input_norm[0]);
  }
}

TEST_CASE("merge refuses an adapter built for other model sizes") {
  ModelConfig cfg = style("llama");
  BaseWeights w;
  build_model(w, cfg, 1);
  ModelConfig other = cfg;
  other.num_hidden_layers = 3;
  LoraAdapter a;
  build_adapter(a, other, tiny_spec(), 2);
  CHECK_THROWS_AS(merge_lora(w, a), std::runtime_error);
  other = cfg;
  other.intermediate_size = 40;
  LoraAdapter b;
  build_adapter(b, other, tiny_spec(), 2);
  CHECK_THROWS_AS(merge_lora(w, b), std::runtime_error);
}
