// Int8 per-output-channel quantisation (load_in_8bit) and NF4 (load_in_4bit).
// Int8: the round trip error is at most half a
// step of the row's scale, each row's largest entry is exact, zero rows stay zero, and
// quantising a dequantised matrix again gives the same codes and scales (idempotence is what
// lets the CPU backend train on the round trip while the CUDA backend re-quantises it).
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "ftune/kernels/cpu_quant.hpp"

using namespace ftune;

TEST_CASE("int8 rows: error within half a step, max exact, idempotent, zero rows") {
  std::mt19937 rng(3);
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {7, 33}, {64, 256}, {300, 1000}}) {
    std::normal_distribution<float> nd(0.f, 0.02f);
    std::vector<float> w(rows * cols);
    for (auto& x : w) x = nd(rng);
    for (int64_t c = 0; c < cols; ++c) w[c] = 0.f;  // row 0 all zeros
    std::vector<int8_t> q(w.size()), q2(w.size());
    std::vector<float> s(rows), s2(rows), back(w.size());
    cpu::quantize_int8_rows(q.data(), s.data(), w.data(), rows, cols);
    cpu::dequantize_int8_rows(back.data(), q.data(), s.data(), rows, cols);
    CHECK(s[0] == 0.f);
    for (int64_t r = 0; r < rows; ++r) {
      float amax = 0.f;
      for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
      for (int64_t c = 0; c < cols; ++c) {
        const float x = w[r * cols + c], y = back[r * cols + c];
        CHECK(std::fabs(x - y) <= 0.5f * s[r] * (1 + 1e-5f));
        CHECK(std::abs(static_cast<int>(q[r * cols + c])) <= 127);
        if (std::fabs(x) == amax && amax > 0) CHECK(std::abs(static_cast<int>(q[r * cols + c])) == 127);
      }
    }
    cpu::quantize_int8_rows(q2.data(), s2.data(), back.data(), rows, cols);
    CHECK(q2 == q);
    for (int64_t r = 0; r < rows; ++r) CHECK(std::fabs(s2[r] - s[r]) <= 1e-6f * s[r]);
  }
}

TEST_CASE("nf4: nearest level per block, double-quantised absmax, idempotent, ragged ends") {
  std::mt19937 rng(4);
  std::normal_distribution<float> nd(0.f, 0.02f);
  for (int64_t n : {int64_t(1), int64_t(63), int64_t(64), int64_t(1000), int64_t(64 * 256 * 3 + 17)}) {
    std::vector<float> w(n);
    for (auto& x : w) x = nd(rng);
    if (n >= 128) std::fill(w.begin() + 64, w.begin() + 128, 0.f);  // a zero block
    const int64_t blocks = cpu::nf4_blocks(n), groups = cpu::nf4_groups(n);
    std::vector<uint8_t> packed((n + 1) / 2), absq(blocks), packed2(packed.size()), absq2(blocks);
    std::vector<float> scale(groups), scale2(groups), back(n), back2(n);
    cpu::quantize_nf4(packed.data(), absq.data(), scale.data(), w.data(), n);
    cpu::dequantize_nf4(back.data(), packed.data(), absq.data(), scale.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = i / cpu::kNf4Block;
      const float a = absq[b] * scale[b / cpu::kNf4Group];
      if (a == 0.f) {
        CHECK(back[i] == 0.f);
        continue;
      }
      // The code is the nearest level to w / a: no other level is closer.
      const float x = w[i] / a, got = back[i] / a;
      for (float level : cpu::kNf4Levels) CHECK(std::fabs(x - got) <= std::fabs(x - level) + 1e-6f);
    }
    if (n >= 128) {
      for (int64_t i = 64; i < 128; ++i) CHECK(back[i] == 0.f);
    }
    cpu::quantize_nf4(packed2.data(), absq2.data(), scale2.data(), back.data(), n);
    CHECK(packed2 == packed);
    CHECK(absq2 == absq);
    cpu::dequantize_nf4(back2.data(), packed2.data(), absq2.data(), scale2.data(), n);
    for (int64_t i = 0; i < n; ++i) CHECK(std::fabs(back2[i] - back[i]) <= 1e-6f * std::fabs(back[i]) + 1e-12f);
  }
}
