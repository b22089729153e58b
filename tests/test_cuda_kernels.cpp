// CUDA backend, pointwise/row-wise kernels against their CPU twins (cpu_ops.hpp) run in
// fp32 on the same bf16-rounded inputs, on several shapes (ragged sizes that take the
// scalar paths, multiples of 8 that take the 16-byte paths). Inputs have no zeros.
// Tolerance: each GPU output is rounded to bf16 once (relative error <= 2^-9 ~ 2e-3) and
// the fp32 math differs from the CPU's only in summation order (~1e-6), so an error of
// |got - want| / (|want| + rms(want)) <= 1e-2 leaves 5x headroom over the rounding alone.
// Exact where the math is (gather, add, dropout's mask and values). Skips without a GPU.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "ftune/kernels/cpu_ops.hpp"
#include "ftune/kernels/cuda_device.hpp"
#include "ftune/kernels/cuda_ops.hpp"

#include "cuda_test_util.hpp"

using namespace ftune::test::cuda;
namespace cpu = ftune::cpu;

TEST_CASE("cuda: device present") {
  REQUIRE_GPU();
  MESSAGE("devices: " << cu::cuda_device_count() << ", device 0: " << cu::device_description(0));
}

TEST_CASE("cuda: embedding gather") {
  REQUIRE_GPU();
  std::mt19937 rng(1);
  const int64_t vocab = 1000, N = 33;
  for (int64_t D : {8, 17, 4096}) {
    const F table = rand_bf16(rng, vocab * D);
    std::vector<int32_t> ids(N);
    std::uniform_int_distribution<int32_t> pick(0, vocab - 1);
    for (auto& id : ids) id = pick(rng);
    ids[3] = -1;           // out of range: zero row
    ids[5] = int32_t(vocab);
    auto dt = up(table), di = cu::to_device(ids), dout = cu::DeviceBuffer(N * D * 2);
    cu::embedding_forward(dout.as<cu::bf16>(), dt.as<cu::bf16>(), di.as<int32_t>(), N, D, vocab,
                          nullptr);
    const F got = down(dout, N * D);
    F want(N * D, 0.f);
    for (int64_t n = 0; n < N; ++n)
      if (ids[n] >= 0 && ids[n] < vocab)
        std::copy_n(table.begin() + ids[n] * D, D, want.begin() + n * D);
    CHECK(mismatches(got, want) == 0);
  }
}

TEST_CASE("cuda: rms_norm forward and backward vs cpu") {
  REQUIRE_GPU();
  std::mt19937 rng(2);
  const float eps = 1e-5f;
  struct S { int64_t N, D; };
  for (S s : {S{1, 8}, S{3, 17}, S{17, 1000}, S{9, 2050}, S{64, 4096}, S{5, 4104}}) {
    const F x = rand_bf16(rng, s.N * s.D, 2.f), w = rand_bf16(rng, s.D),
            dy = rand_bf16(rng, s.N * s.D), dx0 = rand_bf16(rng, s.N * s.D);
    F y_ref(s.N * s.D), rstd_ref(s.N), dx_ref(s.N * s.D), dxa_ref = dx0;
    cpu::rms_norm_forward(y_ref.data(), rstd_ref.data(), x.data(), w.data(), s.N, s.D, eps);
    cpu::rms_norm_backward(dx_ref.data(), dy.data(), x.data(), w.data(), rstd_ref.data(), s.N,
                           s.D, false);
    cpu::rms_norm_backward(dxa_ref.data(), dy.data(), x.data(), w.data(), rstd_ref.data(), s.N,
                           s.D, true);

    auto dX = up(x), dW = up(w), dDY = up(dy), dDX = up(dx0), dDXA = up(dx0);
    cu::DeviceBuffer dY(s.N * s.D * 2), dR(s.N * 4);
    cu::rms_norm_forward(dY.as<cu::bf16>(), dR.as<float>(), dX.as<cu::bf16>(), dW.as<cu::bf16>(),
                         s.N, s.D, eps, nullptr);
    cu::rms_norm_backward(dDX.as<cu::bf16>(), dDY.as<cu::bf16>(), dX.as<cu::bf16>(),
                          dW.as<cu::bf16>(), dR.as<float>(), s.N, s.D, false, nullptr);
    cu::rms_norm_backward(dDXA.as<cu::bf16>(), dDY.as<cu::bf16>(), dX.as<cu::bf16>(),
                          dW.as<cu::bf16>(), dR.as<float>(), s.N, s.D, true, nullptr);
    const F rstd = cu::to_host<float>(dR, s.N);
    double er = 0;
    for (int64_t n = 0; n < s.N; ++n)
      er = std::max(er, std::abs(double(rstd[n]) - rstd_ref[n]) / rstd_ref[n]);
    const double ey = err(down(dY, s.N * s.D), y_ref), edx = err(down(dDX, s.N * s.D), dx_ref),
                 edxa = err(down(dDXA, s.N * s.D), dxa_ref);
    MESSAGE("rms_norm N=" << s.N << " D=" << s.D << ": y " << ey << ", rstd " << er << ", dx "
                          << edx << ", dx+= " << edxa);
    CHECK(er < 1e-5);
    CHECK(ey < kTol);
    CHECK(edx < kTol);
    CHECK(edxa < kTol);
  }
}

