// ZeRO-3's sharded base layers (model/zero3_weights.hpp) in one process: the layout's views
// are BaseWeights' views; W ranks' shards tile every layer; a gathered layer is the layer;
// per-rank memory falls as 1/W; and the CPU backend on sharded weights computes exactly
// what it computes on the whole model (LoRA gradients and losses bit for bit), for W = 1..3,
// with and without checkpointing, on Llama, Qwen2 (biases, tied) and Qwen3 (q/k norms), and
// with the int8 / NF4 round trips. The gathers of the W ranks are simulated here from the
// other ranks' shards; tests/test_mpi_data_parallel.cpp runs them over MPI.
#include <doctest/doctest.h>

#include <cstring>
#include <memory>

#include "ftune/dist/shard_range.hpp"
#include "ftune/model/quantize.hpp"
#include "ftune/model/weight_source.hpp"
#include "ftune/model/zero3_weights.hpp"
#include "model_test_util.hpp"

using namespace ftune;
using namespace ftune::mtest;

namespace {

ModelConfig variant(const std::string& type) {
  ModelConfig c = tiny_config(type);
  c.num_hidden_layers = 3;
  if (type == "qwen2") {
    c.attention_bias = true;
    c.tie_word_embeddings = true;
  }
  if (type == "qwen3") c.qk_norm = true;
  return c;
}

// W ranks' Zero3Weights over the same model. Rank r's gather is simulated from all ranks'
// shards of the layer being gathered (the test's stand-in for Communicator::all_gather).
struct SimulatedRanks {
  std::vector<std::unique_ptr<Zero3Weights>> ranks;
  std::vector<int> asked;  // the layers gathered, in order (any rank)

