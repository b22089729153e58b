// Reference attention kernels for `flash_attn = false`: one block per (query token, head)
// keeps that row's scores in fp32 shared memory (max_seqlen floats), any head_dim <= 256.
// Backward is two kernels with no atomics (deterministic, no workspace): dQ by query rows,
// and dK/dV by key rows (a block per (key token, kv head) walks the queries after it over
// the heads of its GQA group). One warp per score dot product; scalar loads, so any d works.
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "ftune/kernels/cuda_attention.hpp"

namespace ftune::cuda {
namespace {

using bf = __nv_bfloat16;
constexpr int kThreads = 128, kWarps = kThreads / 32, kMaxD = 256;

// Index of the sequence holding token i (seq_start is sorted).
__device__ int find_seq(const int64_t* seq_start, int num_seqs, int64_t i) {
  int lo = 0, hi = num_seqs;  // invariant: seq_start[lo] <= i < seq_start[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (seq_start[mid] <= i) lo = mid;
    else hi = mid;
  }
  return lo;
}

__device__ float block_max(float v, float* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = lane < kWarps ? sh[lane] : -INFINITY;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ void load_row(float* dst, const bf* src, int d) {
  for (int c = threadIdx.x; c < d; c += kThreads) dst[c] = detail::ld(src + c);
}

// Shared: q row [kMaxD], scores [max_seqlen], reduction scratch [32].
__global__ void __launch_bounds__(kThreads)
    naive_fwd_kernel(bf* out, float* lse, const bf* q, const bf* k, const bf* v,
                     const int64_t* seq_start, int num_seqs, int Hq, int Hkv, int d,
                     float scale) {
  extern __shared__ float sm[];
  float *sq = sm, *red = sm + kMaxD, *sp = red + 32;
  const int64_t i = blockIdx.x;
  const int h = blockIdx.y, kh = h / (Hq / Hkv), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t j0 = seq_start[find_seq(seq_start, num_seqs, i)];
  const int n = static_cast<int>(i - j0 + 1);
  const int64_t qs = int64_t(Hq) * d, kvs = int64_t(Hkv) * d;
  load_row(sq, q + i * qs + h * d, d);
  __syncthreads();
  for (int j = warp; j < n; j += kWarps) {
    const bf* kj = k + (j0 + j) * kvs + kh * d;
    float dot = 0.f;
    for (int c = lane; c < d; c += 32) dot += sq[c] * detail::ld(kj + c);
    dot = detail::warp_sum(dot);
    if (lane == 0) sp[j] = dot * scale;
  }
  __syncthreads();
  float m = -INFINITY;
  for (int j = threadIdx.x; j < n; j += kThreads) m = fmaxf(m, sp[j]);
  m = block_max(m, red);
  float sum = 0.f;
  for (int j = threadIdx.x; j < n; j += kThreads) {
    sp[j] = __expf(sp[j] - m);
    sum += sp[j];
  }
  sum = detail::block_sum(sum, red);  // its barriers also publish sp
  const float inv = 1.f / sum;
  for (int c = threadIdx.x; c < d; c += kThreads) {
    const bf* vc = v + j0 * kvs + kh * d + c;
    float acc = 0.f;
    for (int j = 0; j < n; ++j) acc += sp[j] * detail::ld(vc + j * kvs);
    detail::st(out + i * qs + h * d + c, acc * inv);
  }
  if (threadIdx.x == 0) lse[i * Hq + h] = m + logf(sum);
}

// dQ row i, head h: ds_j = p_j (dO.v_j - D) * scale, dq = sum_j ds_j k_j.
// Shared: q, dO rows [2 * kMaxD], ds [max_seqlen], scratch [32].
__global__ void __launch_bounds__(kThreads)
    naive_dq_kernel(bf* dq, const bf* dout, const bf* out, const float* lse, const bf* q,
                    const bf* k, const bf* v, const int64_t* seq_start, int num_seqs, int Hq,
                    int Hkv, int d, float scale) {
  extern __shared__ float sm[];
  float *sq = sm, *sdo = sm + kMaxD, *red = sdo + kMaxD, *sds = red + 32;
  const int64_t i = blockIdx.x;
  const int h = blockIdx.y, kh = h / (Hq / Hkv), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t j0 = seq_start[find_seq(seq_start, num_seqs, i)];
  const int n = static_cast<int>(i - j0 + 1);
  const int64_t qs = int64_t(Hq) * d, kvs = int64_t(Hkv) * d, row = i * qs + h * d;
  load_row(sq, q + row, d);
  load_row(sdo, dout + row, d);
  float part = 0.f;
  for (int c = threadIdx.x; c < d; c += kThreads) part += detail::ld(dout + row + c) * detail::ld(out + row + c);
  const float Di = detail::block_sum(part, red);  // barriers also publish sq, sdo
  const float L = lse[i * Hq + h];
  for (int j = warp; j < n; j += kWarps) {
    const bf* kj = k + (j0 + j) * kvs + kh * d;
    const bf* vj = v + (j0 + j) * kvs + kh * d;
    float s = 0.f, dp = 0.f;
    for (int c = lane; c < d; c += 32) {
      s += sq[c] * detail::ld(kj + c);
      dp += sdo[c] * detail::ld(vj + c);
    }
    s = detail::warp_sum(s);
    dp = detail::warp_sum(dp);
    if (lane == 0) sds[j] = __expf(s * scale - L) * (dp - Di) * scale;
  }
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += kThreads) {
    const bf* kc = k + j0 * kvs + kh * d + c;
    float acc = 0.f;
    for (int j = 0; j < n; ++j) acc += sds[j] * detail::ld(kc + j * kvs);
    detail::st(dq + row + c, acc);
  }
}

// dK, dV row j, kv head kh: sums over the group's heads and the queries i >= j.
// Shared: k, v rows [2 * kMaxD], p and ds [2 * max_seqlen].
__global__ void __launch_bounds__(kThreads)
    naive_dkdv_kernel(bf* dk, bf* dv, const bf* dout, const bf* out, const float* lse,
                      const bf* q, const bf* k, const bf* v, const int64_t* seq_start,
                      int num_seqs, int max_seqlen, int Hq, int Hkv, int d, float scale) {
  extern __shared__ float sm[];
  float *sk = sm, *sv = sm + kMaxD, *sp = sv + kMaxD, *sds = sp + max_seqlen;
  const int64_t j = blockIdx.x;
  const int kh = blockIdx.y, G = Hq / Hkv, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t j1 = seq_start[find_seq(seq_start, num_seqs, j) + 1];
  const int n = static_cast<int>(j1 - j);  // queries j .. j1 - 1
  const int64_t qs = int64_t(Hq) * d, kvs = int64_t(Hkv) * d;
  load_row(sk, k + j * kvs + kh * d, d);
  load_row(sv, v + j * kvs + kh * d, d);
  constexpr int kPer = kMaxD / kThreads;  // columns per thread
  float dka[kPer] = {}, dva[kPer] = {};
  for (int h = kh * G; h < (kh + 1) * G; ++h) {
    __syncthreads();  // rows loaded / previous head's sp, sds consumed
    for (int ii = warp; ii < n; ii += kWarps) {
      const int64_t row = (j + ii) * qs + h * d;
      float s = 0.f, dp = 0.f, Di = 0.f;
      for (int c = lane; c < d; c += 32) {
        const float o = detail::ld(dout + row + c);
        s += detail::ld(q + row + c) * sk[c];
        dp += o * sv[c];
        Di += o * detail::ld(out + row + c);
      }
      s = detail::warp_sum(s);
      dp = detail::warp_sum(dp);
      Di = detail::warp_sum(Di);
      if (lane == 0) {
        const float p = __expf(s * scale - lse[(j + ii) * Hq + h]);
        sp[ii] = p;
        sds[ii] = p * (dp - Di) * scale;
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int c = threadIdx.x + r * kThreads;
      if (c >= d) continue;
      const int64_t col = j * qs + h * d + c;
      for (int ii = 0; ii < n; ++ii) {
        dka[r] += sds[ii] * detail::ld(q + col + ii * qs);
        dva[r] += sp[ii] * detail::ld(dout + col + ii * qs);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int c = threadIdx.x + r * kThreads;
    if (c < d) {
      detail::st(dk + j * kvs + kh * d + c, dka[r]);
      detail::st(dv + j * kvs + kh * d + c, dva[r]);
    }
  }
}

void check_naive(const AttentionShape& s, size_t smem) {
  if (s.d <= 0 || s.d > kMaxD)
    throw std::invalid_argument("naive attention: head_dim must be in 1..256, got " +
                                std::to_string(s.d));
  if (s.Hq <= 0 || s.Hkv <= 0 || s.Hq % s.Hkv != 0 || s.Hq > 65535 || s.Hkv > 65535)
    throw std::invalid_argument("naive attention: need Hq a multiple of Hkv (<= 65535)");
  if (s.num_tokens > 0x7fffffff)
    throw std::invalid_argument("naive attention: over 2^31 tokens");
  if (smem > 227 * 1024)
    throw std::invalid_argument("naive attention: max_seqlen " + std::to_string(s.max_seqlen) +
                                " needs too much shared memory for one score row");
}

template <typename K>
void set_smem(K kern, size_t smem) {
  FTUNE_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
}

}  // namespace

void naive_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                             const int64_t* seq_start, const AttentionShape& s, stream_t stream) {
  const size_t smem = (kMaxD + 32 + s.max_seqlen) * sizeof(float);
  check_naive(s, smem);
  if (s.num_tokens == 0) return;
  set_smem(naive_fwd_kernel, smem);
  naive_fwd_kernel<<<dim3(static_cast<unsigned>(s.num_tokens), s.Hq), kThreads, smem, stream>>>(
      detail::dev(out), lse, detail::dev(q), detail::dev(k), detail::dev(v), seq_start,
      static_cast<int>(s.num_seqs), s.Hq, s.Hkv, s.d, 1.f / sqrtf(static_cast<float>(s.d)));
  FTUNE_CUDA_LAUNCH_CHECK();
}

void naive_attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
                              const float* lse, const bf16* q, const bf16* k, const bf16* v,
                              const int64_t* seq_start, const AttentionShape& s,
                              stream_t stream) {
  const size_t smem_q = (2 * kMaxD + 32 + s.max_seqlen) * sizeof(float);
  const size_t smem_k = (2 * kMaxD + 2 * s.max_seqlen) * sizeof(float);
  check_naive(s, smem_k);
  if (s.num_tokens == 0) return;
  const float scale = 1.f / sqrtf(static_cast<float>(s.d));
  const unsigned n = static_cast<unsigned>(s.num_tokens);
  const int ns = static_cast<int>(s.num_seqs);
  set_smem(naive_dq_kernel, smem_q);
  naive_dq_kernel<<<dim3(n, s.Hq), kThreads, smem_q, stream>>>(
      detail::dev(dq), detail::dev(dout), detail::dev(out), lse, detail::dev(q), detail::dev(k),
      detail::dev(v), seq_start, ns, s.Hq, s.Hkv, s.d, scale);
  FTUNE_CUDA_LAUNCH_CHECK();
  set_smem(naive_dkdv_kernel, smem_k);
  naive_dkdv_kernel<<<dim3(n, s.Hkv), kThreads, smem_k, stream>>>(
      detail::dev(dk), detail::dev(dv), detail::dev(dout), detail::dev(out), lse, detail::dev(q),
      detail::dev(k), detail::dev(v), seq_start, ns, static_cast<int>(s.max_seqlen), s.Hq,
      s.Hkv, s.d, scale);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace ftune::cuda
