// CPU reference ops: the readable definition of what every CUDA kernel must compute.
#include "ftune/kernels/cpu_ops.hpp"
#include "ftune/kernels/dropout_mask.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace ftune::cpu {

// ---------------------------------------------------------------- matrix products
template <typename T>
void matmul_nt(T* C, const T* A, const T* B, int64_t M, int64_t N, int64_t K, T alpha,
               bool accumulate) {
#pragma omp parallel for schedule(static) collapse(2)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
      // Four output columns at once: the A row is read once per four dot products.
      const T* a = A + m * K;
      const int64_t nn = std::min<int64_t>(4, N - n0);
      T acc[4] = {0, 0, 0, 0};
      for (int64_t j = 0; j < nn; ++j) {
        const T* b = B + (n0 + j) * K;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < K; ++k) s += a[k] * b[k];
        acc[j] = s;
      }
      for (int64_t j = 0; j < nn; ++j) {
        T v = alpha * acc[j];
        C[m * N + n0 + j] = accumulate ? C[m * N + n0 + j] + v : v;
      }
    }
  }
}

// C[M,N] (+)= alpha * sum_k A(m,k) B[k,:], where A(m,k) = A[m * sm + k * sk]: row-by-row
// axpy over contiguous rows of B, shared by the "nn" (sm = K, sk = 1) and "tn" (sm = 1, sk = M)
// products.
template <typename T>
static void matmul_rows_of_b(T* C, const T* A, int64_t sm, int64_t sk, const T* B, int64_t M,
                             int64_t N, int64_t K, T alpha, bool accumulate) {
#pragma omp parallel
  {
    std::vector<T> row(N);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      std::fill(row.begin(), row.end(), T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T a = A[m * sm + k * sk];
        const T* b = B + k * N;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) row[n] += a * b[n];
      }
      T* c = C + m * N;
      for (int64_t n = 0; n < N; ++n) c[n] = accumulate ? c[n] + alpha * row[n] : alpha * row[n];
    }
  }
}

template <typename T>
void matmul_nn(T* C, const T* A, const T* B, int64_t M, int64_t N, int64_t K, T alpha,
               bool accumulate) {
  matmul_rows_of_b(C, A, K, 1, B, M, N, K, alpha, accumulate);
}

template <typename T>
void matmul_tn(T* C, const T* A, const T* B, int64_t M, int64_t N, int64_t K, T alpha,
               bool accumulate) {
  matmul_rows_of_b(C, A, 1, M, B, M, N, K, alpha, accumulate);
}

// ---------------------------------------------------------------- RMSNorm
template <typename T>
void rms_norm_forward(T* y, T* rstd, const T* x, const T* w, int64_t N, int64_t D, double eps) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * D;
    T ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
    const T r = T(1) / std::sqrt(ss / T(D) + T(eps));
    rstd[n] = r;
    // HF multiplies weight * (x * rstd): same order here.
    for (int64_t i = 0; i < D; ++i) y[n * D + i] = w[i] * (xr[i] * r);
  }
}

template <typename T>
void rms_norm_backward(T* dx, const T* dy, const T* x, const T* w, const T* rstd, int64_t N,
                       int64_t D, bool accumulate) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * D;
    const T* dyr = dy + n * D;
    const T r = rstd[n];
    // y = w * xhat, xhat = x r: dx = r (g - xhat mean(g xhat)), g = w dy.
    T dot = 0;
    for (int64_t i = 0; i < D; ++i) dot += w[i] * dyr[i] * xr[i] * r;
    const T mean = dot / T(D);
    for (int64_t i = 0; i < D; ++i) {
      const T v = r * (w[i] * dyr[i] - xr[i] * r * mean);
      dx[n * D + i] = accumulate ? dx[n * D + i] + v : v;
    }
  }
}

template <typename T>
void rms_norm_weight_backward(T* dw, const T* dy, const T* x, const T* rstd, int64_t N,
                              int64_t D) {
  // Columns in parallel, rows in order: the sum does not depend on the thread count.
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < D; ++i) {
    T s = 0;
    for (int64_t n = 0; n < N; ++n) s += dy[n * D + i] * x[n * D + i] * rstd[n];
    dw[i] += s;
  }
}

