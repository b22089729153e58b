// WeightSource: the shared layout walk, and the in-memory and random-init sources.
#include "ftune/model/weight_source.hpp"

#include <algorithm>
#include <cstring>
#include <sstream>
#include <stdexcept>

namespace ftune {

WeightSource::WeightSource(const ModelConfig& c) : cfg_(c), entries_(BaseWeights::layout(c)) {}

size_t WeightSource::total_numel() const {
  return BaseWeights::layout_size(entries_);
}

BaseWeights materialize(const WeightSource& src) {
  BaseWeights w;
  w.allocate(src.config());
  const auto& entries = src.entries();
  for (size_t t = 0; t < entries.size(); ++t)
    src.read(t, 0, entries[t].numel(), w.storage.data() + entries[t].offset);
  return w;
}

std::vector<float> strided_sample(const WeightSource& src) {
  const size_t total = src.total_numel();
  const size_t stride = std::max<size_t>(1, total / 65536);
  const auto& entries = src.entries();
  std::vector<float> out;
  out.reserve(total / stride + 1);
  size_t t = 0;
  for (size_t i = 0; i < total; i += stride) {
    while (entries[t].offset + entries[t].numel() <= i) ++t;  // entries are contiguous
    float v;
    src.read(t, i - entries[t].offset, 1, &v);
    out.push_back(v);
  }
  return out;
}

InMemoryWeightSource::InMemoryWeightSource(const BaseWeights& w) : WeightSource(w.cfg), w_(w) {
  if (w.storage.size() != total_numel())
    throw std::runtime_error("InMemoryWeightSource: weights are not allocated for their config");
}

void InMemoryWeightSource::read(size_t t, size_t begin, size_t count, float* dst) const {
  const BaseWeights::Entry& e = entries_.at(t);
  if (begin + count > e.numel())
    throw std::runtime_error("InMemoryWeightSource: slice past the end of " + e.name);
  std::memcpy(dst, w_.storage.data() + e.offset + begin, count * sizeof(float));
}

RandomWeightSource::RandomWeightSource(const ModelConfig& c, uint64_t seed, double std)
    : WeightSource(c), seed_(seed), std_(std) {}

void RandomWeightSource::read(size_t t, size_t begin, size_t count, float* dst) const {
  init_random_slice_fast(entries_.at(t), t, seed_, std_, begin, count, dst);
}

std::string RandomWeightSource::describe() const {
  std::ostringstream s;
  s << "random init (seed " << seed_ << ", std " << std_ << ")";
  return s.str();
}

}  // namespace ftune
