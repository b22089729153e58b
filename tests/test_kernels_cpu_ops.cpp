// CPU reference ops, forward side: every op against a naive double-precision reference
// written here from the textbook definition (not from ops.cpp), on several shapes
// including ragged ones (1, 3, 17, 33, non-multiples of 4), plus structural properties
// (RoPE inverse, causal/packed attention isolation, exact cross-entropy, dropout mask).
// Gradients: test_kernels_cpu_grads.cpp. float/double + thread count:
// test_kernels_cpu_determinism.cpp.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "ftune/kernels/cpu_ops.hpp"

using namespace ftune::cpu;
using Vec = std::vector<double>;

namespace {

// Values with magnitude in [0.05, 1] and a random sign: no zeros (matmul_nn/tn skip exact
// zeros, which would hide wrong indexing of those entries), nothing tiny either.
Vec rand_vec(std::mt19937& rng, size_t n, double mag = 1.0) {
  std::uniform_real_distribution<double> u(0.05, 1.0);
  std::bernoulli_distribution sign(0.5);
  Vec v(n);
  for (auto& e : v) e = mag * (sign(rng) ? u(rng) : -u(rng));
  return v;
}

// Worst |got - want| / (1 + |want|): relative for large values, absolute near zero.
double max_err(const Vec& got, const Vec& want) {
  REQUIRE(got.size() == want.size());
  double e = 0;
  for (size_t i = 0; i < got.size(); ++i)
    e = std::max(e, std::abs(got[i] - want[i]) / (1.0 + std::abs(want[i])));
  return e;
}

// Double results differ from the references only by summation order: ~1e-15 per term.
constexpr double kTol = 1e-12;

// HF-style RoPE tables: angle(pos, i) = pos * theta^(-2i/head_dim), stored as float
// [max_pos, head_dim/2] exactly as the engine feeds them.
struct Rope {
  std::vector<float> cos, sin;
};
Rope rope_tables(int64_t max_pos, int64_t head_dim, double theta = 10000.0) {
  const int64_t half = head_dim / 2;
  Rope r{std::vector<float>(max_pos * half), std::vector<float>(max_pos * half)};
  for (int64_t p = 0; p < max_pos; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double a = p * std::pow(theta, -2.0 * i / head_dim);
      r.cos[p * half + i] = static_cast<float>(std::cos(a));
      r.sin[p * half + i] = static_cast<float>(std::sin(a));
    }
  return r;
}

// HF apply_rotary_pos_emb: x * cat(cos,cos) + rotate_half(x) * cat(sin,sin),
// rotate_half(x) = cat(-x2, x1).
Vec ref_rope(const Vec& x, const Rope& t, const std::vector<int32_t>& pos, int64_t heads,
             int64_t hd) {
  const int64_t half = hd / 2;
  Vec y(x.size());
  for (size_t n = 0; n < pos.size(); ++n)
    for (int64_t h = 0; h < heads; ++h) {
      const double* v = x.data() + (n * heads + h) * hd;
      for (int64_t i = 0; i < hd; ++i) {
        const int64_t f = pos[n] * half + i % half;
        const double rot = i < half ? -v[i + half] : v[i - half];
        y[(n * heads + h) * hd + i] = v[i] * double(t.cos[f]) + rot * double(t.sin[f]);
      }
    }
  return y;
}

// Attention by the definition: per sequence and query head, the full score matrix with
// -inf above the diagonal, row softmax, times V.
void ref_attention(Vec& out, Vec& lse, const Vec& q, const Vec& k, const Vec& v,
                   const std::vector<int64_t>& ss, int64_t Hq, int64_t Hkv, int64_t d) {
  const int64_t N = ss.back();
  out.assign(N * Hq * d, 0.0);
  lse.assign(N * Hq, 0.0);
  const double inf = std::numeric_limits<double>::infinity();
  for (size_t s = 0; s + 1 < ss.size(); ++s) {
    const int64_t b = ss[s], L = ss[s + 1] - ss[s];
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t kh = h * Hkv / Hq;  // GQA: Hq/Hkv consecutive query heads per kv head
      for (int64_t i = 0; i < L; ++i) {
        Vec sc(L);
        for (int64_t j = 0; j < L; ++j) {
          if (j > i) { sc[j] = -inf; continue; }
          double dot = 0;
          for (int64_t c = 0; c < d; ++c)
            dot += q[((b + i) * Hq + h) * d + c] * k[((b + j) * Hkv + kh) * d + c];
          sc[j] = dot / std::sqrt(double(d));
        }
        double Z = 0;
        for (double e : sc) Z += std::exp(e);  // inputs are O(1): no overflow
        lse[(b + i) * Hq + h] = std::log(Z);
        for (int64_t j = 0; j < L; ++j)
          for (int64_t c = 0; c < d; ++c)
            out[((b + i) * Hq + h) * d + c] +=
                std::exp(sc[j]) / Z * v[((b + j) * Hkv + kh) * d + c];
      }
    }
  }
}