TEST_CASE("cuda: rope forward and backward vs cpu") {
  REQUIRE_GPU();
  std::mt19937 rng(3);
  struct S { int64_t N, heads, hd; };
  for (S s : {S{7, 3, 8}, S{5, 2, 6}, S{33, 4, 64}, S{129, 8, 128}}) {
    const int64_t half = s.hd / 2, max_pos = 300;
    F cs(max_pos * half), sn(max_pos * half);
    for (int64_t p = 0; p < max_pos; ++p)
      for (int64_t i = 0; i < half; ++i) {
        const double a = p * std::pow(500000.0, -2.0 * i / s.hd);
        cs[p * half + i] = float(std::cos(a));
        sn[p * half + i] = float(std::sin(a));
      }
    std::vector<int32_t> pos(s.N);
    std::uniform_int_distribution<int32_t> pick(0, max_pos - 1);
    for (auto& p : pos) p = pick(rng);
    const F x = rand_bf16(rng, s.N * s.heads * s.hd, 3.f);
    F fwd_ref = x, bwd_ref = x;
    cpu::rope_forward(fwd_ref.data(), cs.data(), sn.data(), pos.data(), s.N, s.heads, s.hd);
    cpu::rope_backward(bwd_ref.data(), cs.data(), sn.data(), pos.data(), s.N, s.heads, s.hd);
    auto dC = cu::to_device(cs), dS = cu::to_device(sn), dP = cu::to_device(pos);
    auto dF = up(x), dB = up(x);
    cu::rope_forward(dF.as<cu::bf16>(), dC.as<float>(), dS.as<float>(), dP.as<int32_t>(), s.N,
                     s.heads, s.hd, nullptr);
    cu::rope_backward(dB.as<cu::bf16>(), dC.as<float>(), dS.as<float>(), dP.as<int32_t>(), s.N,
                      s.heads, s.hd, nullptr);
    const F f = down(dF, x.size()), b = down(dB, x.size());
    // Same fp32 operations as the CPU (no FMA), so the bf16 results should match exactly.
    MESSAGE("rope N=" << s.N << " heads=" << s.heads << " hd=" << s.hd << ": fwd "
                      << err(f, fwd_ref) << " (" << mismatches(f, rounded(fwd_ref))
                      << " bf16 mismatches), bwd " << err(b, bwd_ref) << " ("
                      << mismatches(b, rounded(bwd_ref)) << ")");
    CHECK(err(f, fwd_ref) < kTol);
    CHECK(err(b, bwd_ref) < kTol);
    // backward(forward(x)) ~ x up to two bf16 roundings.
    cu::rope_backward(dF.as<cu::bf16>(), dC.as<float>(), dS.as<float>(), dP.as<int32_t>(), s.N,
                      s.heads, s.hd, nullptr);
    CHECK(err(down(dF, x.size()), x) < kTol);
  }
}

