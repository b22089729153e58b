// Model module pieces around the transformer: micro-batch packing, LoRA semantics
// (scale, PEFT init, keys, targets, B = 0 is the base model) and the RoPE frequencies.
#include <doctest/doctest.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "model_test_util.hpp"

using namespace ftune;
using namespace ftune::mtest;

// ------------------------------------------------------------------ make_micro_batch
// Right padding needs no test of its own: batches are packed, never padded. What must hold
// is HF's label shift within each sequence and nothing leaking across sequences.
TEST_CASE("make_micro_batch shifts labels per sequence and restarts positions") {
  const Example e1{{10, 11, 12}, {-100, 21, 22}};
  const Example e2{{30, 31, 32, 33}, {40, -100, 42, 43}};
  const MicroBatch mb = make_micro_batch({&e1, &e2});
  CHECK(mb.tokens == std::vector<int32_t>{10, 11, 12, 30, 31, 32, 33});
  CHECK(mb.positions == std::vector<int32_t>{0, 1, 2, 0, 1, 2, 3});
  // target[t] = labels[t+1]; the last token of a sequence predicts nothing (its "next" is
  // the next sequence's first token, which must not be learned). e2's label 40 at t = 0
  // is never a target: no token precedes it.
  CHECK(mb.targets == std::vector<int32_t>{21, 22, -100, -100, 42, 43, -100});
  CHECK(mb.seq_start == std::vector<int64_t>{0, 3, 7});
  CHECK(mb.num_tokens() == 7);
  CHECK(mb.num_seqs() == 2);
  CHECK(mb.num_targets() == 4);
  CHECK(mb.max_position() == 3);

  SUBCASE("edge cases") {
    const Example one{{5}, {5}};
    const MicroBatch m1 = make_micro_batch({&one});
    CHECK(m1.targets == std::vector<int32_t>{-100});
    CHECK(m1.num_targets() == 0);
    const MicroBatch empty = make_micro_batch({});
    CHECK(empty.num_tokens() == 0);
    CHECK(empty.num_seqs() == 0);
    CHECK(empty.max_position() == 0);
    const Example bad{{1, 2, 3}, {1, 2}};
    CHECK_THROWS_AS(make_micro_batch({&bad}), std::runtime_error);
  }
}

// ------------------------------------------------------------------ LoRA spec and adapter
TEST_CASE("LoraSpec::scale is alpha/r, or alpha/sqrt(r) with rslora") {
  LoraSpec s;
  s.rank = 8;
  s.alpha = 16;
  CHECK(s.scale() == doctest::Approx(2.0));
  s.use_rslora = true;
  CHECK(s.scale() == doctest::Approx(16.0 / std::sqrt(8.0)).epsilon(1e-7));
  s.rank = 16;
  s.alpha = 32;
  CHECK(s.scale() == doctest::Approx(8.0));
}

TEST_CASE("LoraSpec::parse_targets") {
  auto only = [](std::initializer_list<Proj> ps) {
    std::array<bool, kNumProj> t{};
    for (Proj p : ps) t[static_cast<int>(p)] = true;
    return t;
  };
  std::array<bool, kNumProj> all{};
  all.fill(true);
  CHECK(LoraSpec::parse_targets({"all"}) == all);
  CHECK(LoraSpec::parse_targets({"all-linear"}) == all);
  CHECK(LoraSpec::parse_targets({"q_proj", "v_proj"}) == only({Proj::q, Proj::v}));
  CHECK(LoraSpec::parse_targets({"down_proj", "gate_proj", "up_proj", "down_proj"}) ==
        only({Proj::gate, Proj::up, Proj::down}));
  CHECK_THROWS_AS(LoraSpec::parse_targets({"q_proj", "qkv_proj"}), std::runtime_error);
  CHECK_THROWS_AS(LoraSpec::parse_targets({"Q_PROJ"}), std::runtime_error);
  CHECK_THROWS_AS(LoraSpec::parse_targets({}), std::runtime_error);

  LoraSpec s;
  s.targets = LoraSpec::parse_targets({"v_proj", "o_proj", "q_proj"});
  CHECK(s.target_names() == std::vector<std::string>{"q_proj", "v_proj", "o_proj"});
}

