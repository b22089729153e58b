// Random initialisation: the default mt19937 path keeps its exact sequence; the counter-based
// fast path (init-model --fast_init) is the same for any thread count and slicing, N(0, std)
// in distribution, with norms 1 and biases 0; BaseWeights::layout matches allocate.
#include <doctest/doctest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "ftune/model/weights.hpp"

using namespace ftune;

namespace {

// Big enough that the embedding (4096 x 64) and MLP tensors are filled by several threads.
ModelConfig init_config(const std::string& model_type) {
  ModelConfig c;
  c.model_type = model_type;
  c.vocab_size = 4096;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 64;
  c.attention_bias = model_type == "qwen2";
  c.qk_norm = model_type == "qwen3";
  return c;
}

BaseWeights fast_weights(const ModelConfig& c, uint64_t seed, double std, int threads) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  BaseWeights w;
  w.allocate(c);
  init_random_weights_fast(w, seed, std);
  omp_set_num_threads(saved);
  return w;
}

bool is_norm(const std::string& name) { return name.find("norm.weight") != std::string::npos; }
bool is_bias(const std::string& name) { return name.ends_with(".bias"); }

}  // namespace

TEST_CASE("BaseWeights::layout is allocate's entry list, without allocating") {
  for (const char* type : {"llama", "qwen2", "qwen3"}) {
    ModelConfig c = init_config(type);
    c.tie_word_embeddings = std::string(type) == "qwen2";
    BaseWeights w;
    const auto allocated = w.allocate(c);
    const auto laid_out = BaseWeights::layout(c);
    REQUIRE(allocated.size() == laid_out.size());
    for (size_t i = 0; i < laid_out.size(); ++i) {
      CHECK(allocated[i].name == laid_out[i].name);
      CHECK(allocated[i].offset == laid_out[i].offset);
      CHECK(allocated[i].shape == laid_out[i].shape);
    }
    CHECK(w.storage.size() == laid_out.back().offset + laid_out.back().numel());
  }
}

TEST_CASE("init_random_weights keeps its mt19937 sequence over the tensors in layout order") {
  // The exact values existing model directories and tests were made with: one generator,
  // one normal_distribution, walked over the entries; norms 1 and biases 0 draw nothing.
  const ModelConfig c = init_config("qwen2");
  BaseWeights w;
  const auto entries = w.allocate(c);
  init_random_weights(w, 42, 0.05);
  std::mt19937_64 rng(42);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  size_t mismatches = 0;
  for (const auto& e : entries)
    for (size_t i = 0; i < e.numel(); ++i) {
      const float want = is_norm(e.name) ? 1.0f : is_bias(e.name) ? 0.0f : normal(rng);
      mismatches += w.storage[e.offset + i] != want;
    }
  CHECK(mismatches == 0);

  BaseWeights unallocated;
  unallocated.cfg = c;
  CHECK_THROWS(init_random_weights(unallocated, 1, 0.02));
}

