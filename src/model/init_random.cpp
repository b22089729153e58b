#include <random>

#include "ftune/model/weights.hpp"

namespace ftune {

void init_random_weights(BaseWeights& w, uint64_t seed, double std) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, static_cast<float>(std));
  // Re-derive the entry list to know which tensors are norms (ones) or biases (zeros).
  BaseWeights layout;
  const auto entries = layout.allocate(w.cfg);
  for (const auto& e : entries) {
    size_t n = 1;
    for (int64_t d : e.shape) n *= static_cast<size_t>(d);
    float* p = w.storage.data() + e.offset;
    const bool is_norm = e.name.find("norm.weight") != std::string::npos;
    const bool is_bias = e.name.size() > 5 && e.name.compare(e.name.size() - 5, 5, ".bias") == 0;
    for (size_t i = 0; i < n; ++i) p[i] = is_norm ? 1.0f : is_bias ? 0.0f : normal(rng);
  }
}

}  // namespace ftune
