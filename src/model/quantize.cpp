#include "ftune/model/quantize.hpp"

#include <vector>

#include "ftune/kernels/cpu_quant.hpp"

namespace ftune {

namespace {

void int8_roundtrip(float* m, int64_t rows, int64_t cols) {
  std::vector<int8_t> q(static_cast<size_t>(rows * cols));
  std::vector<float> scale(static_cast<size_t>(rows));
  cpu::quantize_int8_rows(q.data(), scale.data(), m, rows, cols);
  cpu::dequantize_int8_rows(m, q.data(), scale.data(), rows, cols);
}

void nf4_roundtrip(float* m, int64_t n) {
  std::vector<uint8_t> packed(static_cast<size_t>((n + 1) / 2));
  std::vector<uint8_t> absmax(static_cast<size_t>(cpu::nf4_blocks(n)));
  std::vector<float> scale(static_cast<size_t>(cpu::nf4_groups(n)));
  cpu::quantize_nf4(packed.data(), absmax.data(), scale.data(), m, n);
  cpu::dequantize_nf4(m, packed.data(), absmax.data(), scale.data(), n);
}

}  // namespace

void apply_quant_roundtrip(const ModelConfig& c, LayerWeights& L, int bits) {
  if (bits == 0) return;
  for (Proj p : kAllProj) {
    float* m = const_cast<float*>(L.w[static_cast<int>(p)]);  // the caller's writable views
    if (!m) continue;
    const int64_t rows = proj_out_features(c, p), cols = proj_in_features(c, p);
    if (bits == 8) int8_roundtrip(m, rows, cols);
    else nf4_roundtrip(m, rows * cols);
  }
}

void apply_int8_roundtrip(BaseWeights& w) {
  for (LayerWeights& L : w.layers) apply_quant_roundtrip(w.cfg, L, 8);
}

void apply_nf4_roundtrip(BaseWeights& w) {
  for (LayerWeights& L : w.layers) apply_quant_roundtrip(w.cfg, L, 4);
}

}  // namespace ftune
