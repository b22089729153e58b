#pragma once
// Helpers the GPU benchmarks in tools/ share (bench_lora.cpp, bench_gemm.cpp): random bf16
// device operands. Plain C++ (no CUDA headers).
#include <cstdint>
#include <random>
#include <vector>

#include "ftune/kernels/cuda_device.hpp"

namespace ftune::cuda::bench {

// n bf16 values drawn from N(0, scale^2), on the device.
inline DeviceBuffer random_bf16(int64_t n, std::mt19937& g, float scale) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<bf16> h(static_cast<size_t>(n));
  for (auto& v : h) v = to_bf16(d(g));
  return to_device(h);
}

}  // namespace ftune::cuda::bench
