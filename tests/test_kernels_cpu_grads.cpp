// CPU reference ops, backward side: every hand-written backward against central finite
// differences of its own forward, in double. For a random upstream gradient G, the
// gradient of L(x) = sum(G * f(x)) w.r.t. x is exactly what backward(G) must return.
//
// Tolerance: fourth-order central differences with step h = 1e-3 have truncation error
// O(h^4 f^(5)) ~ 1e-12 and rounding error O(eps_double * |L| / h) ~ 1e-13 |L|; measured
// agreement is ~1e-9 or better. (Plain 2-point differences were rounding-limited at
// ~5e-7 on small attention components, too close to the bar.) We require 1e-6 relative:
// far above that noise, yet any wrong term or index in a backward gives O(1e-2..1) errors.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "ftune/kernels/cpu_ops.hpp"

using namespace ftune::cpu;
using Vec = std::vector<double>;

namespace {

constexpr double kRelTol = 1e-6;

// Magnitude in [0.05, 1] times mag, random sign: no zeros.
Vec rand_vec(std::mt19937& rng, size_t n, double mag = 1.0) {
  std::uniform_real_distribution<double> u(0.05, 1.0);
  std::bernoulli_distribution sign(0.5);
  Vec v(n);
  for (auto& e : v) e = mag * (sign(rng) ? u(rng) : -u(rng));
  return v;
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Fourth-order central differences of loss() w.r.t. every element of x (perturbed in
// place, restored): f' = (-f(x+2h) + 8 f(x+h) - 8 f(x-h) + f(x-2h)) / 12h + O(h^4).
template <class F>
Vec numgrad(Vec& x, F loss, double h = 1e-3) {
  Vec g(x.size());
  for (size_t j = 0; j < x.size(); ++j) {
    const double x0 = x[j];
    auto at = [&](double dx) { x[j] = x0 + dx; return loss(); };
    g[j] = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h);
    x[j] = x0;
  }
  return g;
}

// Worst per-element |analytic - numeric| / (|numeric| + 1e-3 max|numeric|): relative for
// every component down to 1/1000 of the largest, where FD rounding noise starts to matter.
double grad_err(const Vec& analytic, const Vec& numeric) {
  REQUIRE(analytic.size() == numeric.size());
  double mx = 0;
  for (double v : numeric) mx = std::max(mx, std::abs(v));
  double e = 0;
  for (size_t i = 0; i < numeric.size(); ++i)
    e = std::max(e, std::abs(analytic[i] - numeric[i]) / (std::abs(numeric[i]) + 1e-3 * mx + 1e-300));
  return e;
}

#define CHECK_GRAD(analytic, numeric)                          \
  do {                                                         \
    const double err_ = grad_err(analytic, numeric);           \
    CHECK_MESSAGE(err_ < kRelTol, #analytic " rel err ", err_); \
  } while (0)

struct Rope {
  std::vector<float> cos, sin;
};
Rope rope_tables(int64_t max_pos, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  Rope r{std::vector<float>(max_pos * half), std::vector<float>(max_pos * half)};
  for (int64_t p = 0; p < max_pos; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double a = p * std::pow(10000.0, -2.0 * i / head_dim);
      r.cos[p * half + i] = float(std::cos(a));
      r.sin[p * half + i] = float(std::sin(a));
    }
  return r;
}

}  // namespace

TEST_CASE("matmul gradient identities: each product's gradients are the other two products") {
  // L = sum(G * C). nt: C = a A B^T  -> dA = a G B (nn),   dB = a G^T A (tn)
  //                 nn: C = a A B    -> dA = a G B^T (nt), dB = a A^T G (tn)
  //                 tn: C = a A^T B  -> dA = a B G^T (nt), dB = a A G (nn)
  std::mt19937 rng(21);
  const double a = 0.7;
  struct Shape { int64_t M, N, K; };
  for (Shape sh : {Shape{1, 3, 1}, Shape{3, 5, 7}, Shape{17, 4, 33}}) {
    const auto [M, N, K] = sh;
    CAPTURE(M); CAPTURE(N); CAPTURE(K);
    const Vec G = rand_vec(rng, M * N);
    Vec C(M * N);
    {  // nt: A [M,K], B [N,K]
      Vec A = rand_vec(rng, M * K), B = rand_vec(rng, N * K), dA(M * K), dB(N * K);
      auto L = [&] { matmul_nt(C.data(), A.data(), B.data(), M, N, K, a, false); return dot(G, C); };
      matmul_nn(dA.data(), G.data(), B.data(), M, K, N, a, false);
      matmul_tn(dB.data(), G.data(), A.data(), N, K, M, a, false);
      CHECK_GRAD(dA, numgrad(A, L));
      CHECK_GRAD(dB, numgrad(B, L));
    }
    {  // nn: A [M,K], B [K,N]
      Vec A = rand_vec(rng, M * K), B = rand_vec(rng, K * N), dA(M * K), dB(K * N);
      auto L = [&] { matmul_nn(C.data(), A.data(), B.data(), M, N, K, a, false); return dot(G, C); };
      matmul_nt(dA.data(), G.data(), B.data(), M, K, N, a, false);
      matmul_tn(dB.data(), A.data(), G.data(), K, N, M, a, false);
      CHECK_GRAD(dA, numgrad(A, L));
      CHECK_GRAD(dB, numgrad(B, L));
    }
    {  // tn: A [K,M], B [K,N]
      Vec A = rand_vec(rng, K * M), B = rand_vec(rng, K * N), dA(K * M), dB(K * N);
      auto L = [&] { matmul_tn(C.data(), A.data(), B.data(), M, N, K, a, false); return dot(G, C); };
      matmul_nt(dA.data(), B.data(), G.data(), K, M, N, a, false);
      matmul_nn(dB.data(), A.data(), G.data(), K, N, M, a, false);
      CHECK_GRAD(dA, numgrad(A, L));
      CHECK_GRAD(dB, numgrad(B, L));
    }
  }
}

TEST_CASE("rms_norm_backward matches finite differences (and accumulates)") {
  std::mt19937 rng(22);
  struct Shape { int64_t N, D; double eps; };
  // D = 1 with a large eps: with a tiny eps y = w sign(x) and the gradient (~eps/|x|^3)
  // would be too small to measure by differences.
  for (Shape sh : {Shape{1, 1, 0.5}, Shape{3, 17, 1e-6}, Shape{5, 8, 1e-5}, Shape{2, 33, 0.1}}) {
    const auto [N, D, eps] = sh;
    CAPTURE(N); CAPTURE(D);
    Vec x = rand_vec(rng, N * D, 2.0);
    const Vec w = rand_vec(rng, D), G = rand_vec(rng, N * D);
    Vec y(N * D), rstd(N), dx(N * D);
    auto L = [&] { rms_norm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, eps); return dot(G, y); };
    L();  // fills rstd for the backward
    rms_norm_backward(dx.data(), G.data(), x.data(), w.data(), rstd.data(), N, D, false);
    CHECK_GRAD(dx, numgrad(x, L));

    L();  // numgrad's last call left rstd of a perturbed x: refresh it
    const Vec base = rand_vec(rng, N * D);
    Vec acc = base;
    rms_norm_backward(acc.data(), G.data(), x.data(), w.data(), rstd.data(), N, D, true);
    for (int64_t i = 0; i < N * D; ++i) CHECK(acc[i] == base[i] + dx[i]);
  }
}

TEST_CASE("rope_backward matches finite differences of rope_forward") {
  std::mt19937 rng(23);
  struct Shape { int64_t N, heads, hd; };
  for (Shape sh : {Shape{1, 1, 2}, Shape{17, 3, 8}, Shape{5, 2, 6}}) {
    const auto [N, heads, hd] = sh;
    CAPTURE(N); CAPTURE(hd);
    const Rope t = rope_tables(512, hd);
    std::vector<int32_t> pos(N);
    std::uniform_int_distribution<int32_t> up(0, 511);
    for (auto& p : pos) p = up(rng);
    Vec x = rand_vec(rng, N * heads * hd);
    const Vec G = rand_vec(rng, N * heads * hd);
    Vec y;
    auto L = [&] {
      y = x;
      rope_forward(y.data(), t.cos.data(), t.sin.data(), pos.data(), N, heads, hd);
      return dot(G, y);
    };
    Vec dx = G;
    rope_backward(dx.data(), t.cos.data(), t.sin.data(), pos.data(), N, heads, hd);
    CHECK_GRAD(dx, numgrad(x, L));
  }
}

TEST_CASE("attention_backward matches finite differences for q, k and v") {
  std::mt19937 rng(24);
  struct Cfg { std::vector<int64_t> lens; int64_t Hq, Hkv, d; };
  // Several packed sequences of different lengths (including length 1), GQA groups 2
  // and 1, head_dim 8 and 16.
  for (const Cfg& c : {Cfg{{5, 1, 9, 3}, 4, 2, 8}, Cfg{{7, 12}, 3, 3, 16}, Cfg{{4, 6}, 2, 1, 16},
                       Cfg{{3, 8, 2}, 2, 2, 8}}) {
    CAPTURE(c.Hq); CAPTURE(c.Hkv); CAPTURE(c.d); CAPTURE(c.lens.size());
    std::vector<int64_t> ss{0};
    for (int64_t l : c.lens) ss.push_back(ss.back() + l);
    const int64_t N = ss.back(), S = int64_t(c.lens.size());
    const int64_t qn = N * c.Hq * c.d, kvn = N * c.Hkv * c.d;
    // Scores of O(1) so the softmax is neither uniform nor one-hot.
    Vec q = rand_vec(rng, qn, 1.5), k = rand_vec(rng, kvn, 1.5), v = rand_vec(rng, kvn);
    const Vec G = rand_vec(rng, qn);
    Vec out(qn), lse(N * c.Hq);
    auto L = [&] {
      attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), ss.data(), S,
                        c.Hq, c.Hkv, c.d);
      return dot(G, out);
    };
    L();
    Vec dq(qn, 9.0), dk(kvn, 9.0), dv(kvn, 9.0);  // garbage: backward must overwrite
    attention_backward(dq.data(), dk.data(), dv.data(), G.data(), out.data(), lse.data(),
                       q.data(), k.data(), v.data(), ss.data(), S, c.Hq, c.Hkv, c.d);
    CHECK_GRAD(dq, numgrad(q, L));
    CHECK_GRAD(dk, numgrad(k, L));
    CHECK_GRAD(dv, numgrad(v, L));
  }
}

