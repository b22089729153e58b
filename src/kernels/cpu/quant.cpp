#include "ftune/kernels/cpu_quant.hpp"

#include <algorithm>
#include <cmath>

namespace ftune::cpu {

void quantize_int8_rows(int8_t* q, float* scale, const float* w, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = w + r * cols;
    float amax = 0.f;
    for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(row[c]));
    const float s = amax / 127.f;
    scale[r] = s;
    for (int64_t c = 0; c < cols; ++c) {
      // nearbyint: round half to even (the default rounding mode); the clamp only guards
      // against w / s rounding a hair above 127 for the row maximum.
      const float v = s > 0.f ? std::nearbyint(row[c] / s) : 0.f;
      q[r * cols + c] = static_cast<int8_t>(std::clamp(v, -127.f, 127.f));
    }
  }
}

void dequantize_int8_rows(float* out, const int8_t* q, const float* scale, int64_t rows,
                          int64_t cols) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      out[r * cols + c] = static_cast<float>(q[r * cols + c]) * scale[r];
}

}  // namespace ftune::cpu
