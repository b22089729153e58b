// Dequantisation of int8 base weights into bf16, just before a layer's GEMMs use them.
// Memory-bound: 8 int8 in (8 bytes), 8 bf16 out (16 bytes) per thread and step.
#include "common.cuh"
#include "ftune/kernels/cuda_quant.hpp"

namespace ftune::cuda {
namespace {
using namespace detail;

__global__ void dequant_kernel(__nv_bfloat16* out, const int8_t* q, const float* scale,
                               int64_t rows, int64_t cols, bool vec) {
  const int64_t n = rows * cols;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (vec) {  // cols % 8 == 0: a group of 8 never crosses a row
    for (int64_t g = tid; g < n / 8; g += stride) {
      const int64_t i = g * 8;
      const float s = scale[i / cols];
      const int2 raw = *reinterpret_cast<const int2*>(q + i);
      const int8_t* b = reinterpret_cast<const int8_t*>(&raw);
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = static_cast<float>(b[e]) * s;
      store8(out + i, v);
    }
    return;
  }
  for (int64_t i = tid; i < n; i += stride) st(out + i, static_cast<float>(q[i]) * scale[i / cols]);
}

}  // namespace

void dequantize_int8_rows(bf16* out, const int8_t* q, const float* scale, int64_t rows,
                          int64_t cols, stream_t stream) {
  const int64_t n = rows * cols;
  if (n <= 0) return;
  const bool vec = cols % 8 == 0 && aligned16(out) && (reinterpret_cast<uintptr_t>(q) & 7u) == 0;
  const int threads = 256;
  dequant_kernel<<<grid_for(vec ? n / 8 : n, threads), threads, 0, stream>>>(dev(out), q, scale,
                                                                             rows, cols, vec);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace ftune::cuda
