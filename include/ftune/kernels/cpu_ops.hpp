#pragma once
// kernels module (CPU twin): the reference ops of the transformer, forward and
// hand-written backward, row-major, multithreaded with OpenMP. Templated on the scalar so
// tests can check gradients by finite differences in double; the engine uses float.
// Every op computes each output element in one thread with a fixed summation order, so
// results do not depend on the thread count.
#include <cstdint>

namespace ftune::cpu {

// C[M,N] (+)= alpha * A[M,K] * B[N,K]^T   (a linear layer: x W^T)
template <typename T>
void matmul_nt(T* C, const T* A, const T* B, int64_t M, int64_t N, int64_t K, T alpha,
               bool accumulate);
// C[M,N] (+)= alpha * A[M,K] * B[K,N]     (input gradient: dy W)
template <typename T>
void matmul_nn(T* C, const T* A, const T* B, int64_t M, int64_t N, int64_t K, T alpha,
               bool accumulate);
// C[M,N] (+)= alpha * A[K,M]^T * B[K,N]   (weight gradient: dy^T x)
template <typename T>
void matmul_tn(T* C, const T* A, const T* B, int64_t M, int64_t N, int64_t K, T alpha,
               bool accumulate);

// y[n,:] = x[n,:] / rms(x[n,:]) * w, rstd[n] = 1/sqrt(mean(x^2)+eps)   (HF LlamaRMSNorm)
template <typename T>
void rms_norm_forward(T* y, T* rstd, const T* x, const T* w, int64_t N, int64_t D, double eps);
// dx (+)= d/dx of the above given dy (w frozen, no dw).
template <typename T>
void rms_norm_backward(T* dx, const T* dy, const T* x, const T* w, const T* rstd, int64_t N,
                       int64_t D, bool accumulate);
// dw[D] += sum over rows of dy * x * rstd: the norm weight's gradient (full fine-tuning).
template <typename T>
void rms_norm_weight_backward(T* dw, const T* dy, const T* x, const T* rstd, int64_t N,
                              int64_t D);

// Rotary embedding in place on x[N, heads, head_dim] with HF's rotate_half convention;
// cos/sin tables are [num_positions, head_dim/2], indexed by positions[n].
template <typename T>
void rope_forward(T* x, const float* cos, const float* sin, const int32_t* positions, int64_t N,
                  int64_t heads, int64_t head_dim);
// Backward of a rotation is the inverse rotation, also in place on the gradient.
template <typename T>
void rope_backward(T* dx, const float* cos, const float* sin, const int32_t* positions,
                   int64_t N, int64_t heads, int64_t head_dim);

// Causal attention over packed sequences: tokens seq_start[s]..seq_start[s+1]-1 form
// sequence s. q [N, Hq*d], k/v [N, Hkv*d] (GQA: query head h reads kv head h/(Hq/Hkv)),
// out [N, Hq*d], lse [N, Hq] (log-sum-exp of the scaled scores, kept for backward).
template <typename T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v,
                       const int64_t* seq_start, int64_t num_seqs, int64_t Hq, int64_t Hkv,
                       int64_t d);
// Recomputes the probabilities from lse (flash-attention style) and writes dq, dk, dv.
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out, const T* lse,
                        const T* q, const T* k, const T* v, const int64_t* seq_start,
                        int64_t num_seqs, int64_t Hq, int64_t Hkv, int64_t d);

// h = silu(gate) * up, elementwise over n values.
template <typename T>
void swiglu_forward(T* h, const T* gate, const T* up, int64_t n);
template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dh, const T* gate, const T* up, int64_t n);

// Cross-entropy of logits[N,V] rows against targets (-100 = ignored row). Returns the
// sum of the row losses; writes dlogits = scale * (softmax - onehot) (zero on ignored rows).
template <typename T>
double cross_entropy_forward_backward(T* dlogits, const T* logits, const int32_t* targets,
                                      int64_t N, int64_t V, T scale);

// y[i] (+)= x[i] * mask(i) / (1 - p), mask from a counter-based hash of (seed, i), so the
// CUDA backend can reproduce the same mask. p == 0 copies.
template <typename T>
void dropout_apply(T* y, const T* x, int64_t n, double p, uint64_t seed, bool accumulate);
// The keep decision for element i (exposed for tests and the CUDA twin).
bool dropout_keep(uint64_t seed, uint64_t i, double p);

}  // namespace ftune::cpu
