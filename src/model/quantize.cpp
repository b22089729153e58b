#include "ftune/model/quantize.hpp"

#include <vector>

#include "ftune/kernels/cpu_quant.hpp"

namespace ftune {

void apply_int8_roundtrip(BaseWeights& w) {
  const ModelConfig& c = w.cfg;
  std::vector<int8_t> q;
  std::vector<float> scale;
  for (LayerWeights& L : w.layers)
    for (Proj p : kAllProj) {
      float* m = const_cast<float*>(L.w[static_cast<int>(p)]);  // views into w.storage
      if (!m) continue;
      const int64_t rows = proj_out_features(c, p), cols = proj_in_features(c, p);
      q.resize(static_cast<size_t>(rows * cols));
      scale.resize(static_cast<size_t>(rows));
      cpu::quantize_int8_rows(q.data(), scale.data(), m, rows, cols);
      cpu::dequantize_int8_rows(m, q.data(), scale.data(), rows, cols);
    }
}

void apply_nf4_roundtrip(BaseWeights& w) {
  const ModelConfig& c = w.cfg;
  std::vector<uint8_t> packed, absmax;
  std::vector<float> scale;
  for (LayerWeights& L : w.layers)
    for (Proj p : kAllProj) {
      float* m = const_cast<float*>(L.w[static_cast<int>(p)]);  // views into w.storage
      if (!m) continue;
      const int64_t n = proj_out_features(c, p) * proj_in_features(c, p);
      packed.resize(static_cast<size_t>((n + 1) / 2));
      absmax.resize(static_cast<size_t>(cpu::nf4_blocks(n)));
      scale.resize(static_cast<size_t>(cpu::nf4_groups(n)));
      cpu::quantize_nf4(packed.data(), absmax.data(), scale.data(), m, n);
      cpu::dequantize_nf4(m, packed.data(), absmax.data(), scale.data(), n);
    }
}

}  // namespace ftune