std::vector<int64_t> starts(const std::vector<int64_t>& lens) {
  std::vector<int64_t> s{0};
  for (int64_t l : lens) s.push_back(s.back() + l);
  return s;
}

}  // namespace

TEST_CASE("matmul_nt / nn / tn match a triple loop, with alpha and accumulate") {
  std::mt19937 rng(1);
  struct Shape { int64_t M, N, K; };
  for (Shape sh : {Shape{1, 1, 1}, Shape{3, 5, 7}, Shape{17, 33, 3}, Shape{33, 17, 65},
                   Shape{4, 9, 1}, Shape{2, 6, 4}, Shape{5, 1, 13}}) {
    const auto [M, N, K] = sh;
    CAPTURE(M); CAPTURE(N); CAPTURE(K);
    const Vec A = rand_vec(rng, M * K), B = rand_vec(rng, N * K), C0 = rand_vec(rng, M * N);
    // The same data read under the three layouts. A as [M,K] (nt, nn) or [K,M] (tn);
    // B as [N,K] (nt) or [K,N] (nn, tn).
    auto at = [&](int64_t m, int64_t kk, bool trans) { return trans ? A[kk * M + m] : A[m * K + kk]; };
    auto bt = [&](int64_t kk, int64_t n, bool nk) { return nk ? B[n * K + kk] : B[kk * N + n]; };
    for (const double alpha : {1.0, -0.75}) {
      for (const bool acc : {false, true}) {
        for (int op = 0; op < 3; ++op) {
          CAPTURE(op); CAPTURE(alpha); CAPTURE(acc);
          Vec C = C0, want(M * N);
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) {
              double s = 0;
              for (int64_t kk = 0; kk < K; ++kk) s += at(m, kk, op == 2) * bt(kk, n, op == 0);
              want[m * N + n] = (acc ? C0[m * N + n] : 0.0) + alpha * s;
            }
          if (op == 0) matmul_nt(C.data(), A.data(), B.data(), M, N, K, alpha, acc);
          if (op == 1) matmul_nn(C.data(), A.data(), B.data(), M, N, K, alpha, acc);
          if (op == 2) matmul_tn(C.data(), A.data(), B.data(), M, N, K, alpha, acc);
          CHECK(max_err(C, want) < kTol);
        }
      }
    }
  }
}

TEST_CASE("rms_norm_forward matches HF LlamaRMSNorm; rstd is 1/rms") {
  std::mt19937 rng(2);
  struct Shape { int64_t N, D; double eps; };
  for (Shape sh : {Shape{1, 1, 1e-5}, Shape{3, 17, 1e-6}, Shape{17, 33, 1e-5}, Shape{5, 64, 1e-6},
                   Shape{2, 6, 0.1}}) {
    const auto [N, D, eps] = sh;
    CAPTURE(N); CAPTURE(D);
    const Vec x = rand_vec(rng, N * D, 3.0), w = rand_vec(rng, D);
    Vec y(N * D), rstd(N), want_y(N * D), want_r(N);
    for (int64_t n = 0; n < N; ++n) {
      double ms = 0;
      for (int64_t i = 0; i < D; ++i) ms += x[n * D + i] * x[n * D + i] / D;
      want_r[n] = 1.0 / std::sqrt(ms + eps);
      for (int64_t i = 0; i < D; ++i) want_y[n * D + i] = w[i] * x[n * D + i] * want_r[n];
    }
    rms_norm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, eps);
    CHECK(max_err(y, want_y) < kTol);
    CHECK(max_err(rstd, want_r) < kTol);
  }
}

