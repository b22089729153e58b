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

}  // namespace ftune
