#pragma once
// kernels module (CUDA backend): the transformer's pointwise / row-wise ops, the GPU twins
// of ftune::cpu ops (cpu_ops.hpp). Activations are bf16 with fp32 math inside each kernel
// and one rounding per output; statistics (rstd, losses) are fp32. All pointers are device
// pointers, row-major; every launcher is asynchronous on `stream` and throws CudaError on a
// launch failure. Plain C++ header (no CUDA headers needed). Implemented in
// src/kernels/cuda/{embedding,rms_norm,rope,elementwise,cross_entropy}.cu.
#include <cstdint>

#include "ftune/kernels/cuda_device.hpp"

namespace ftune::cuda {

// out[n,:] = table[ids[n],:] for n < N; table is [vocab, D]. Ids outside [0, vocab) give a
// zero row (the data pipeline validates ids; this only keeps the kernel in bounds).
void embedding_forward(bf16* out, const bf16* table, const int32_t* ids, int64_t N, int64_t D,
                       int64_t vocab, stream_t stream);

// y = w * (x * rstd), rstd[n] = 1/sqrt(mean(x[n,:]^2) + eps) in fp32 (as cpu::rms_norm_forward;
// HF rounds x*rstd to bf16 before the weight: at most one bf16 ulp apart).
void rms_norm_forward(bf16* y, float* rstd, const bf16* x, const bf16* w, int64_t N, int64_t D,
                      float eps, stream_t stream);
// dx (+)= input gradient of the above (w frozen: no dw). accumulate adds into dx (the
// residual stream's gradient) with one rounding.
void rms_norm_backward(bf16* dx, const bf16* dy, const bf16* x, const bf16* w,
                       const float* rstd, int64_t N, int64_t D, bool accumulate,
                       stream_t stream);

// Full fine-tuning's extra gradients (src/kernels/cuda/full_grads.cu), fp32, added into the
// output, summed in a fixed order (bit-reproducible). ws: column_grad_workspace_floats(N, D).
// dw[D] += sum_n dy[n, :] * (x[n, :] * rstd[n])  (twin: cpu::rms_norm_weight_backward)
// db[D] += sum_n dy[n, :]                        (a bias's gradient)
// dtable[uniq[u], :] += sum_{j in [start[u], start[u+1])} dy[order[j], :] for u < U: the
// embedding's gradient, rows grouped by token id on the host (uniq distinct).
int64_t column_grad_workspace_floats(int64_t N, int64_t D);
void rms_norm_weight_backward(float* dw, const bf16* dy, const bf16* x, const float* rstd,
                              int64_t N, int64_t D, float* ws, stream_t stream);
void bias_backward(float* db, const bf16* dy, int64_t N, int64_t D, float* ws, stream_t stream);
void embedding_backward(float* dtable, const bf16* dy, const int32_t* uniq, const int32_t* start,
                        const int32_t* order, int64_t U, int64_t D, stream_t stream);

// Rotary embedding in place on x[N, heads, head_dim] (HF rotate_half); cos/sin are fp32
// [positions, head_dim/2] (llama3 scaling lives in the caller's inv_freq); positions[N].
// Backward applies the inverse rotation to the gradient, also in place.
void rope_forward(bf16* x, const float* cos, const float* sin, const int32_t* positions,
                  int64_t N, int64_t heads, int64_t head_dim, stream_t stream);
void rope_backward(bf16* dx, const float* cos, const float* sin, const int32_t* positions,
                   int64_t N, int64_t heads, int64_t head_dim, stream_t stream);

// h = silu(gate) * up over n values; backward writes dgate, dup.
void swiglu_forward(bf16* h, const bf16* gate, const bf16* up, int64_t n, stream_t stream);
void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dh, const bf16* gate, const bf16* up,
                     int64_t n, stream_t stream);

// out = a + b over n values (out may alias a or b).
void residual_add(bf16* out, const bf16* a, const bf16* b, int64_t n, stream_t stream);

// y (+)= x * keep(i) / (1 - p), keep(i) == cpu::dropout_keep(seed, i, p) bit for bit, so the
// mask matches the CPU backend's. The LoRA backward applies the same call (same seed) to the
// gradient. p == 0 copies (or adds). Requires 0 <= p < 1.
void dropout_apply(bf16* y, const bf16* x, int64_t n, double p, uint64_t seed,
                   bool accumulate, stream_t stream);

// Cross-entropy of bf16 logits[N,V] against targets (< 0 = ignored row), one call per chunk
// of rows: per-row online log-sum-exp in fp32 (two passes over the bf16 row, no fp32 copy),
// row_loss[n] = lse - logit[target] (0 for ignored rows), and
// dlogits = scale * (softmax - onehot) in bf16 (zero rows for ignored ones).
// dlogits may alias logits (in place: the chunk's logits buffer becomes its gradient).
// A target >= V gives a NaN row loss.
void cross_entropy_forward_backward(bf16* dlogits, float* row_loss, const bf16* logits,
                                    const int32_t* targets, int64_t N, int64_t V, float scale,
                                    stream_t stream);

}  // namespace ftune::cuda
