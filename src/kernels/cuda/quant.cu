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

__constant__ float kLevels[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};  // = cpu::kNf4Levels

// One thread per 8 elements (4 packed bytes); 8 divides the block of 64, so a group of 8
// has one absmax.
__global__ void nf4_kernel(__nv_bfloat16* out, const uint8_t* packed, const uint8_t* absmax_q,
                           const float* scale, int64_t n, bool vec) {
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t done = vec ? n / 8 * 8 : 0;
  if (vec) {
    for (int64_t g = tid; g < n / 8; g += stride) {
      const int64_t i = g * 8, b = i / 64;
      const float a = static_cast<float>(absmax_q[b]) * scale[b / 256];
      const uint32_t bytes = *reinterpret_cast<const uint32_t*>(packed + i / 2);
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = kLevels[(bytes >> (4 * e)) & 15u] * a;
      store8(out + i, v);
    }
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    const int64_t b = i / 64;
    const float a = static_cast<float>(absmax_q[b]) * scale[b / 256];
    const int code = (i & 1) ? packed[i / 2] >> 4 : packed[i / 2] & 15;
    st(out + i, kLevels[code] * a);
  }
}

}  // namespace

void dequantize_nf4(bf16* out, const uint8_t* packed, const uint8_t* absmax_q,
                    const float* scale, int64_t n, stream_t stream) {
  if (n <= 0) return;
  const bool vec = aligned16(out) && (reinterpret_cast<uintptr_t>(packed) & 3u) == 0;
  const int threads = 256;
  nf4_kernel<<<grid_for(vec ? (n + 7) / 8 : n, threads), threads, 0, stream>>>(
      dev(out), packed, absmax_q, scale, n, vec);
  FTUNE_CUDA_LAUNCH_CHECK();
}

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