TEST_CASE("rope_forward matches HF rotate_half on ragged shapes and arbitrary positions") {
  std::mt19937 rng(3);
  const int64_t max_pos = 4096;
  struct Shape { int64_t N, heads, hd; };
  for (Shape sh : {Shape{1, 1, 2}, Shape{3, 2, 6}, Shape{17, 3, 8}, Shape{33, 1, 64},
                   Shape{5, 4, 10}}) {
    const auto [N, heads, hd] = sh;
    CAPTURE(N); CAPTURE(heads); CAPTURE(hd);
    const Rope t = rope_tables(max_pos, hd);
    std::vector<int32_t> pos(N);
    std::uniform_int_distribution<int32_t> up(0, max_pos - 1);
    for (auto& p : pos) p = up(rng);  // unsorted, may repeat: indexing is per token
    pos[0] = 0;                        // position 0 must be the identity
    const Vec x = rand_vec(rng, N * heads * hd);
    Vec y = x;
    rope_forward(y.data(), t.cos.data(), t.sin.data(), pos.data(), N, heads, hd);
    CHECK(max_err(y, ref_rope(x, t, pos, heads, hd)) < kTol);
    for (int64_t i = 0; i < heads * hd; ++i) CHECK(y[i] == x[i]);
  }
}

TEST_CASE("rope_backward inverts rope_forward and rotation preserves norms") {
  // The tables are float, so cos^2 + sin^2 = 1 only to ~1.2e-7; inversion and norm
  // preservation therefore hold to ~1e-7 relative, not to double epsilon.
  std::mt19937 rng(4);
  const int64_t N = 17, heads = 3, hd = 16;
  const Rope t = rope_tables(2048, hd);
  std::vector<int32_t> pos(N);
  for (int64_t n = 0; n < N; ++n) pos[n] = int32_t(n * 97 % 2048);
  const Vec x = rand_vec(rng, N * heads * hd);
  Vec y = x;
  rope_forward(y.data(), t.cos.data(), t.sin.data(), pos.data(), N, heads, hd);
  for (int64_t r = 0; r < N * heads; ++r) {  // each (token, head) row keeps its norm
    double nx = 0, ny = 0;
    for (int64_t i = 0; i < hd; ++i) {
      nx += x[r * hd + i] * x[r * hd + i];
      ny += y[r * hd + i] * y[r * hd + i];
    }
    CHECK(std::abs(ny - nx) <= 1e-6 * nx);
  }
  rope_backward(y.data(), t.cos.data(), t.sin.data(), pos.data(), N, heads, hd);
  CHECK(max_err(y, x) < 1e-6);
}

TEST_CASE("attention_forward matches a masked-softmax reference over packed sequences") {
  std::mt19937 rng(5);
  struct Cfg { std::vector<int64_t> lens; int64_t Hq, Hkv, d; };
  for (const Cfg& c : {Cfg{{1}, 1, 1, 8}, Cfg{{3, 17}, 2, 1, 8}, Cfg{{5, 1, 9, 3}, 4, 2, 16},
                       Cfg{{33}, 3, 3, 6}, Cfg{{4, 0, 7}, 4, 1, 5}}) {
    CAPTURE(c.Hq); CAPTURE(c.Hkv); CAPTURE(c.d); CAPTURE(c.lens.size());
    const auto ss = starts(c.lens);  // {4, 0, 7}: an empty sequence must be harmless
    const int64_t N = ss.back();
    const Vec q = rand_vec(rng, N * c.Hq * c.d, 1.5), k = rand_vec(rng, N * c.Hkv * c.d, 1.5),
              v = rand_vec(rng, N * c.Hkv * c.d);
    Vec out(N * c.Hq * c.d), lse(N * c.Hq), want_out, want_lse;
    attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), ss.data(),
                      int64_t(c.lens.size()), c.Hq, c.Hkv, c.d);
    ref_attention(want_out, want_lse, q, k, v, ss, c.Hq, c.Hkv, c.d);
    CHECK(max_err(out, want_out) < kTol);
    CHECK(max_err(lse, want_lse) < kTol);
  }
}