  SimulatedRanks(const WeightSource& src, int W, int quant_bits = 0) {
    for (int r = 0; r < W; ++r) {
      ShardGather g = [this, W, r](int layer, std::span<const float> shard, std::span<float> full) {
        asked.push_back(layer);
        const ShardRange mine = shard_range(full.size(), r, W);
        REQUIRE(shard.size() == mine.size());
        for (int q = 0; q < W; ++q) {
          const ShardRange range = shard_range(full.size(), q, W);
          std::span<const float> s = ranks[q]->shard(layer);
          REQUIRE(s.size() == range.size());
          std::copy(s.begin(), s.end(), full.begin() + range.begin);
        }
      };
      ranks.push_back(std::make_unique<Zero3Weights>(src, r, W, g, quant_bits));
    }
  }
};

bool same_floats(const float* a, const float* b, size_t n) {
  if (!a || !b) return a == b;
  return std::memcmp(a, b, n * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("zero3 layout: the views of a gathered layer are BaseWeights' views") {
  for (const char* type : {"llama", "qwen2", "qwen3"}) {
    CAPTURE(type);
    const ModelConfig c = variant(type);
    BaseWeights w;
    w.allocate(c);
    const Zero3LayerLayout z = zero3_layer_layout(c);
    REQUIRE(z.span > 0);
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      const float* base = w.storage.data() + z.begin(l);
      const LayerWeights v = z.view(base), &L = w.layers[l];
      CHECK(v.input_norm == L.input_norm);
      CHECK(v.post_norm == L.post_norm);
      CHECK(v.q_norm == L.q_norm);
      CHECK(v.k_norm == L.k_norm);
      for (int p = 0; p < kNumProj; ++p) {
        CHECK(v.w[p] == L.w[p]);
        CHECK(v.b[p] == L.b[p]);
      }
      // The span ends where the next layer (or the final norm) begins.
      const float* next = l + 1 < c.num_hidden_layers ? w.layers[l + 1].input_norm : w.final_norm;
      CHECK(base + z.span == next);
    }
  }
}

TEST_CASE("zero3 shards: tile the layers, gather to the exact layer, memory falls as 1/W") {
  for (const char* type : {"llama", "qwen2", "qwen3"}) {
    const ModelConfig c = variant(type);
    BaseWeights w;
    build_model(w, c, 7);
    const InMemoryWeightSource src(w);
    const Zero3LayerLayout z = zero3_layer_layout(c);
    size_t whole_bytes = 0;  // embeddings, final norm, lm_head
    for (const auto& e : src.entries())
      if (e.layer < 0) whole_bytes += e.numel() * sizeof(float);
    for (int W : {1, 2, 3, 5}) {
      CAPTURE(type);
      CAPTURE(W);
      SimulatedRanks sim(src, W);
      for (int r = 0; r < W; ++r) {
        Zero3Weights& zr = *sim.ranks[r];
        // This rank's shard of layer l is its shard_range of the layer's span, unchanged.
        const ShardRange own = shard_range(z.span, r, W);
        for (int l = 0; l < c.num_hidden_layers; ++l) {
          REQUIRE(zr.shard(l).size() == own.size());
          CHECK(same_floats(zr.shard(l).data(), w.storage.data() + z.begin(l) + own.begin,
                            own.size()));
        }
        const size_t expect = whole_bytes + (c.num_hidden_layers * own.size() + z.span) * sizeof(float);
        CHECK(zr.bytes() == expect);
        CHECK(same_floats(zr.embed(), w.embed, static_cast<size_t>(c.vocab_size * c.hidden_size)));
        CHECK(same_floats(zr.lm_head(), w.lm_head, static_cast<size_t>(c.vocab_size * c.hidden_size)));
        CHECK(same_floats(zr.final_norm(), w.final_norm, static_cast<size_t>(c.hidden_size)));
        // Gather each layer (twice in a row: the second is free) and compare every view.
        for (int l : {2, 2, 0, 1}) {
          const LayerWeights& g = zr.layer(l);
          const LayerWeights& L = w.layers[l];
          CHECK(same_floats(g.input_norm, L.input_norm, c.hidden_size));
          CHECK(same_floats(g.post_norm, L.post_norm, c.hidden_size));
          CHECK(same_floats(g.q_norm, L.q_norm, c.head_dim));
          CHECK(same_floats(g.k_norm, L.k_norm, c.head_dim));
          for (Proj p : kAllProj) {
            const int pi = static_cast<int>(p);
            const size_t n = proj_in_features(c, p) * proj_out_features(c, p);
            CHECK(same_floats(g.w[pi], L.w[pi], n));
            CHECK(same_floats(g.b[pi], L.b[pi], proj_out_features(c, p)));
          }
        }
        CHECK(zr.gathers() == 3);
        if (W > 1) CHECK(std::vector<int>(sim.asked.end() - 3, sim.asked.end()) == std::vector<int>{2, 0, 1});
      }
    }
  }
  // Memory per rank: the layers' share falls as 1/W (the gather buffer is one layer).
  const ModelConfig c = variant("llama");
  BaseWeights w;
  build_model(w, c, 3);
  const InMemoryWeightSource src(w);
  const size_t one = SimulatedRanks(src, 1).ranks[0]->bytes();
  const size_t four = SimulatedRanks(src, 4).ranks[0]->bytes();
  const size_t layers = c.num_hidden_layers * zero3_layer_layout(c).span * sizeof(float);
  CHECK(one - four == layers - layers / 4);
}

TEST_CASE("CPU backend on ZeRO-3 shards = on the whole model, bit for bit") {
  const std::vector<Example> ex = make_examples({9, 5, 12}, 64, 11);
  const MicroBatch mb = pack(ex);
  for (const char* type : {"llama", "qwen2", "qwen3"}) {
    const ModelConfig c = variant(type);
    BaseWeights w;
    build_model(w, c, 5);
    const InMemoryWeightSource src(w);
    LoraSpec spec = tiny_spec();
    spec.dropout = 0.1;  // the masks depend on the layer index: a mixed-up layer would show
    LoraAdapter a;
    build_adapter(a, c, spec, 17);
    for (bool ckpt : {false, true}) {
      CpuTransformer dense(w, ckpt);
      const Result ref = run_fb(dense, mb, a);
      const LossSum ref_eval = dense.forward_loss(mb, a);
      for (int W : {1, 2, 3}) {
        CAPTURE(std::string(type));
        CAPTURE(ckpt);
        CAPTURE(W);
        // Rank W-1's backend: the shortest shard when the span does not divide. Its
        // gathers read the other simulated ranks' shards.
        SimulatedRanks sim(src, W);
        const int r = W - 1;
        CpuTransformer sharded(std::move(sim.ranks[r]), ckpt);
        const ShardGather unused = [](int, std::span<const float>, std::span<float>) {
          throw std::logic_error("a shards-only stand-in does not gather");
        };
        sim.ranks[r] = std::make_unique<Zero3Weights>(src, r, W, unused, 0);  // its shards only
        const int L = c.num_hidden_layers;
        const Result got = run_fb(sharded, mb, a);
        CHECK(got.loss.loss_sum == ref.loss.loss_sum);
        CHECK(got.loss.num_targets == ref.loss.num_targets);
        CHECK(std::memcmp(got.grads.data(), ref.grads.data(), ref.grads.size() * sizeof(float)) == 0);
        // The gathers followed the walk: forward 0..L-1, backward L-2..0 (the last layer
        // is still held; under checkpointing the recompute uses the layer being gathered).
        CHECK(sharded.zero3()->gathers() == 2 * L - 1);
        if (W > 1) CHECK(sim.asked == std::vector<int>{0, 1, 2, 1, 0});
        // An empty micro-batch computes nothing but gathers the same layers.
        std::vector<float> g0(a.params.size(), 0.0f);
        const LossSum none = sharded.forward_backward(pack({}), a, g0.data(), 1.0f, 1);
        CHECK(none.num_targets == 0);
        CHECK(sharded.zero3()->gathers() == 2 * (2 * L - 1) - 1);
        const Result again = run_fb(sharded, mb, a);
        CHECK(std::memcmp(again.grads.data(), ref.grads.data(), ref.grads.size() * sizeof(float)) == 0);
        CHECK(sharded.forward_loss(mb, a).loss_sum == ref_eval.loss_sum);
      }
    }
  }
}

TEST_CASE("ZeRO-3 shards with load_in_8bit / 4bit hold the round-tripped projections") {
  const ModelConfig c = variant("qwen3");
  BaseWeights w;
  build_model(w, c, 9);
  const InMemoryWeightSource src(w);
  for (int bits : {8, 4}) {
    CAPTURE(bits);
    BaseWeights q;
    q.allocate(c);
    std::copy(w.storage.begin(), w.storage.end(), q.storage.begin());
    if (bits == 8) apply_int8_roundtrip(q);
    else apply_nf4_roundtrip(q);
    SimulatedRanks sim(src, 2, bits);
    const Zero3LayerLayout z = zero3_layer_layout(c);
    for (int r = 0; r < 2; ++r) {
      const ShardRange own = shard_range(z.span, r, 2);
      for (int l = 0; l < c.num_hidden_layers; ++l)
        CHECK(same_floats(sim.ranks[r]->shard(l).data(),
                          q.storage.data() + z.begin(l) + own.begin, own.size()));
    }
  }
}