// ---------------------------------------------------------------- RoPE
template <typename T>
static void rope_rotate(T* x, const float* cos, const float* sin, const int32_t* positions,
                        int64_t N, int64_t heads, int64_t head_dim, T sign) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* c = cos + static_cast<int64_t>(positions[n]) * half;
    const float* s = sin + static_cast<int64_t>(positions[n]) * half;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + (n * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const T a = v[i], b = v[i + half];
        const T ci = T(c[i]), si = sign * T(s[i]);
        v[i] = a * ci - b * si;
        v[i + half] = b * ci + a * si;
      }
    }
  }
}

template <typename T>
void rope_forward(T* x, const float* cos, const float* sin, const int32_t* positions, int64_t N,
                  int64_t heads, int64_t head_dim) {
  rope_rotate(x, cos, sin, positions, N, heads, head_dim, T(1));
}

template <typename T>
void rope_backward(T* dx, const float* cos, const float* sin, const int32_t* positions,
                   int64_t N, int64_t heads, int64_t head_dim) {
  rope_rotate(dx, cos, sin, positions, N, heads, head_dim, T(-1));
}

// ---------------------------------------------------------------- attention
template <typename T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v,
                       const int64_t* seq_start, int64_t num_seqs, int64_t Hq, int64_t Hkv,
                       int64_t d) {
  const int64_t group = Hq / Hkv;
  const T scale = T(1) / std::sqrt(T(d));
  const int64_t N = seq_start[num_seqs];
  const int64_t qs = Hq * d, kvs = Hkv * d;
#pragma omp parallel
  {
    std::vector<T> p;
#pragma omp for schedule(dynamic, 4) collapse(2)
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t h = 0; h < Hq; ++h) {
        // The sequence holding token i (few sequences: a short scan).
        int64_t s = 0;
        while (seq_start[s + 1] <= i) ++s;
        const int64_t j0 = seq_start[s];
        const int64_t kh = h / group;
        const T* qi = q + i * qs + h * d;
        p.resize(i - j0 + 1);
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t j = j0; j <= i; ++j) {
          const T* kj = k + j * kvs + kh * d;
          T dot = 0;
          for (int64_t c = 0; c < d; ++c) dot += qi[c] * kj[c];
          p[j - j0] = dot * scale;
          mx = std::max(mx, p[j - j0]);
        }
        T sum = 0;
        for (auto& e : p) {
          e = std::exp(e - mx);
          sum += e;
        }
        T* o = out + i * qs + h * d;
        std::fill(o, o + d, T(0));
        for (int64_t j = j0; j <= i; ++j) {
          const T w = p[j - j0] / sum;
          const T* vj = v + j * kvs + kh * d;
          for (int64_t c = 0; c < d; ++c) o[c] += w * vj[c];
        }
        lse[i * Hq + h] = mx + std::log(sum);
      }
    }
  }
}

