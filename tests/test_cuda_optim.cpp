// CUDA backend, optimizer side against src/train/optimizer.cpp: AdamW steps (with and
// without a device-side clipping scale), the deterministic fp32 sum-of-squares / sum, and
// the clipping coefficient. AdamW does the CPU's fp32 operations in the CPU's order with
// no FMA, so it should agree bit for bit; the check allows 1e-6 relative (a host compiler
// that contracts FMAs would differ by an ulp) and reports how many values are identical.
// The reductions are fp32 against the CPU's double: ~1e-6 relative. Skips without a GPU.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <vector>

#include "cuda_test_util.hpp"
#include "ftune/kernels/cuda_device.hpp"
#include "ftune/kernels/cuda_optim.hpp"
#include "ftune/train/optimizer.hpp"

using namespace ftune::test::cuda;  // REQUIRE_GPU, cu, F

namespace {

F rand_vec(std::mt19937& rng, size_t n, float mag) {
  std::uniform_real_distribution<float> u(0.05f, 1.f);
  std::bernoulli_distribution sign(0.5);
  F v(n);
  for (auto& e : v) e = mag * (sign(rng) ? u(rng) : -u(rng));
  return v;
}

struct Compare {
  double rel = 0;
  size_t identical = 0;
};
Compare compare(const F& got, const F& want) {
  Compare c;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::abs(double(got[i]) - want[i]);
    c.rel = std::max(c.rel, d / (std::abs(double(want[i])) + 1e-30));
    c.identical += std::memcmp(&got[i], &want[i], 4) == 0;
  }
  return c;
}

}  // namespace

TEST_CASE("cuda: adamw steps match the CPU optimizer") {
  REQUIRE_GPU();
  std::mt19937 rng(21);
  const ftune::AdamWHyper h{0.9, 0.999, 1e-8, 0.01};
  for (int64_t n : {7, 100003}) {
    for (double max_norm : {0.0, 1.0}) {  // 0: no clipping; 1: clips (norm ~ sqrt(n)/2)
      F params = rand_vec(rng, n, 1.f);
      ftune::AdamWState st;
      st.resize(n);
      auto dP = cu::to_device(params), dM = cu::to_device(st.m), dV = cu::to_device(st.v);
      cu::DeviceBuffer dG(n * 4), dWs(cu::kReduceWorkspaceFloats * 4), dSS(4), dScale(4);
      for (int step = 1; step <= 3; ++step) {
        F grads = rand_vec(rng, n, 0.1f * step);
        dG.upload(grads.data(), n * 4);
        const double lr = 1e-3 * step;
        const float* scale = nullptr;
        if (max_norm > 0) {
          cu::reduce_sum(dSS.as<float>(), dG.as<float>(), n, true, false, dWs.as<float>(),
                         nullptr);
          cu::clip_scale(dScale.as<float>(), nullptr, dSS.as<float>(), max_norm, nullptr);
          scale = dScale.as<float>();
          ftune::clip_grad_norm(grads, max_norm);
        }
        cu::adamw_step(dP.as<float>(), dG.as<float>(), dM.as<float>(), dV.as<float>(), n,
                       cu::adamw_scalars(step, lr, h.beta1, h.beta2, h.eps, h.weight_decay),
                       scale, nullptr);
        ftune::adamw_step(params, grads, st, lr, h);
      }
      const Compare cp = compare(cu::to_host<float>(dP, n), params),
                    cm = compare(cu::to_host<float>(dM, n), st.m),
                    cv = compare(cu::to_host<float>(dV, n), st.v);
      MESSAGE("adamw n=" << n << " max_norm=" << max_norm << ": params rel " << cp.rel << " ("
                         << cp.identical << "/" << n << " identical), m rel " << cm.rel << " ("
                         << cm.identical << "), v rel " << cv.rel << " (" << cv.identical << ")");
      // With clipping the coefficient comes from an fp32 (GPU) vs double (CPU) norm.
      const double tol = max_norm > 0 ? 1e-5 : 1e-6;
      CHECK(cp.rel < tol);
      CHECK(cm.rel < tol);
      CHECK(cv.rel < tol);
    }
  }
}

