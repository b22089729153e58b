#pragma once
// Helpers of the CUDA kernel tests: bf16-representable random inputs without zeros, device
// round trips, and the error measure the kernel tests share (see test_cuda_kernels.cpp for
// the tolerance argument).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "ftune/kernels/cuda_device.hpp"

#define REQUIRE_GPU()                             \
  if (ftune::cuda::cuda_device_count() == 0) {    \
    MESSAGE("skipped: no GPU");                   \
    return;                                       \
  }

namespace ftune::test::cuda {

namespace cu = ftune::cuda;
using F = std::vector<float>;

inline float rbf(float f) { return cu::to_float(cu::to_bf16(f)); }

// bf16-representable values, |v| in [0.05, 1] * mag, random sign.
inline F rand_bf16(std::mt19937& rng, size_t n, float mag = 1.f) {
  std::uniform_real_distribution<float> u(0.05f, 1.f);
  std::bernoulli_distribution sign(0.5);
  F v(n);
  for (auto& e : v) e = rbf(mag * (sign(rng) ? u(rng) : -u(rng)));
  return v;
}
inline std::vector<cu::bf16> pack(const F& v) {
  std::vector<cu::bf16> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = cu::to_bf16(v[i]);
  return b;
}
inline F unpack(const std::vector<cu::bf16>& b) {
  F v(b.size());
  for (size_t i = 0; i < b.size(); ++i) v[i] = cu::to_float(b[i]);
  return v;
}
inline cu::DeviceBuffer up(const F& v) { return cu::to_device(pack(v)); }
inline F down(const cu::DeviceBuffer& b, size_t n) { return unpack(cu::to_host<cu::bf16>(b, n)); }

// max |g - w| / (|w| + rms(want)): relative for large entries, scaled by the tensor's
// magnitude near zero (where cancellation makes a pure relative error meaningless).
inline double err(const F& got, const F& want) {
  REQUIRE(got.size() == want.size());
  double ss = 0;
  for (float w : want) ss += double(w) * w;
  const double rms = std::sqrt(ss / std::max<size_t>(1, want.size())) + 1e-30;
  double e = 0;
  for (size_t i = 0; i < got.size(); ++i)
    e = std::max(e, std::abs(double(got[i]) - want[i]) / (std::abs(double(want[i])) + rms));
  return e;
}
inline size_t mismatches(const F& got, const F& want) {
  size_t c = 0;
  for (size_t i = 0; i < got.size(); ++i) c += got[i] != want[i];
  return c;
}
inline F rounded(F v) {
  for (auto& e : v) e = rbf(e);
  return v;
}
constexpr double kTol = 1e-2;

}  // namespace ftune::test::cuda
