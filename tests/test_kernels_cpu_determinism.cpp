// CPU reference ops: (1) the float instantiation (what the engine runs) agrees with the
// double one to ~float precision; (2) results are bit-identical whatever the OpenMP
// thread count, as cpu_ops.hpp promises (each output element is computed by one thread
// in a fixed order), which training reproducibility relies on.
#include <doctest/doctest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "ftune/kernels/cpu_ops.hpp"

using namespace ftune::cpu;

namespace {

// Values with magnitude in [0.05, 1] * mag, random sign, exactly representable in float
// so both instantiations see identical inputs.
std::vector<float> rand_f(std::mt19937& rng, size_t n, float mag = 1.0f) {
  std::uniform_real_distribution<float> u(0.05f, 1.0f);
  std::bernoulli_distribution sign(0.5);
  std::vector<float> v(n);
  for (auto& e : v) e = mag * (sign(rng) ? u(rng) : -u(rng));
  return v;
}

// max|f - d| / max|d|. Elementwise relative error is unbounded where a result cancels to
// ~0 (a dot product, a gradient component), so the error is scaled by the largest value.
double rel_err(const std::vector<float>& f, const std::vector<double>& d) {
  REQUIRE(f.size() == d.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < f.size(); ++i) {
    num = std::max(num, std::abs(double(f[i]) - d[i]));
    den = std::max(den, std::abs(d[i]));
  }
  return num / den;
}

// float epsilon is 6e-8; sums of tens of terms and exp/log stay well below 1e-5.
constexpr double kFloatTol = 1e-5;

std::vector<float> rope_cos, rope_sin;
void make_rope(int64_t max_pos, int64_t hd) {
  const int64_t half = hd / 2;
  rope_cos.resize(max_pos * half);
  rope_sin.resize(max_pos * half);
  for (int64_t p = 0; p < max_pos; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double a = p * std::pow(10000.0, -2.0 * i / hd);
      rope_cos[p * half + i] = float(std::cos(a));
      rope_sin[p * half + i] = float(std::sin(a));
    }
}

// One problem instance per op, run in scalar type T; every output is appended to `outs`
// so a single routine serves both the float/double and the thread-count comparisons.
struct Problem {
  int64_t M = 37, N = 29, K = 45;           // matmuls (ragged)
  int64_t R = 33, D = 70;                   // rms_norm rows x dim
  int64_t T = 41, heads = 4, hd = 16;       // rope tokens
  std::vector<int64_t> ss{0, 13, 14, 41, 64};  // attention: packed lengths 13, 1, 27, 23
  int64_t Hq = 4, Hkv = 2, d = 16;
  int64_t CN = 19, CV = 301;                // cross-entropy
  int64_t E = 5003;                         // swiglu / dropout elements
  std::vector<float> A, B, C0, x, w, G, rx, q, k, v, dout, gate, up, dh, logits;
  std::vector<int32_t> pos, tgt;

  explicit Problem(uint32_t seed) {
    std::mt19937 rng(seed);
    A = rand_f(rng, M * K); B = rand_f(rng, K * N); C0 = rand_f(rng, M * N);
    x = rand_f(rng, R * D, 3.f); w = rand_f(rng, D); G = rand_f(rng, R * D);
    rx = rand_f(rng, T * heads * hd);
    pos.resize(T);
    for (int64_t t = 0; t < T; ++t) pos[t] = int32_t(t * 37 % 1000);
    const int64_t Na = ss.back();
    q = rand_f(rng, Na * Hq * d, 1.5f); k = rand_f(rng, Na * Hkv * d, 1.5f);
    v = rand_f(rng, Na * Hkv * d); dout = rand_f(rng, Na * Hq * d);
    gate = rand_f(rng, E, 6.f); up = rand_f(rng, E, 2.f); dh = rand_f(rng, E);
    logits = rand_f(rng, CN * CV, 5.f);
    tgt.resize(CN);
    for (int64_t n = 0; n < CN; ++n) tgt[n] = n % 5 == 3 ? -100 : int32_t(n * 53 % CV);
  }

