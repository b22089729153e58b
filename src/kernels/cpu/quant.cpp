#include "ftune/kernels/cpu_quant.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

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

// QLoRA's NF4 levels (bitsandbytes' table), ascending.
const float kNf4Levels[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f,
                              -0.39491748809814453f, -0.28444138169288635f, -0.18477343022823334f,
                              -0.09105003625154495f, 0.0f, 0.07958029955625534f,
                              0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                              0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,
                              1.0f};

namespace {
uint8_t nearest_nf4(float x) {
  int best = 0;
  float err = std::fabs(x - kNf4Levels[0]);
  for (int k = 1; k < 16; ++k) {
    const float e = std::fabs(x - kNf4Levels[k]);
    if (e < err) {
      err = e;
      best = k;
    }
  }
  return static_cast<uint8_t>(best);
}
}  // namespace

void quantize_nf4(uint8_t* packed, uint8_t* absmax_q, float* scale, const float* w, int64_t n) {
  const int64_t blocks = nf4_blocks(n), groups = nf4_groups(n);
  std::vector<float> absmax(blocks);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    float m = 0.f;
    for (int64_t i = b * kNf4Block; i < std::min(n, (b + 1) * kNf4Block); ++i)
      m = std::max(m, std::fabs(w[i]));
    absmax[b] = m;
  }
  // Second level first: the codes are taken against the absmax the dequantiser will see.
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b0 = g * kNf4Group, b1 = std::min(blocks, b0 + kNf4Group);
    float m = 0.f;
    for (int64_t b = b0; b < b1; ++b) m = std::max(m, absmax[b]);
    scale[g] = m / 255.f;
    for (int64_t b = b0; b < b1; ++b) {
      const float q = scale[g] > 0.f ? std::nearbyint(absmax[b] / scale[g]) : 0.f;
      absmax_q[b] = static_cast<uint8_t>(std::clamp(q, 0.f, 255.f));
    }
  }
  std::fill(packed, packed + (n + 1) / 2, uint8_t(0));
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const float a = static_cast<float>(absmax_q[b]) * scale[b / kNf4Group];
    // Blocks are 64 (even) long, so a byte never straddles two blocks (threads).
    for (int64_t i = b * kNf4Block; i < std::min(n, (b + 1) * kNf4Block); ++i) {
      const uint8_t code = a > 0.f ? nearest_nf4(w[i] / a) : uint8_t(7);  // level 7 = 0
      packed[i / 2] |= static_cast<uint8_t>((i & 1) ? code << 4 : code);
    }
  }
}

void dequantize_nf4(float* out, const uint8_t* packed, const uint8_t* absmax_q,
                    const float* scale, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = i / kNf4Block;
    const float a = static_cast<float>(absmax_q[b]) * scale[b / kNf4Group];
    const int code = (i & 1) ? packed[i / 2] >> 4 : packed[i / 2] & 15;
    out[i] = kNf4Levels[code] * a;
  }
}

}  // namespace ftune::cpu
