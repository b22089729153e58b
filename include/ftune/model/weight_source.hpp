#pragma once
// model module: where a model's frozen base tensors come from, read one tensor (or a slice
// of one) at a time as fp32. A backend that converts the weights to its own format (the CUDA
// backend: bf16, int8 or NF4 on the device) reads them through this, so host memory holds
// one tensor at a time instead of the whole fp32 model (32 GB at 8B per rank; 70B would not
// fit at all). The CPU backend, which computes in fp32, materialises them (BaseWeights).
// Sources: an HF safetensors directory (io/hf_model.hpp: open_base_weights), weights
// already in memory (InMemoryWeightSource), and the counter-based random init
// (RandomWeightSource), which needs no file at all.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ftune/model/weights.hpp"

namespace ftune {

class WeightSource {
 public:
  explicit WeightSource(const ModelConfig& c);
  virtual ~WeightSource() = default;
  WeightSource(const WeightSource&) = delete;
  WeightSource& operator=(const WeightSource&) = delete;

  const ModelConfig& config() const { return cfg_; }
  // BaseWeights::layout(config()): every tensor, in order; offsets index the flat model.
  const std::vector<BaseWeights::Entry>& entries() const { return entries_; }
  size_t total_numel() const;
  // Elements [begin, begin + count) of tensor t (row-major) as fp32 into dst. Safe to call
  // from one thread at a time; large slices may use OpenMP inside.
  virtual void read(size_t t, size_t begin, size_t count, float* dst) const = 0;
  // For messages: "safetensors in DIR", "random init (seed 1)".
  virtual std::string describe() const = 0;

 protected:
  ModelConfig cfg_;
  std::vector<BaseWeights::Entry> entries_;
};

// Every tensor of src in one BaseWeights (the fp32 model in host memory).
BaseWeights materialize(const WeightSource& src);

// The flat model's elements at stride max(1, total / 65536), in order: a cheap identity of
// the weights (checkpoint fingerprints). Equal to sampling BaseWeights::storage the same way.
std::vector<float> strided_sample(const WeightSource& src);

// A view of weights already loaded; `w` must outlive the source.
class InMemoryWeightSource final : public WeightSource {
 public:
  explicit InMemoryWeightSource(const BaseWeights& w);
  void read(size_t t, size_t begin, size_t count, float* dst) const override;
  std::string describe() const override { return "weights in memory"; }

 private:
  const BaseWeights& w_;
};

// The model init_random_weights_fast(seed, std) makes, generated slice by slice on demand:
// the same values whatever is read in which order.
class RandomWeightSource final : public WeightSource {
 public:
  RandomWeightSource(const ModelConfig& c, uint64_t seed, double std);
  void read(size_t t, size_t begin, size_t count, float* dst) const override;
  std::string describe() const override;

 private:
  uint64_t seed_;
  double std_;
};

}  // namespace ftune
