#pragma once
// kernels module: 8-bit base weights (load_in_8bit). Symmetric int8 per output channel
// (matrix row): scale_r = max_c |w[r, c]| / 127, q = round-half-even(w / scale_r) in
// [-127, 127], so the row's largest entry maps to +-127 exactly and quantising a
// dequantised row again returns the same q and scale. Rows of zeros get scale 0.
// The CUDA twin of dequantize_int8_rows is cuda::dequantize_int8_rows (cuda_quant.hpp).
#include <cstdint>

namespace ftune::cpu {

void quantize_int8_rows(int8_t* q, float* scale, const float* w, int64_t rows, int64_t cols);
// out[r, c] = q[r, c] * scale[r] (one fp32 multiply).
void dequantize_int8_rows(float* out, const int8_t* q, const float* scale, int64_t rows,
                          int64_t cols);

}  // namespace ftune::cpu
