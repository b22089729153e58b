#pragma once
// kernels module: 8-bit base weights (load_in_8bit). Symmetric int8 per output channel
// (matrix row): scale_r = max_c |w[r, c]| / 127, q = round-half-even(w / scale_r) in
// [-127, 127], so the row's largest entry maps to +-127 exactly and quantising a
// dequantised row again returns the same q and scale. Rows of zeros get scale 0.
// load_in_4bit: NF4 as in QLoRA. Blocks of 64 consecutive weights (flat, row-major; the
// last block may be shorter) share absmax_b = max |w|; each weight becomes the index of the
// nearest of the 16 NF4 levels to w / absmax_b (ties to the lower index), two per byte (low
// nibble = even element). Double quantisation: the block absmaxes, in groups of 256 blocks,
// are stored as uint8 a_q = round(absmax / s_g), s_g = max(absmax in group) / 255 (fp32).
// Dequantised: w' = level[code] * (a_q * s_g). Quantising w' again gives the same codes and
// a_q (and s_g to an ulp), which lets the CPU train on the round trip while the CUDA
// backend re-quantises it.
// CUDA twins: cuda::dequantize_int8_rows, cuda::dequantize_nf4 (cuda_quant.hpp).
#include <cstdint>

namespace ftune::cpu {

void quantize_int8_rows(int8_t* q, float* scale, const float* w, int64_t rows, int64_t cols);
// out[r, c] = q[r, c] * scale[r] (one fp32 multiply).
void dequantize_int8_rows(float* out, const int8_t* q, const float* scale, int64_t rows,
                          int64_t cols);

constexpr int64_t kNf4Block = 64;        // weights per absmax
constexpr int64_t kNf4Group = 256;       // absmaxes per second-level scale
extern const float kNf4Levels[16];
inline int64_t nf4_blocks(int64_t n) { return (n + kNf4Block - 1) / kNf4Block; }
inline int64_t nf4_groups(int64_t n) { return (nf4_blocks(n) + kNf4Group - 1) / kNf4Group; }

// packed: (n + 1) / 2 bytes; absmax_q: nf4_blocks(n) bytes; scale: nf4_groups(n) floats.
void quantize_nf4(uint8_t* packed, uint8_t* absmax_q, float* scale, const float* w, int64_t n);
void dequantize_nf4(float* out, const uint8_t* packed, const uint8_t* absmax_q,
                    const float* scale, int64_t n);

}  // namespace ftune::cpu