TEST_CASE("attention: a token's output depends only on earlier tokens of its sequence") {
  std::mt19937 rng(6);
  const std::vector<int64_t> ss = starts({6, 9, 4});
  const int64_t N = ss.back(), Hq = 4, Hkv = 2, d = 8, S = 3;
  const Vec q = rand_vec(rng, N * Hq * d), k = rand_vec(rng, N * Hkv * d),
            v = rand_vec(rng, N * Hkv * d);
  Vec out0(N * Hq * d), lse0(N * Hq);
  attention_forward(out0.data(), lse0.data(), q.data(), k.data(), v.data(), ss.data(), S, Hq, Hkv, d);
  auto seq_of = [&](int64_t t) { int64_t s = 0; while (ss[s + 1] <= t) ++s; return s; };
  // Perturb token t's q, k and v: rows i of another sequence, or of the same sequence with
  // i < t, must be bit-identical (they never read token t); row t itself must change.
  for (int64_t t = 0; t < N; ++t) {
    CAPTURE(t);
    Vec q2 = q, k2 = k, v2 = v;
    for (int64_t c = 0; c < Hq * d; ++c) q2[t * Hq * d + c] += 0.5;
    for (int64_t c = 0; c < Hkv * d; ++c) { k2[t * Hkv * d + c] -= 0.5; v2[t * Hkv * d + c] *= 2; }
    Vec out(N * Hq * d), lse(N * Hq);
    attention_forward(out.data(), lse.data(), q2.data(), k2.data(), v2.data(), ss.data(), S, Hq, Hkv, d);
    for (int64_t i = 0; i < N; ++i) {
      const bool independent = seq_of(i) != seq_of(t) || i < t;
      const bool same = std::memcmp(&out[i * Hq * d], &out0[i * Hq * d], Hq * d * sizeof(double)) == 0 &&
                        std::memcmp(&lse[i * Hq], &lse0[i * Hq], Hq * sizeof(double)) == 0;
      if (independent) CHECK_MESSAGE(same, "row ", i, " changed");
      if (i == t) CHECK_MESSAGE(!same, "row ", i, " ignored its own token");
    }
  }
}

TEST_CASE("attention: the first token of each sequence outputs its own v") {
  // A single visible key gets softmax weight 1: out = v, lse = the scaled score.
  std::mt19937 rng(7);
  const std::vector<int64_t> ss = starts({3, 1, 5});
  const int64_t N = ss.back(), Hq = 2, Hkv = 1, d = 16;
  const Vec q = rand_vec(rng, N * Hq * d), k = rand_vec(rng, N * Hkv * d), v = rand_vec(rng, N * Hkv * d);
  Vec out(N * Hq * d), lse(N * Hq);
  attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), ss.data(), 3, Hq, Hkv, d);
  for (int s = 0; s < 3; ++s)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t c = 0; c < d; ++c)
        CHECK(out[(ss[s] * Hq + h) * d + c] == doctest::Approx(v[ss[s] * d + c]).epsilon(1e-14));
}