TEST_CASE("fast init: identical for 1 and 2 threads, and for any slicing") {
  for (const char* type : {"llama", "qwen2", "qwen3"}) {
    const ModelConfig c = init_config(type);
    const BaseWeights one = fast_weights(c, 7, 0.02, 1);
    const BaseWeights two = fast_weights(c, 7, 0.02, 2);
    CHECK_MESSAGE(one.storage == two.storage, type);

    // Slices starting and ending mid-pair give the elements of the whole-tensor fill.
    const auto entries = BaseWeights::layout(c);
    for (size_t t : {size_t{0}, size_t{3}, entries.size() - 2}) {
      const auto& e = entries[t];
      const size_t n = e.numel();
      std::vector<float> sliced(n);
      for (size_t begin = 0; begin < n;) {
        const size_t count = std::min<size_t>(n - begin, 1 + (begin * 7919 + 12345) % 40001);
        init_random_slice_fast(e, t, 7, 0.02, begin, count, sliced.data() + begin);
        begin += count;
      }
      const std::vector<float> whole(one.storage.begin() + e.offset,
                                     one.storage.begin() + e.offset + n);
      CHECK_MESSAGE(sliced == whole, e.name);
    }
  }
  // An odd element count: the last element is half of a pair.
  const BaseWeights::Entry odd{"x.weight", 0, {3, 5}};
  std::vector<float> whole(15), sliced(15);
  init_random_slice_fast(odd, 9, 1, 1.0, 0, 15, whole.data());
  init_random_slice_fast(odd, 9, 1, 1.0, 0, 5, sliced.data());
  init_random_slice_fast(odd, 9, 1, 1.0, 5, 9, sliced.data() + 5);
  init_random_slice_fast(odd, 9, 1, 1.0, 14, 1, sliced.data() + 14);
  CHECK(sliced == whole);
  CHECK_THROWS(init_random_slice_fast(odd, 9, 1, 1.0, 14, 2, sliced.data()));
}

TEST_CASE("fast init: N(0, std) weights, norms 1, biases 0, distinct tensors and seeds") {
  const double std_dev = 0.02;
  for (const char* type : {"llama", "qwen2", "qwen3"}) {
    const ModelConfig c = init_config(type);
    const BaseWeights w = fast_weights(c, 3, std_dev, 2);
    size_t norms = 0, biases = 0;
    for (const auto& e : BaseWeights::layout(c)) {
      const float* p = w.storage.data() + e.offset;
      if (is_norm(e.name) || is_bias(e.name)) {
        const float want = is_norm(e.name) ? 1.0f : 0.0f;
        size_t bad = 0;
        for (size_t i = 0; i < e.numel(); ++i) bad += p[i] != want;
        CHECK_MESSAGE(bad == 0, e.name);
        (is_norm(e.name) ? norms : biases) += 1;
      }
    }
    CHECK(norms == static_cast<size_t>(c.num_hidden_layers) * (c.qk_norm ? 4 : 2) + 1);
    CHECK(biases == (c.attention_bias ? 3u * c.num_hidden_layers : 0u));
  }

  // The embedding: 262144 values. Bounds are > 5 standard errors wide.
  const ModelConfig c = init_config("llama");
  const BaseWeights w = fast_weights(c, 3, std_dev, 2);
  const size_t n = static_cast<size_t>(c.vocab_size * c.hidden_size);
  double sum = 0, sum_sq = 0;
  size_t within_one_std = 0, beyond_four = 0;
  for (size_t i = 0; i < n; ++i) {
    const double x = w.embed[i];
    sum += x;
    sum_sq += x * x;
    within_one_std += std::abs(x) < std_dev;
    beyond_four += std::abs(x) > 4 * std_dev;
  }
  const double mean = sum / n, sd = std::sqrt(sum_sq / n - mean * mean);
  CHECK(std::abs(mean) < 5 * std_dev / std::sqrt(static_cast<double>(n)));
  CHECK(sd == doctest::Approx(std_dev).epsilon(0.01));
  // Gaussian shape, not merely the right moments: P(|z| < 1) = 0.6827, P(|z| > 4) = 6.3e-5.
  CHECK(static_cast<double>(within_one_std) / n == doctest::Approx(0.6827).epsilon(0.01));
  CHECK(beyond_four < 60);

  // Every tensor and every seed draws its own values.
  const auto& L0 = w.layers[0];
  const auto& L1 = w.layers[1];
  const int q = static_cast<int>(Proj::q);
  CHECK(std::vector<float>(L0.w[q], L0.w[q] + 64) != std::vector<float>(L1.w[q], L1.w[q] + 64));
  const BaseWeights other_seed = fast_weights(c, 4, std_dev, 2);
  CHECK(std::vector<float>(w.embed, w.embed + 64) !=
        std::vector<float>(other_seed.embed, other_seed.embed + 64));
}