TEST_CASE("cuda: swiglu and residual add vs cpu") {
  REQUIRE_GPU();
  std::mt19937 rng(4);
  for (int64_t n : {1, 7, 1000, 100003}) {
    // offset 1: the same data one element off 16-byte alignment (scalar path).
    for (int64_t off : {0, 1}) {
      const F g = rand_bf16(rng, n + off, 6.f), u = rand_bf16(rng, n + off),
              dh = rand_bf16(rng, n + off);
      auto dG = up(g), dU = up(u), dDH = up(dh);
      cu::DeviceBuffer dHo((n + off) * 2), dDG((n + off) * 2), dDU((n + off) * 2);
      auto at = [&](cu::DeviceBuffer& b) { return b.as<cu::bf16>() + off; };
      cu::swiglu_forward(at(dHo), at(dG), at(dU), n, nullptr);
      cu::swiglu_backward(at(dDG), at(dDU), at(dDH), at(dG), at(dU), n, nullptr);
      F h_ref(n), dg_ref(n), du_ref(n);
      cpu::swiglu_forward(h_ref.data(), g.data() + off, u.data() + off, n);
      cpu::swiglu_backward(dg_ref.data(), du_ref.data(), dh.data() + off, g.data() + off,
                           u.data() + off, n);
      auto tail = [&](const cu::DeviceBuffer& b) {
        F v = down(b, n + off);
        return F(v.begin() + off, v.end());
      };
      const double eh = err(tail(dHo), h_ref), eg = err(tail(dDG), dg_ref),
                   eu = err(tail(dDU), du_ref);
      MESSAGE("swiglu n=" << n << " off=" << off << ": h " << eh << ", dgate " << eg << ", dup "
                          << eu);
      CHECK(eh < kTol);
      CHECK(eg < kTol);
      CHECK(eu < kTol);

      // residual add in place (out aliases a): one fp32 add, one rounding -> exact.
      F sum_ref(n);
      for (int64_t i = 0; i < n; ++i) sum_ref[i] = rbf(g[off + i] + u[off + i]);
      cu::residual_add(at(dG), at(dG), at(dU), n, nullptr);
      CHECK(mismatches(tail(dG), sum_ref) == 0);
    }
  }
}

TEST_CASE("cuda: dropout mask is bit-identical to cpu::dropout_keep") {
  REQUIRE_GPU();
  std::mt19937 rng(5);
  for (int64_t n : {1, 13, 100003, 1 << 20}) {
    const F x = rand_bf16(rng, n), y0 = rand_bf16(rng, n);
    auto dX = up(x);
    for (double p : {0.0, 0.05, 0.1, 0.5, 0.9}) {
      for (uint64_t seed : {uint64_t(0), uint64_t(42), uint64_t(0x9E3779B97F4A7C15ull)}) {
        F ref(n), refa = y0;
        cpu::dropout_apply(ref.data(), x.data(), n, p, seed, false);
        cpu::dropout_apply(refa.data(), x.data(), n, p, seed, true);
        cu::DeviceBuffer dY(n * 2);
        auto dYA = up(y0);
        cu::dropout_apply(dY.as<cu::bf16>(), dX.as<cu::bf16>(), n, p, seed, false, nullptr);
        cu::dropout_apply(dYA.as<cu::bf16>(), dX.as<cu::bf16>(), n, p, seed, true, nullptr);
        const F y = down(dY, n), ya = down(dYA, n);
        // The mask itself: x has no zeros, so y == 0 exactly where the CPU drops.
        size_t mask_diff = 0, kept = 0;
        for (int64_t i = 0; i < n; ++i) {
          const bool keep = p <= 0 || cpu::dropout_keep(seed, uint64_t(i), p);
          kept += keep;
          mask_diff += keep != (y[i] != 0.f);
        }
        CHECK(mask_diff == 0);
        CHECK(mismatches(y, rounded(ref)) == 0);  // x * scale: one fp32 multiply, one rounding
        CHECK(mismatches(ya, rounded(refa)) == 0);
        if (n == (1 << 20) && seed == 42)
          MESSAGE("dropout n=" << n << " p=" << p << ": kept " << double(kept) / n
                               << ", mask mismatches " << mask_diff);
      }
    }
  }
}