TEST_CASE("cuda: deterministic sum of squares, sum and clip scale") {
  REQUIRE_GPU();
  std::mt19937 rng(22);
  // One workspace per stream: reductions in flight on two streams must not share one.
  cu::DeviceBuffer dWs(cu::kReduceWorkspaceFloats * 4), dWs2(cu::kReduceWorkspaceFloats * 4),
      dOut(4 * 4);
  cu::Stream stream;
  for (int64_t n : {1, 1000, (1 << 20) + 7, 50'000'017}) {
    const F g = rand_vec(rng, n, 1e-2f);
    auto dG = cu::to_device(g);
    double ss = 0, sum = 0;
    for (float e : g) {
      ss += double(e) * e;
      sum += e;
    }
    float* out = dOut.as<float>();
    cu::reduce_sum(out, dG.as<float>(), n, true, false, dWs.as<float>(), nullptr);
    cu::reduce_sum(out + 1, dG.as<float>(), n, true, false, dWs2.as<float>(), stream.get());
    cu::reduce_sum(out + 2, dG.as<float>(), n, false, false, dWs.as<float>(), nullptr);
    // accumulate: sumsq of the two halves added into one value.
    cu::reduce_sum(out + 3, dG.as<float>(), n / 2, true, false, dWs.as<float>(), nullptr);
    cu::reduce_sum(out + 3, dG.as<float>() + n / 2, n - n / 2, true, true, dWs.as<float>(),
                   nullptr);
    const F r = cu::to_host<float>(dOut, 4);
    const double e_ss = std::abs(r[0] - ss) / ss;
    // A sum of signed terms cancels: compare against the sum of magnitudes instead.
    double mag = 0;
    for (float e : g) mag += std::abs(e);
    const double e_sum = std::abs(r[2] - sum) / mag;
    MESSAGE("reduce n=" << n << ": sumsq rel " << e_ss << ", sum err/|sum| " << e_sum
                        << ", halves rel " << std::abs(r[3] - ss) / ss);
    CHECK(e_ss < 1e-5);
    CHECK(e_sum < 1e-5);
    CHECK(std::abs(r[3] - ss) / ss < 1e-5);
    CHECK(std::memcmp(&r[0], &r[1], 4) == 0);  // same n -> same bits, any stream

    // Clip scale vs clip_grad_norm's coefficient (max_norm below and above the norm).
    const double norm = std::sqrt(ss);
    for (double max_norm : {0.5 * norm, 2.0 * norm, 0.0}) {
      cu::DeviceBuffer dScale(4), dNorm(4);
      cu::clip_scale(dScale.as<float>(), dNorm.as<float>(), out, max_norm, nullptr);
      const float s = cu::to_host<float>(dScale, 1)[0], nr = cu::to_host<float>(dNorm, 1)[0];
      const double coef = max_norm / (norm + 1e-6);
      const double want = (max_norm > 0 && coef < 1) ? coef : 1.0;
      CHECK(std::abs(nr - norm) / norm < 1e-5);
      CHECK(std::abs(s - want) / want < 1e-5);
    }
  }
}

TEST_CASE("cuda: sum_of_squares_blocks + sum_in_order = the host's sum_of_squares, bit for bit") {
  REQUIRE_GPU();
  std::mt19937 rng(23);
  const int64_t block = static_cast<int64_t>(ftune::kSumOfSquaresBlock);
  for (int64_t n : {int64_t{1}, block - 1, block, 3 * block + 12345, int64_t{20'000'003}}) {
    CAPTURE(n);
    const F g = rand_vec(rng, static_cast<size_t>(n), 3e-2f);
    auto dG = cu::to_device(g);
    const int64_t blocks = (n + block - 1) / block;
    cu::DeviceBuffer dSums(static_cast<size_t>(blocks) * sizeof(double));
    cu::sum_of_squares_blocks(dSums.as<double>(), dG.as<float>(), n, block, nullptr);
    const std::vector<double> sums = cu::to_host<double>(dSums, static_cast<size_t>(blocks));
    const double gpu = ftune::sum_in_order(sums), host = ftune::sum_of_squares(g);
    MESSAGE("n=" << n << ": gpu " << gpu << " host " << host);
    CHECK(std::memcmp(&gpu, &host, sizeof(double)) == 0);
  }
}

// add_into over lengths past one grid's reach (4096 blocks x 256 threads = 1,048,576): a
// ZeRO-3 layer block's gradient is tens of millions of values.
TEST_CASE("cuda: add_into adds every element, also past the capped grid") {
  REQUIRE_GPU();
  std::mt19937 rng(31);
  for (int64_t n : {int64_t{1}, int64_t{1000}, int64_t{1'048'577}, int64_t{5'000'011}}) {
    CAPTURE(n);
    const F x = rand_vec(rng, static_cast<size_t>(n), 1.f), y = rand_vec(rng, static_cast<size_t>(n), 1.f);
    auto dX = cu::to_device(x), dY = cu::to_device(y);
    cu::add_into(dY.as<float>(), dX.as<float>(), n, nullptr);
    const F got = cu::to_host<float>(dY, static_cast<size_t>(n));
    size_t wrong = 0;
    for (size_t i = 0; i < got.size(); ++i) wrong += got[i] != y[i] + x[i];
    CHECK(wrong == 0);
  }
}
