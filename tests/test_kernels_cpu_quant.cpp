// Int8 per-output-channel quantisation (load_in_8bit): the round trip error is at most half a
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
