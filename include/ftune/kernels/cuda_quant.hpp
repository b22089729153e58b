#pragma once
// kernels module (CUDA backend): the device side of 8-bit and 4-bit base weights
// (cpu_quant.hpp). int8: out[r, c] = bf16(q[r, c] * scale[r]), the fp32 product of
// cpu::dequantize_int8_rows rounded once to bf16. Plain C++ header; implemented in src/kernels/cuda/quant.cu.
#include <cstdint>

#include "ftune/kernels/cuda_device.hpp"

namespace ftune::cuda {

void dequantize_int8_rows(bf16* out, const int8_t* q, const float* scale, int64_t rows,
                          int64_t cols, stream_t stream);
// out[i] = bf16(level[code_i] * (absmax_q[b] * scale[b / 256])), b = i / 64: the fp32 value
// of cpu::dequantize_nf4 rounded once to bf16.
void dequantize_nf4(bf16* out, const uint8_t* packed, const uint8_t* absmax_q,
                    const float* scale, int64_t n, stream_t stream);

}  // namespace ftune::cuda
