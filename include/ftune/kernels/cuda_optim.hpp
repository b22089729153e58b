#pragma once
// kernels module (CUDA backend): the optimizer side over flat fp32 buffers (LoRA params,
// grads, AdamW moments): AdamW with torch semantics (the formula of
// src/train/optimizer.cpp, same fp32 operation order, no fused multiply-adds, so it
// matches the CPU step bit for bit), and deterministic reductions for the global
// grad-norm, clipping and the loss sum. Plain C++ header; implemented in
// src/kernels/cuda/optimizer.cu.
#include <cmath>
#include <cstdint>

#include "ftune/kernels/cuda_device.hpp"

namespace ftune::cuda {

// The per-step scalars, formed on the host exactly as adamw_step forms them.
struct AdamWScalars {
  float step_size, decay, w1, b2, w2, eps, bc2s;
};
// `step` is the step being taken (1 for the first update).
inline AdamWScalars adamw_scalars(int64_t step, double lr, double beta1, double beta2,
                                  double eps, double weight_decay) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  return AdamWScalars{static_cast<float>(lr / bc1),
                      static_cast<float>(1.0 - lr * weight_decay),
                      static_cast<float>(1.0 - beta1),
                      static_cast<float>(beta2),
                      static_cast<float>(1.0 - beta2),
                      static_cast<float>(eps),
                      static_cast<float>(bc2_sqrt)};
}

// One AdamW update over n values. grad_scale (device, may be null) multiplies every grad
// first: the clipping coefficient from clip_scale(), applied without a host round trip.
void adamw_step(float* params, const float* grads, float* m, float* v, int64_t n,
                const AdamWScalars& s, const float* grad_scale, stream_t stream);

// Floats of scratch the reductions below need (one workspace per stream: two reductions in
// flight on different streams must not share one).
constexpr int64_t kReduceWorkspaceFloats = 1024;

// *out (+)= sum(x^2) (square) or sum(x), fp32, two passes (fixed per-block partials, then
// one block) whose order depends only on n: bit-reproducible run to run and card to card.
// accumulate adds into *out, so several buffers (or an all-reduced value) can be combined.
void reduce_sum(float* out, const float* x, int64_t n, bool square, bool accumulate,
                float* workspace, stream_t stream);

// block_sums[b] = sum of x[i]^2 over block b = [b * block, (b + 1) * block) (cut at n), in
// double, in order: exactly the host's sum_of_squares partials (train/optimizer.hpp) when
// block = kSumOfSquaresBlock, so the offload runner's norm matches the host runner's bit for
// bit. ceil(n / block) values.
void sum_of_squares_blocks(double* block_sums, const float* x, int64_t n, int64_t block,
                           stream_t stream);

// From *sumsq: *norm = sqrt(sumsq), *scale = max_norm / (norm + 1e-6) when that is < 1 and
// max_norm > 0, else 1 (torch's clip_grad_norm_ coefficient). norm may be null.
void clip_scale(float* scale, float* norm, const float* sumsq, double max_norm,
                stream_t stream);

// y[i] += x[i] (a ZeRO-3 block's summed gradient into the owner's accumulator).
void add_into(float* y, const float* x, int64_t n, stream_t stream);

// grads *= *scale (for callers that want clipped grads materialised).
void scale_inplace(float* x, int64_t n, const float* scale, stream_t stream);

// dst[i] = bf16(src[i]), round to nearest even (the adapter's bf16 copy after an update).
void to_bf16(bf16* dst, const float* src, int64_t n, stream_t stream);
// x[0, n) = 0 on `stream` (the gradient accumulator after a step).
void zero_async(float* x, int64_t n, stream_t stream);
// Copies on `stream`; the host side must stay valid until the stream is synchronized.
void copy_to_device_async(void* dst, const void* src, size_t bytes, stream_t stream);
void copy_to_host_async(void* dst, const void* src, size_t bytes, stream_t stream);
void synchronize(stream_t stream);

}  // namespace ftune::cuda