template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out, const T* lse,
                        const T* q, const T* k, const T* v, const int64_t* seq_start,
                        int64_t num_seqs, int64_t Hq, int64_t Hkv, int64_t d) {
  const int64_t group = Hq / Hkv;
  const T scale = T(1) / std::sqrt(T(d));
  const int64_t qs = Hq * d, kvs = Hkv * d;
  const int64_t N = seq_start[num_seqs];
  std::fill(dq, dq + N * qs, T(0));
  std::fill(dk, dk + N * kvs, T(0));
  std::fill(dv, dv + N * kvs, T(0));
  // One task per (sequence, kv head): it alone writes that head's dk/dv and the dq of the
  // query heads in its group, so no two threads touch the same gradient element.
#pragma omp parallel for schedule(dynamic, 1) collapse(2)
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t kh = 0; kh < Hkv; ++kh) {
      const int64_t j0 = seq_start[s], j1 = seq_start[s + 1];
      for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
        for (int64_t i = j0; i < j1; ++i) {
          const T* qi = q + i * qs + h * d;
          const T* doi = dout + i * qs + h * d;
          const T* oi = out + i * qs + h * d;
          T Di = 0;
          for (int64_t c = 0; c < d; ++c) Di += doi[c] * oi[c];
          const T L = lse[i * Hq + h];
          T* dqi = dq + i * qs + h * d;
          for (int64_t j = j0; j <= i; ++j) {
            const T* kj = k + j * kvs + kh * d;
            const T* vj = v + j * kvs + kh * d;
            T dot = 0, dp = 0;
            for (int64_t c = 0; c < d; ++c) {
              dot += qi[c] * kj[c];
              dp += doi[c] * vj[c];
            }
            const T pij = std::exp(dot * scale - L);
            const T ds = pij * (dp - Di) * scale;
            T* dkj = dk + j * kvs + kh * d;
            T* dvj = dv + j * kvs + kh * d;
            for (int64_t c = 0; c < d; ++c) {
              dqi[c] += ds * kj[c];
              dkj[c] += ds * qi[c];
              dvj[c] += pij * doi[c];
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- SwiGLU
template <typename T>
void swiglu_forward(T* h, const T* gate, const T* up, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T g = gate[i];
    h[i] = g / (T(1) + std::exp(-g)) * up[i];
  }
}

template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dh, const T* gate, const T* up, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T g = gate[i];
    const T sg = T(1) / (T(1) + std::exp(-g));
    const T silu = g * sg;
    dup[i] = dh[i] * silu;
    dgate[i] = dh[i] * up[i] * sg * (T(1) + g * (T(1) - sg));
  }
}

// ---------------------------------------------------------------- cross-entropy
template <typename T>
double cross_entropy_forward_backward(T* dlogits, const T* logits, const int32_t* targets,
                                      int64_t N, int64_t V, T scale) {
  // Per-row losses summed serially afterwards: the total is then bit-reproducible.
  std::vector<double> row_loss(N, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* l = logits + n * V;
    T* dl = dlogits + n * V;
    const int32_t t = targets[n];
    if (t < 0) {
      std::fill(dl, dl + V, T(0));
      continue;
    }
    T mx = l[0];
    for (int64_t i = 1; i < V; ++i) mx = std::max(mx, l[i]);
    T sum = 0;
    for (int64_t i = 0; i < V; ++i) sum += std::exp(l[i] - mx);
    const T lse = mx + std::log(sum);
    row_loss[n] = static_cast<double>(lse - l[t]);
    for (int64_t i = 0; i < V; ++i) dl[i] = scale * std::exp(l[i] - lse);
    dl[t] -= scale;
  }
  double total = 0;
  for (double v : row_loss) total += v;
  return total;
}

// ---------------------------------------------------------------- dropout
bool dropout_keep(uint64_t seed, uint64_t i, double p) {
  // The mask of ftune/kernels/dropout_mask.hpp (shared with the CUDA kernels).
  return dropout::keep(dropout::draw(dropout::key(seed), i >> 1), static_cast<int>(i & 1),
                       dropout::threshold(p));
}

template <typename T>
void dropout_apply(T* y, const T* x, int64_t n, double p, uint64_t seed, bool accumulate) {
  const T keep_scale = T(1.0 / (1.0 - p));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T v = (p <= 0.0 || dropout_keep(seed, static_cast<uint64_t>(i), p)) ? x[i] * (p > 0 ? keep_scale : T(1)) : T(0);
    y[i] = accumulate ? y[i] + v : v;
  }
}

// ---------------------------------------------------------------- instantiations
#define FTUNE_INSTANTIATE(T)                                                                  \
  template void matmul_nt<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, T, bool);    \
  template void matmul_nn<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, T, bool);    \
  template void matmul_tn<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, T, bool);    \
  template void rms_norm_forward<T>(T*, T*, const T*, const T*, int64_t, int64_t, double);    \
  template void rms_norm_backward<T>(T*, const T*, const T*, const T*, const T*, int64_t,     \
                                     int64_t, bool);                                          \
  template void rms_norm_weight_backward<T>(T*, const T*, const T*, const T*, int64_t,       \
                                            int64_t);                                          \
  template void rope_forward<T>(T*, const float*, const float*, const int32_t*, int64_t,      \
                                int64_t, int64_t);                                            \
  template void rope_backward<T>(T*, const float*, const float*, const int32_t*, int64_t,     \
                                 int64_t, int64_t);                                           \
  template void attention_forward<T>(T*, T*, const T*, const T*, const T*, const int64_t*,    \
                                     int64_t, int64_t, int64_t, int64_t);                     \
  template void attention_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*,     \
                                      const T*, const T*, const int64_t*, int64_t, int64_t,   \
                                      int64_t, int64_t);                                      \
  template void swiglu_forward<T>(T*, const T*, const T*, int64_t);                           \
  template void swiglu_backward<T>(T*, T*, const T*, const T*, const T*, int64_t);            \
  template double cross_entropy_forward_backward<T>(T*, const T*, const int32_t*, int64_t,    \
                                                    int64_t, T);                              \
  template void dropout_apply<T>(T*, const T*, int64_t, double, uint64_t, bool);

FTUNE_INSTANTIATE(float)
FTUNE_INSTANTIATE(double)

}  // namespace ftune::cpu
