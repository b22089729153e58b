#pragma once
// kernels module (CUDA backend): the device side of 8-bit base weights (cpu_quant.hpp):
// out[r, c] = bf16(q[r, c] * scale[r]), the fp32 product of cpu::dequantize_int8_rows rounded
// once to bf16. Plain C++ header; implemented in src/kernels/cuda/quant.cu.
#include <cstdint>

#include "ftune/kernels/cuda_device.hpp"

namespace ftune::cuda {

void dequantize_int8_rows(bf16* out, const int8_t* q, const float* scale, int64_t rows,
                          int64_t cols, stream_t stream);

}  // namespace ftune::cuda