TEST_CASE("swiglu_forward is silu(gate) * up") {
  std::mt19937 rng(8);
  for (int64_t n : {1, 3, 17, 33, 1000}) {
    const Vec g = rand_vec(rng, n, 6.0), u = rand_vec(rng, n, 2.0);
    Vec h(n), want(n);
    for (int64_t i = 0; i < n; ++i) want[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
    swiglu_forward(h.data(), g.data(), u.data(), n);
    CHECK(max_err(h, want) < kTol);
  }
}

TEST_CASE("cross_entropy returns the sum of -log softmax[target]; dlogits = scale (p - onehot)") {
  std::mt19937 rng(9);
  struct Shape { int64_t N, V; };
  for (Shape sh : {Shape{1, 1}, Shape{1, 3}, Shape{3, 17}, Shape{17, 33}, Shape{6, 1000}}) {
    const auto [N, V] = sh;
    CAPTURE(N); CAPTURE(V);
    const Vec logits = rand_vec(rng, N * V, 4.0);
    std::vector<int32_t> tgt(N);
    std::uniform_int_distribution<int32_t> ut(0, int32_t(V - 1));
    for (auto& t : tgt) t = ut(rng);
    if (N > 2) tgt[1] = -100;  // an ignored row adds nothing and gets a zero gradient
    const double scale = 0.3;
    double want = 0;
    Vec want_d(N * V, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      if (tgt[n] < 0) continue;
      double Z = 0;  // logits are O(4): plain exp is safe, no max shift needed
      for (int64_t i = 0; i < V; ++i) Z += std::exp(logits[n * V + i]);
      want += -std::log(std::exp(logits[n * V + tgt[n]]) / Z);
      for (int64_t i = 0; i < V; ++i)
        want_d[n * V + i] = scale * (std::exp(logits[n * V + i]) / Z - (i == tgt[n] ? 1.0 : 0.0));
    }
    Vec dl(N * V, 123.0);  // garbage: ignored rows must be overwritten with zeros
    const double loss = cross_entropy_forward_backward(dl.data(), logits.data(), tgt.data(), N, V, scale);
    CHECK(loss == doctest::Approx(want).epsilon(1e-13));
    CHECK(max_err(dl, want_d) < kTol);
    if (N > 2)
      for (int64_t i = 0; i < V; ++i) CHECK(dl[1 * V + i] == 0.0);
  }
}

TEST_CASE("cross_entropy is stable for huge logits and all-ignored batches") {
  // Logits ~1e3 overflow a naive exp: the op must shift by the row max.
  const int64_t V = 5;
  const Vec logits = {1000.0, 1001.0, 999.0, 1000.5, 998.0};
  const int32_t tgt = 1;
  double Z = 0;
  for (double l : logits) Z += std::exp(l - 1001.0);
  const double want = std::log(Z);  // = lse - logits[1]
  Vec dl(V);
  const double loss = cross_entropy_forward_backward(dl.data(), logits.data(), &tgt, 1, V, 1.0);
  CHECK(std::isfinite(loss));
  CHECK(loss == doctest::Approx(want).epsilon(1e-13));
  double sum = 0;
  for (double g : dl) sum += g;
  // Softmax sums to 1, minus the one-hot. The op computes exp(l - lse) with lse ~1e3,
  // whose ulp (1.1e-13) bounds the achievable accuracy here.
  CHECK(std::abs(sum) < 1e-12);

  const std::vector<int32_t> none = {-100, -100};
  Vec dl2(2 * V, 7.0);
  const Vec two(2 * V, 1.5);
  CHECK(cross_entropy_forward_backward(dl2.data(), two.data(), none.data(), 2, V, 1.0) == 0.0);
  for (double g : dl2) CHECK(g == 0.0);
}

TEST_CASE("dropout p = 0 copies exactly (and accumulates exactly)") {
  std::mt19937 rng(10);
  const int64_t n = 1001;
  const Vec x = rand_vec(rng, n), y0 = rand_vec(rng, n);
  Vec y(n);
  dropout_apply(y.data(), x.data(), n, 0.0, 42, false);
  CHECK(std::memcmp(y.data(), x.data(), n * sizeof(double)) == 0);
  y = y0;
  dropout_apply(y.data(), x.data(), n, 0.0, 42, true);
  for (int64_t i = 0; i < n; ++i) CHECK(y[i] == y0[i] + x[i]);
  for (uint64_t i = 0; i < 100; ++i) CHECK(dropout_keep(42, i, 0.0));
}

TEST_CASE("dropout keeps ~1-p, scales kept values by 1/(1-p), follows dropout_keep") {
  const int64_t n = 100000;
  const Vec x(n, 1.0);
  for (double p : {0.05, 0.1, 0.5, 0.9}) {
    CAPTURE(p);
    Vec y(n);
    dropout_apply(y.data(), x.data(), n, p, 1234, false);
    const double s = 1.0 / (1.0 - p);
    int64_t kept = 0, bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      const bool k = dropout_keep(1234, uint64_t(i), p);
      kept += k;
      bad += y[i] != (k ? s : 0.0);  // exactly x/(1-p) or exactly 0, as the mask says
    }
    CHECK(bad == 0);
    // Binomial std of the kept fraction is <= 0.0016 at n = 1e5: 1% is >= 6 sigma.
    CHECK(std::abs(double(kept) / n - (1.0 - p)) < 0.01);
    double mean = 0;
    for (double e : y) mean += e / n;
    CHECK(mean == doctest::Approx(1.0).epsilon(0.02 * s));  // E[y] = x (inverted dropout)

    Vec y2(n, 5.0);  // accumulate adds the same masked values
    dropout_apply(y2.data(), x.data(), n, p, 1234, true);
    for (int64_t i = 0; i < n; i += 97) CHECK(y2[i] == 5.0 + y[i]);
  }
}

TEST_CASE("dropout: same seed same mask, different seed an independent mask") {
  const int64_t n = 100000;
  const double p = 0.3;
  std::mt19937 rng(11);
  const Vec x = rand_vec(rng, n);
  Vec a(n), b(n), c(n);
  dropout_apply(a.data(), x.data(), n, p, 7, false);
  dropout_apply(b.data(), x.data(), n, p, 7, false);
  dropout_apply(c.data(), x.data(), n, p, 8, false);
  CHECK(std::memcmp(a.data(), b.data(), n * sizeof(double)) == 0);
  // Independent masks disagree on a fraction 2 p (1-p) = 0.42 of the elements.
  int64_t differ = 0;
  for (int64_t i = 0; i < n; ++i) differ += (a[i] == 0.0) != (c[i] == 0.0);
  CHECK(std::abs(double(differ) / n - 2 * p * (1 - p)) < 0.01);
  // Nearby seeds and element indices must not give shifted copies of one stream.
  int64_t shifted = 0;
  for (uint64_t i = 0; i + 1 < uint64_t(n); ++i) shifted += dropout_keep(7, i + 1, p) == dropout_keep(8, i, p);
  CHECK(std::abs(double(shifted) / n - (1 - 2 * p * (1 - p))) < 0.01);
}