TEST_CASE("LoraAdapter layout, PEFT default init and keys") {
  const ModelConfig cfg = tiny_config();
  LoraSpec spec = tiny_spec();
  LoraAdapter a;
  a.allocate(cfg, spec);
  REQUIRE(a.slots.size() == static_cast<size_t>(cfg.num_hidden_layers * kNumProj));
  // Slots tile params back to back: A [r, in] then B [out, r].
  size_t expect = 0;
  for (const LoraSlot& s : a.slots) {
    CHECK(s.in == proj_in_features(cfg, s.proj));
    CHECK(s.out == proj_out_features(cfg, s.proj));
    CHECK(s.a_offset == expect);
    CHECK(s.b_offset == expect + static_cast<size_t>(spec.rank * s.in));
    expect = s.b_offset + static_cast<size_t>(s.out * spec.rank);
    CHECK(a.slot(s.layer, s.proj) == &s);
  }
  CHECK(a.params.size() == expect);
  CHECK(a.slot(1, Proj::o)->in == cfg.q_dim());
  CHECK(a.slot(0, Proj::down)->in == cfg.intermediate_size);
  CHECK(a.slot(0, Proj::k)->out == cfg.kv_dim());

  // kaiming_uniform(a = sqrt(5)) on A [r, fan_in]: U(-1/sqrt(in), 1/sqrt(in)); B = 0.
  a.init_peft_default(7);
  for (const LoraSlot& s : a.slots) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(s.in));
    double mx = 0;
    for (int64_t i = 0; i < spec.rank * s.in; ++i) mx = std::max(mx, std::abs(double(a.params[s.a_offset + i])));
    CHECK(mx <= bound);
    CHECK(mx > 0.8 * bound);  // the whole range is used (128+ draws per slot)
    for (int64_t i = 0; i < s.out * spec.rank; ++i) CHECK(a.params[s.b_offset + i] == 0.0f);
  }
  LoraAdapter same, other;
  same.allocate(cfg, spec);
  same.init_peft_default(7);
  other.allocate(cfg, spec);
  other.init_peft_default(8);
  CHECK(same.params == a.params);
  CHECK(other.params != a.params);

  SUBCASE("partial targets leave the other projections without a slot") {
    spec.targets = LoraSpec::parse_targets({"q_proj", "down_proj"});
    LoraAdapter p;
    p.allocate(cfg, spec);
    CHECK(p.slots.size() == 4);
    CHECK(p.slot(1, Proj::k) == nullptr);
    CHECK(p.slot(1, Proj::down) != nullptr);
  }
  SUBCASE("rank must be positive") {
    spec.rank = 0;
    LoraAdapter z;
    CHECK_THROWS_AS(z.allocate(cfg, spec), std::runtime_error);
  }

  CHECK(LoraAdapter::peft_key(0, Proj::q, 'A') ==
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  CHECK(LoraAdapter::peft_key(1, Proj::down, 'B') ==
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight");
  CHECK(LoraAdapter::peft_key(12, Proj::gate, 'A') ==
        "base_model.model.model.layers.12.mlp.gate_proj.lora_A.weight");
}

// With B = 0 (PEFT's starting point) the adapter changes nothing: the loss is that of the
// base model (an adapter with no targets at all) exactly, since y + scale * u * 0 == y.
// The first gradient reaches B only: dA = scale (dy B)^T x = 0.
TEST_CASE("B = 0 is the base model; only B gets a gradient at the first step") {
  for (bool qwen : {false, true}) {
    ModelConfig cfg = tiny_config(qwen ? "qwen2" : "llama");
    cfg.attention_bias = qwen;
    cfg.tie_word_embeddings = qwen;
    BaseWeights w;
    build_model(w, cfg, 11);
    LoraAdapter peft, none;
    peft.allocate(cfg, tiny_spec());
    peft.init_peft_default(3);
    LoraSpec empty = tiny_spec();
    empty.targets.fill(false);
    none.allocate(cfg, empty);
    CHECK(none.params.empty());
    const MicroBatch mb = pack(make_examples({9, 6}, 64, 5));
    CpuTransformer model(w, false);
    const double base = model.forward_loss(mb, none).loss_sum;
    CHECK(model.forward_loss(mb, peft).loss_sum == base);
    const Result r = run_fb(model, mb, peft);
    CHECK(r.loss.loss_sum == base);
    double a_abs = 0, b_abs = 0;
    for (const LoraSlot& s : peft.slots) {
      for (int64_t i = 0; i < s.in * peft.spec.rank; ++i) a_abs += std::abs(r.grads[s.a_offset + i]);
      for (int64_t i = 0; i < s.out * peft.spec.rank; ++i) b_abs += std::abs(r.grads[s.b_offset + i]);
    }
    CHECK(a_abs == 0.0);
    CHECK(b_abs > 0.0);
    // And a non-zero B does change the model.
    build_adapter(peft, cfg, tiny_spec(), 3);
    CHECK(model.forward_loss(mb, peft).loss_sum != base);
  }
}

// ------------------------------------------------------------------ RoPE frequencies
// Independent statement of transformers' rope_init_fn for "llama3"
// (modeling_rope_utils._compute_llama3_parameters), written per band:
//   inv_freq_i = theta^(-2i/d),  wavelen_i = 2 pi / inv_freq_i
//   wavelen <  orig/high_freq_factor          -> inv_freq            (high frequencies kept)
//   wavelen >  orig/low_freq_factor           -> inv_freq / factor   (low frequencies slowed)
//   otherwise  s = (orig/wavelen - low) / (high - low),
//              inv_freq * ((1 - s) / factor + s)                     (linear blend in between)
namespace {
std::vector<double> llama3_reference(double theta, int d, double factor, double low,
                                     double high, double orig) {
  std::vector<double> out;
  for (int i = 0; i < d / 2; ++i) {
    const double f = std::exp(-std::log(theta) * (2.0 * i) / d);
    const double wavelen = 2.0 * 3.14159265358979323846 / f;
    if (wavelen < orig / high) {
      out.push_back(f);
    } else if (wavelen > orig / low) {
      out.push_back(f / factor);
    } else {
      const double s = (orig / wavelen - low) / (high - low);
      out.push_back(f * ((1 - s) / factor + s));
    }
  }
  return out;
}
}  // namespace

TEST_CASE("rope_inv_freq: default, linear and llama3 scaling") {
  ModelConfig c = tiny_config();  // head_dim 8, theta 1e4
  std::vector<double> inv = rope_inv_freq(c);
  REQUIRE(inv.size() == 4);
  for (int i = 0; i < 4; ++i) CHECK(inv[i] == doctest::Approx(std::pow(10.0, -i)).epsilon(1e-12));

  c.rope.type = "linear";
  c.rope.factor = 4;
  inv = rope_inv_freq(c);
  for (int i = 0; i < 4; ++i) CHECK(inv[i] == doctest::Approx(std::pow(10.0, -i) / 4).epsilon(1e-12));

  SUBCASE("llama3 on the tiny test model") {
    // orig 16, low 1, high 4: wavelengths 2pi (band [4, 16], blended), 20pi, 200pi, 2000pi
    // (all > 16, divided by 8). By hand: s = (16/2pi - 1)/3 = 0.5154930;
    // inv_0 = (1 - s)/8 + s = 0.5760564.
    c.rope = RopeConfig{"llama3", 10000.0, 8.0, 1.0, 4.0, 16};
    inv = rope_inv_freq(c);
    const auto ref = llama3_reference(1e4, 8, 8, 1, 4, 16);
    CHECK(inv[0] == doctest::Approx(0.5760564).epsilon(1e-6));
    CHECK(inv[1] == doctest::Approx(0.0125).epsilon(1e-12));
    CHECK(inv[3] == doctest::Approx(0.000125).epsilon(1e-12));
    for (int i = 0; i < 4; ++i) CHECK(inv[i] == doctest::Approx(ref[i]).epsilon(1e-12));
  }
  SUBCASE("llama3 as in Llama-3.1-8B") {
    // head_dim 128, theta 5e5, factor 8, low 1, high 4, original 8192: all three bands.
    c.head_dim = 128;
    c.rope = RopeConfig{"llama3", 500000.0, 8.0, 1.0, 4.0, 8192};
    inv = rope_inv_freq(c);
    const auto ref = llama3_reference(5e5, 128, 8, 1, 4, 8192);
    REQUIRE(inv.size() == 64);
    int kept = 0, slowed = 0, blended = 0;
    for (int i = 0; i < 64; ++i) {
      CHECK(inv[i] == doctest::Approx(ref[i]).epsilon(1e-12));
      const double plain = std::pow(5e5, -2.0 * i / 128);
      if (std::abs(inv[i] - plain) < 1e-13 * plain) ++kept;
      else if (std::abs(inv[i] - plain / 8) < 1e-12 * plain) ++slowed;
      else ++blended;
    }
    CHECK(kept > 0);
    CHECK(slowed > 0);
    CHECK(blended > 0);
  }
  SUBCASE("unknown rope type") {
    c.rope.type = "yarn";
    CHECK_THROWS_AS(rope_inv_freq(c), std::runtime_error);
  }
}