TEST_CASE("cuda: cross-entropy forward+backward vs cpu") {
  REQUIRE_GPU();
  std::mt19937 rng(6);
  struct S { int64_t N, V; };
  for (S s : {S{5, 17}, S{33, 1000}, S{64, 32000}, S{7, 50257}, S{256, 128256}}) {
    const F logits = rand_bf16(rng, s.N * s.V, 8.f);
    std::vector<int32_t> t(s.N);
    std::uniform_int_distribution<int32_t> pick(0, int32_t(s.V - 1));
    int64_t valid = 0;
    for (int64_t n = 0; n < s.N; ++n) {
      t[n] = n % 8 == 3 ? -100 : pick(rng);
      valid += t[n] >= 0;
    }
    const float scale = 1.f / float(std::max<int64_t>(1, valid));
    F dl_ref(s.N * s.V), loss_ref(s.N);
    for (int64_t n = 0; n < s.N; ++n)  // row by row: the CPU op returns only the sum
      loss_ref[n] = float(cpu::cross_entropy_forward_backward(
          dl_ref.data() + n * s.V, logits.data() + n * s.V, &t[n], 1, s.V, scale));

    auto dL = up(logits), dT = cu::to_device(t);
    cu::DeviceBuffer dDL(s.N * s.V * 2), dLoss(s.N * 4);
    cu::cross_entropy_forward_backward(dDL.as<cu::bf16>(), dLoss.as<float>(), dL.as<cu::bf16>(),
                                       dT.as<int32_t>(), s.N, s.V, scale, nullptr);
    const F loss = cu::to_host<float>(dLoss, s.N), dl = down(dDL, s.N * s.V);
    // Row losses against a double log-sum-exp: the CPU twin sums V exps serially in fp32
    // (error ~sqrt(V) * 6e-8, 1.5e-5 seen at V = 128k), the GPU per thread then by tree.
    double el = 0, el_cpu = 0;
    for (int64_t n = 0; n < s.N; ++n) {
      if (t[n] < 0) continue;
      const float* l = logits.data() + n * s.V;
      const double mx = *std::max_element(l, l + s.V);
      double sum = 0;
      for (int64_t i = 0; i < s.V; ++i) sum += std::exp(double(l[i]) - mx);
      const double want = mx + std::log(sum) - l[t[n]];
      el = std::max(el, std::abs(loss[n] - want) / (1.0 + want));
      el_cpu = std::max(el_cpu, std::abs(loss_ref[n] - want) / (1.0 + want));
    }
    const double ed = err(dl, dl_ref);
    MESSAGE("cross-entropy N=" << s.N << " V=" << s.V << ": loss " << el << " (cpu twin "
                               << el_cpu << "), dlogits " << ed);
    CHECK(el < 1e-5);
    CHECK(ed < kTol);
    for (int64_t n = 0; n < s.N; ++n)
      if (t[n] < 0) CHECK(loss[n] == 0.f);

    // In place (dlogits aliases logits): the very same values. Timed: it reads the row
    // twice and writes it once (3 x 2 bytes per logit).
    cu::Event e0, e1;
    e0.record();
    cu::cross_entropy_forward_backward(dL.as<cu::bf16>(), dLoss.as<float>(), dL.as<cu::bf16>(),
                                       dT.as<int32_t>(), s.N, s.V, scale, nullptr);
    e1.record();
    e1.synchronize();
    const double ms = e1.elapsed_ms_since(e0);
    if (s.V > 100000)
      MESSAGE("cross-entropy N=" << s.N << " V=" << s.V << " in place: " << ms << " ms, "
                                 << 3.0 * s.N * s.V * 2 / (ms * 1e-3) / 1e9 << " GB/s");
    CHECK(mismatches(down(dL, s.N * s.V), dl) == 0);
    CHECK(mismatches(cu::to_host<float>(dLoss, s.N), loss) == 0);
  }
}

TEST_CASE("cuda: cross-entropy throughput at a realistic chunk (print only)") {
  REQUIRE_GPU();
  const int64_t N = 2048, V = 128256;  // one chunk of Llama-3-vocabulary logits
  std::vector<cu::bf16> logits(N * V);
  uint64_t z = 12345;
  for (auto& b : logits) {  // cheap LCG: values in [-8, 8)
    z = z * 6364136223846793005ull + 1442695040888963407ull;
    b = cu::to_bf16(float(z >> 40) / float(1 << 24) * 16.f - 8.f);
  }
  std::vector<int32_t> t(N);
  for (int64_t n = 0; n < N; ++n) t[n] = int32_t((n * 7919) % V);
  auto dL = cu::to_device(logits), dT = cu::to_device(t);
  cu::DeviceBuffer dLoss(N * 4);
  cu::Event e0, e1;
  float best = 1e30f;
  for (int rep = 0; rep < 4; ++rep) {  // in place, as the engine will call it
    e0.record();
    cu::cross_entropy_forward_backward(dL.as<cu::bf16>(), dLoss.as<float>(), dL.as<cu::bf16>(),
                                       dT.as<int32_t>(), N, V, 1.f / N, nullptr);
    e1.record();
    e1.synchronize();
    best = std::min(best, e1.elapsed_ms_since(e0));
  }
  MESSAGE("cross-entropy N=" << N << " V=" << V << " in place: " << best << " ms, "
                             << 3.0 * N * V * 2 / (best * 1e-3) / 1e9
                             << " GB/s (2 reads + 1 write of the bf16 logits)");
  CHECK(std::isfinite(cu::to_host<float>(dLoss, 1)[0]));
}