  template <typename T_>
  std::vector<std::vector<T_>> run() const {
    auto cv = [](const std::vector<float>& f) { return std::vector<T_>(f.begin(), f.end()); };
    std::vector<std::vector<T_>> outs;
    const auto a = cv(A), b = cv(B);
    for (int op = 0; op < 3; ++op) {  // A (M*K values) read as [M,K] or [K,M]; B as [N,K] or [K,N]
      auto c = cv(C0);
      if (op == 0) matmul_nt(c.data(), a.data(), b.data(), M, N, K, T_(0.5), true);
      if (op == 1) matmul_nn(c.data(), a.data(), b.data(), M, N, K, T_(-1.25), true);
      if (op == 2) matmul_tn(c.data(), a.data(), b.data(), M, N, K, T_(1), false);
      outs.push_back(c);
    }
    {
      const auto xx = cv(x), ww = cv(w), gg = cv(G);
      std::vector<T_> y(R * D), rstd(R), dx(R * D);
      rms_norm_forward(y.data(), rstd.data(), xx.data(), ww.data(), R, D, 1e-5);
      rms_norm_backward(dx.data(), gg.data(), xx.data(), ww.data(), rstd.data(), R, D, false);
      outs.insert(outs.end(), {y, rstd, dx});
    }
    {
      auto y = cv(rx);
      rope_forward(y.data(), rope_cos.data(), rope_sin.data(), pos.data(), T, heads, hd);
      auto g = y;
      rope_backward(g.data(), rope_cos.data(), rope_sin.data(), pos.data(), T, heads, hd);
      outs.insert(outs.end(), {y, g});
    }
    {
      const int64_t Na = ss.back(), S = int64_t(ss.size()) - 1;
      const auto qq = cv(q), kk = cv(k), vv = cv(v), dd = cv(dout);
      std::vector<T_> o(Na * Hq * d), lse(Na * Hq), dq(o.size()), dk(kk.size()), dv(vv.size());
      attention_forward(o.data(), lse.data(), qq.data(), kk.data(), vv.data(), ss.data(), S, Hq, Hkv, d);
      attention_backward(dq.data(), dk.data(), dv.data(), dd.data(), o.data(), lse.data(),
                         qq.data(), kk.data(), vv.data(), ss.data(), S, Hq, Hkv, d);
      outs.insert(outs.end(), {o, lse, dq, dk, dv});
    }
    {
      const auto gg = cv(gate), uu = cv(up), hh = cv(dh);
      std::vector<T_> h(E), dg(E), du(E), dr(E);
      swiglu_forward(h.data(), gg.data(), uu.data(), E);
      swiglu_backward(dg.data(), du.data(), hh.data(), gg.data(), uu.data(), E);
      dropout_apply(dr.data(), hh.data(), E, 0.25, 99, false);
      outs.insert(outs.end(), {h, dg, du, dr});
    }
    {
      const auto ll = cv(logits);
      std::vector<T_> dl(CN * CV);
      const double loss = cross_entropy_forward_backward(dl.data(), ll.data(), tgt.data(), CN, CV, T_(1.0 / 15));
      outs.insert(outs.end(), {dl, std::vector<T_>{T_(loss)}});
    }
    return outs;
  }
};

const char* kNames[] = {"matmul_nt", "matmul_nn", "matmul_tn", "rms_norm y", "rms_norm rstd",
                        "rms_norm dx", "rope fwd", "rope bwd", "attn out", "attn lse",
                        "attn dq", "attn dk", "attn dv", "swiglu h", "swiglu dgate",
                        "swiglu dup", "dropout", "xent dlogits", "xent loss"};

// Restores the thread count on scope exit so other test cases are unaffected.
struct ThreadGuard {
  int saved = omp_get_max_threads();
  ~ThreadGuard() { omp_set_num_threads(saved); }
};

}  // namespace

TEST_CASE("float results agree with double to ~1e-5 relative for every op") {
  make_rope(1000, 16);
  const Problem p(31);
  const auto f = p.run<float>();
  const auto d = p.run<double>();
  REQUIRE(f.size() == std::size(kNames));
  for (size_t i = 0; i < f.size(); ++i) {
    CAPTURE(kNames[i]);
    const double e = rel_err(f[i], d[i]);
    CHECK_MESSAGE(e < kFloatTol, kNames[i], " float vs double rel err ", e);
  }
}

TEST_CASE("results are bit-identical with 1, 2 and 3 OpenMP threads") {
  make_rope(1000, 16);
  ThreadGuard guard;
  const Problem p(32);
  omp_set_num_threads(1);
  const auto f1 = p.run<float>();
  const auto d1 = p.run<double>();
  for (int threads : {2, 3}) {  // 3 on 2 cores: uneven static chunks, oversubscribed
    CAPTURE(threads);
    omp_set_num_threads(threads);
    int seen = 0;
#pragma omp parallel
    {
#pragma omp single
      seen = omp_get_num_threads();
    }
    REQUIRE(seen == threads);  // otherwise the comparison would prove nothing
    const auto fn = p.run<float>();
    const auto dn = p.run<double>();
    for (size_t i = 0; i < f1.size(); ++i) {
      CAPTURE(kNames[i]);
      CHECK(std::memcmp(f1[i].data(), fn[i].data(), f1[i].size() * sizeof(float)) == 0);
      CHECK(std::memcmp(d1[i].data(), dn[i].data(), d1[i].size() * sizeof(double)) == 0);
    }
  }
}