TEST_CASE("swiglu_backward matches finite differences for gate and up") {
  std::mt19937 rng(25);
  for (int64_t n : {1, 3, 33}) {
    Vec g = rand_vec(rng, n, 5.0), u = rand_vec(rng, n, 2.0);  // gate spans silu's bend
    const Vec G = rand_vec(rng, n);
    Vec h(n), dg(n), du(n);
    auto L = [&] { swiglu_forward(h.data(), g.data(), u.data(), n); return dot(G, h); };
    swiglu_backward(dg.data(), du.data(), G.data(), g.data(), u.data(), n);
    CHECK_GRAD(dg, numgrad(g, L));
    CHECK_GRAD(du, numgrad(u, L));
  }
}

TEST_CASE("cross_entropy dlogits is the gradient of scale * loss, ignored rows included") {
  std::mt19937 rng(26);
  struct Shape { int64_t N, V; };
  for (Shape sh : {Shape{1, 3}, Shape{7, 13}, Shape{4, 33}}) {
    const auto [N, V] = sh;
    CAPTURE(N); CAPTURE(V);
    Vec logits = rand_vec(rng, N * V, 3.0);
    std::vector<int32_t> tgt(N);
    std::uniform_int_distribution<int32_t> ut(0, int32_t(V - 1));
    for (auto& t : tgt) t = ut(rng);
    if (N > 1) tgt[N - 1] = -100;
    if (N > 4) tgt[2] = -100;
    for (const double scale : {1.0, 0.37}) {
      CAPTURE(scale);
      Vec dl(N * V), scratch(N * V);
      cross_entropy_forward_backward(dl.data(), logits.data(), tgt.data(), N, V, scale);
      auto L = [&] {
        return scale * cross_entropy_forward_backward(scratch.data(), logits.data(), tgt.data(), N, V, scale);
      };
      CHECK_GRAD(dl, numgrad(logits, L));
    }
  }
}
