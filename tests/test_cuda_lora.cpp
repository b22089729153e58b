// The fused LoRA kernels (dropout applied on the fly, and the forward's up product) against
// their CPU twin: the explicit cpu::dropout_apply followed by the CPU matmuls, in fp32 on the same bf16 inputs. Shapes
// include ragged row counts, in not a multiple of the kernels' tiles, ranks 1..16, and
// p = 0 / 0.05 / 0.5. Tolerance as in test_cuda_kernels.cpp (one bf16 rounding of outputs,
// fp32 sums in another order); dA is fp32 throughout, so it gets 1e-4. Skips without a GPU.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "cuda_test_util.hpp"
#include "ftune/kernels/cpu_ops.hpp"
#include "ftune/kernels/cuda_lora.hpp"
#include "ftune/kernels/cuda_ops.hpp"

using namespace ftune::test::cuda;
namespace cpu = ftune::cpu;

TEST_CASE("cuda: fused LoRA down/up products with dropout vs cpu") {
  REQUIRE_GPU();
  std::mt19937 rng(17);
  struct Shape { int64_t N, in, r; };
  // Ragged sizes around the kernels' tiles: rows per block (32 / 64), row chunks (128),
  // staged columns (1024) and unrolled rows (4 / 8).
  for (const Shape sh : {Shape{1, 8, 1}, Shape{37, 136, 4}, Shape{300, 1032, 8},
                         Shape{513, 264, 13}, Shape{1000, 2056, 16}, Shape{131, 3080, 8},
                         Shape{259, 1024, 16}, Shape{4096, 4096, 8}}) {
    const auto [N, in, r] = sh;
    CHECK(cu::lora_fused_supported(r, in, nullptr, nullptr));
    const F x = rand_bf16(rng, N * in), A = rand_bf16(rng, r * in, 0.05f);
    const F du = rand_bf16(rng, N * r), dx0 = rand_bf16(rng, N * in);
    const F dA0 = rand_bf16(rng, r * in);
    auto dX = up(x), dAw = up(A), dDu = up(du);
    for (double p : {0.0, 0.05, 0.5}) {
      const uint64_t seed = 1234567 + static_cast<uint64_t>(p * 100);
      // CPU twin: xm = dropout(x); u = xm A^T; dA += du^T xm; dx += dropout(du A).
      F xm(N * in), u_ref(N * r), dA_ref = dA0, t(N * in), dx_ref = dx0;
      cpu::dropout_apply(xm.data(), x.data(), N * in, p, seed, false);
      cpu::matmul_nt(u_ref.data(), xm.data(), A.data(), N, r, in, 1.f, false);
      cpu::matmul_tn(dA_ref.data(), du.data(), xm.data(), r, in, N, 1.f, true);
      cpu::matmul_nn(t.data(), du.data(), A.data(), N, in, r, 1.f, false);
      cpu::dropout_apply(dx_ref.data(), t.data(), N * in, p, seed, true);

      cu::DeviceBuffer dU(N * r * 2);
      cu::lora_down_forward(dU.as<cu::bf16>(), dX.as<cu::bf16>(), dAw.as<cu::bf16>(), N, in, r, p,
                            seed, nullptr);
      cu::DeviceBuffer ws(cu::lora_down_backward_workspace(N, in, r) * sizeof(float));
      auto dGA = cu::to_device(dA0);
      cu::lora_down_backward(dGA.as<float>(), dDu.as<cu::bf16>(), dX.as<cu::bf16>(), N, in, r, p,
                             seed, 1.f, ws.as<float>(), nullptr);
      auto dDx = up(dx0);
      cu::lora_dx_backward(dDx.as<cu::bf16>(), dDu.as<cu::bf16>(), dAw.as<cu::bf16>(), N, in, r,
                           p, seed, nullptr);
      // The forward's LoRA term: y += scale u B^T, B [in, r] (in plays the output width).
      const F B = rand_bf16(rng, in * r, 0.05f), y0 = rand_bf16(rng, N * in);
      F y_ref = y0;
      cpu::matmul_nt(t.data(), du.data(), B.data(), N, in, r, 1.f, false);
      for (int64_t i = 0; i < N * in; ++i) y_ref[i] += 0.75f * t[i];
      auto dY = up(y0), dB = up(B);
      cu::lora_up_forward(dY.as<cu::bf16>(), dDu.as<cu::bf16>(), dB.as<cu::bf16>(), N, in, r,
                          0.75f, nullptr);
      const double ey = err(down(dY, N * in), y_ref);
      CHECK(ey < kTol);
      const double eu = err(down(dU, N * r), u_ref);
      const double ea = err(cu::to_host<float>(dGA, r * in), dA_ref);
      const double ex = err(down(dDx, N * in), dx_ref);
      INFO("N=" << N << " in=" << in << " r=" << r << " p=" << p);
      CHECK(eu < kTol);
      CHECK(ea < 1e-4);
      CHECK(ex < kTol);
      if (N == 4096 && p > 0 && p < 0.1)
        MESSAGE("fused LoRA 4096x4096 r8 p=0.05: u err " << eu << ", dA err " << ea << ", dx err " << ex);
    }
  }
}

TEST_CASE("cuda: fused LoRA kernels refuse what they do not support") {
  CHECK_FALSE(ftune::cuda::lora_fused_supported(17, 64, nullptr, nullptr));
  CHECK_FALSE(ftune::cuda::lora_fused_supported(8, 12, nullptr, nullptr));
  CHECK_FALSE(ftune::cuda::lora_fused_supported(8, 64, reinterpret_cast<void*>(2), nullptr));
  REQUIRE_GPU();
  // A misaligned [N, r] operand is refused by the launch, not read wrongly.
  cu::DeviceBuffer y(64 * 8 * 2 + 16), u(64 * 8 * 2 + 16), B(64 * 8 * 2);
  CHECK_THROWS_AS(cu::lora_up_forward(y.as<cu::bf16>(), u.as<cu::bf16>() + 1, B.as<cu::bf16>(),
                                      8, 64, 8, 1.f, nullptr),
                  cu::CudaError);
}

// lora_swiglu_forward against its twin: gate/up + scale u B^T rounded to bf16 once (as
// lora_up_forward writes them), then h = silu(gate) up rounded once (as swiglu_forward).
TEST_CASE("cuda: gate/up LoRA terms fused with SwiGLU vs cpu") {
  REQUIRE_GPU();
  std::mt19937 rng(29);
  struct Shape { int64_t N, I, r; };
  for (const Shape sh : {Shape{1, 8, 1}, Shape{33, 200, 3}, Shape{70, 1032, 8},
                         Shape{1000, 2048, 8}}) {
    const auto [N, I, r] = sh;
    const float scale = 2.f;
    const F g0 = rand_bf16(rng, N * I), u0 = rand_bf16(rng, N * I);
    const F ug = rand_bf16(rng, N * r), uu = rand_bf16(rng, N * r);
    const F Bg = rand_bf16(rng, I * r, 0.1f), Bu = rand_bf16(rng, I * r, 0.1f);
    F tg(N * I), tu(N * I), g_ref(N * I), u_ref(N * I), h_ref(N * I);
    cpu::matmul_nt(tg.data(), ug.data(), Bg.data(), N, I, r, 1.f, false);
    cpu::matmul_nt(tu.data(), uu.data(), Bu.data(), N, I, r, 1.f, false);
    for (int64_t i = 0; i < N * I; ++i) {
      g_ref[i] = rbf(g0[i] + scale * tg[i]);
      u_ref[i] = rbf(u0[i] + scale * tu[i]);
      h_ref[i] = g_ref[i] / (1.f + std::exp(-g_ref[i])) * u_ref[i];
    }
    REQUIRE(cu::lora_swiglu_supported(r, I, nullptr, nullptr, nullptr, nullptr, nullptr));
    auto dG = up(g0), dU = up(u0), dH = up(F(N * I, 123.f)), dUg = up(ug), dUu = up(uu);
    auto dBg = up(Bg), dBu = up(Bu);
    cu::lora_swiglu_forward(dH.as<cu::bf16>(), dG.as<cu::bf16>(), dU.as<cu::bf16>(),
                            dUg.as<cu::bf16>(), dUu.as<cu::bf16>(), dBg.as<cu::bf16>(),
                            dBu.as<cu::bf16>(), N, I, r, scale, nullptr);
    INFO("N=" << N << " I=" << I << " r=" << r);
    CHECK(err(down(dG, N * I), g_ref) < kTol);
    CHECK(err(down(dU, N * I), u_ref) < kTol);
    CHECK(err(down(dH, N * I), h_ref) < kTol);
    // keep_gate_up = false: the same h, gate and up left as they were.
    auto dG2 = up(g0), dU2 = up(u0), dH2 = up(F(N * I, 123.f));
    cu::lora_swiglu_forward(dH2.as<cu::bf16>(), dG2.as<cu::bf16>(), dU2.as<cu::bf16>(),
                            dUg.as<cu::bf16>(), dUu.as<cu::bf16>(), dBg.as<cu::bf16>(),
                            dBu.as<cu::bf16>(), N, I, r, scale, nullptr, false);
    CHECK(down(dH2, N * I) == down(dH, N * I));
    CHECK(down(dG2, N * I) == down(up(g0), N * I));
    CHECK(down(dU2, N * I) == down(up(u0), N * I));
  }
  CHECK_FALSE(cu::lora_swiglu_supported(16, 64, nullptr, nullptr, nullptr, nullptr, nullptr));
}

// The backward group launches (projections reading one x: q/k/v, gate/up) against one call
// per member: dA must be the same bits (each sum runs in the same order); dx against the CPU twin
// (the members' terms are summed in fp32 and rounded once, where one call per member
// rounds after each), and within one bf16 rounding per member of the per-member calls.
TEST_CASE("cuda: LoRA group launches equal one call per projection") {
  REQUIRE_GPU();
  std::mt19937 rng(31);
  struct Shape { int64_t N, in, r; int count; };
  for (const Shape sh : {Shape{1, 8, 1, 2}, Shape{37, 136, 4, 3}, Shape{300, 1032, 8, 3},
                         Shape{513, 264, 13, 2}, Shape{259, 1024, 16, 3}, Shape{131, 3080, 8, 2},
                         Shape{1000, 2056, 8, 3}, Shape{2048, 4096, 8, 3}}) {
    const auto [N, in, r, count] = sh;
    const F x = rand_bf16(rng, N * in), dx0 = rand_bf16(rng, N * in);
    std::vector<F> A, du;
    std::vector<cu::DeviceBuffer> dA_w, dDu;
    for (int i = 0; i < count; ++i) {
      A.push_back(rand_bf16(rng, r * in, 0.05f));
      du.push_back(rand_bf16(rng, N * r));
      dA_w.push_back(up(A.back()));
      dDu.push_back(up(du.back()));
    }
    auto dX = up(x);
    for (double p : {0.0, 0.05}) {
      INFO("N=" << N << " in=" << in << " r=" << r << " count=" << count << " p=" << p);
      cu::LoraGroup g;
      g.count = count;
      std::vector<cu::DeviceBuffer> dA_one, dA_grp;
      std::vector<float*> dA_ptr;
      std::vector<const cu::bf16*> du_ptr;
      const F dA0 = rand_bf16(rng, r * in);
      cu::DeviceBuffer ws(cu::lora_down_backward_workspace(N, in, r, count) * sizeof(float));
      for (int i = 0; i < count; ++i) {
        g.A[i] = dA_w[i].as<cu::bf16>();
        g.seed[i] = 777 + 13 * i + static_cast<uint64_t>(p * 100);
        dA_one.push_back(cu::to_device(dA0));
        dA_grp.push_back(cu::to_device(dA0));
        dA_ptr.push_back(dA_grp.back().as<float>());
        du_ptr.push_back(dDu[i].as<cu::bf16>());
        cu::lora_down_backward(dA_one[i].as<float>(), du_ptr[i], dX.as<cu::bf16>(), N, in, r, p,
                               g.seed[i], 0.5f, ws.as<float>(), nullptr);
      }
      cu::lora_down_backward_group(g, dA_ptr.data(), du_ptr.data(), dX.as<cu::bf16>(), N, in, r,
                                   p, 0.5f, ws.as<float>(), nullptr);
      for (int i = 0; i < count; ++i) {
        CHECK(cu::to_host<float>(dA_grp[i], r * in) == cu::to_host<float>(dA_one[i], r * in));
      }
      // dx: the CPU twin sums every member's masked term onto dx0 in fp32.
      F dx_ref = dx0, t(N * in), tm(N * in), mag(N * in);
      for (int64_t j = 0; j < N * in; ++j) mag[j] = std::abs(dx0[j]);
      auto dDx_one = up(dx0), dDx_grp = up(dx0);
      for (int i = 0; i < count; ++i) {
        cpu::matmul_nn(t.data(), du[i].data(), A[i].data(), N, in, r, 1.f, false);
        cpu::dropout_apply(tm.data(), t.data(), N * in, p, g.seed[i], false);
        for (int64_t j = 0; j < N * in; ++j) {
          dx_ref[j] += tm[j];
          mag[j] += std::abs(tm[j]);
        }
        cu::lora_dx_backward(dDx_one.as<cu::bf16>(), du_ptr[i], g.A[i], N, in, r, p, g.seed[i],
                             nullptr);
      }
      cu::lora_dx_backward_group(g, dDx_grp.as<cu::bf16>(), du_ptr.data(), N, in, r, p, nullptr);
      const F got = down(dDx_grp, N * in), one = down(dDx_one, N * in);
      CHECK(err(got, dx_ref) < kTol);
      CHECK(err(one, dx_ref) < kTol);
      // Per element, the two differ by at most their roundings: count + 1 of at most 2^-8
      // (half a bf16 ulp) of the running sum's magnitude (<= mag = |dx0| + sum of |terms|).
      int64_t outside = 0;
      for (int64_t j = 0; j < N * in; ++j)
        if (std::abs(double(got[j]) - one[j]) > (count + 1) * std::ldexp(mag[j], -8) + 1e-6)
          ++outside;
      CHECK(outside == 0);
    }
  }
  // A group of none or of more than kLoraGroupMax is refused.
  cu::LoraGroup none;
  cu::DeviceBuffer b(64 * 8 * 2);
  const cu::bf16* du = b.as<cu::bf16>();
  CHECK_THROWS_AS(cu::lora_dx_backward_group(none, b.as<cu::bf16>(), &du, 8, 64, 8, 0.0, nullptr),
                  cu::CudaError);
}

// The forward's LoRA terms folded into the pass after the projection: into the residual add
// (o, down) and into RoPE (q, k). Each must give the same bits as lora_up_forward followed by
// that pass (residual_add, rope_forward: both checked against the CPU in
// test_cuda_kernels.cpp), and stay within bf16 tolerance of the CPU twin (fp32 matmul, add,
// RoPE). Ragged row counts, ranks 1..16 (RoPE: 1..8), head dims 8, 64, 128, packed positions.
TEST_CASE("cuda: LoRA terms folded into the residual add and RoPE equal the separate passes") {
  REQUIRE_GPU();
  std::mt19937 rng(41);
  struct Res { int64_t N, cols, r; };
  for (const Res sh : {Res{1, 8, 1}, Res{37, 136, 4}, Res{300, 1032, 8}, Res{129, 264, 13},
                       Res{1000, 4096, 8}}) {
    const auto [N, cols, r] = sh;
    const float scale = 2.f;
    const F y = rand_bf16(rng, N * cols), x = rand_bf16(rng, N * cols, 4.f);
    const F u = rand_bf16(rng, N * r), B = rand_bf16(rng, cols * r, 0.1f);
    auto dY = up(y), dX = up(x), dU = up(u), dB = up(B), dOut = up(F(N * cols, 7.f));
    REQUIRE(cu::lora_up_residual_supported(r, cols, dOut.get(), dX.get(), dY.get(), dU.get()));
    cu::lora_up_residual_forward(dOut.as<cu::bf16>(), dX.as<cu::bf16>(), dY.as<cu::bf16>(),
                                 dU.as<cu::bf16>(), dB.as<cu::bf16>(), N, cols, r, scale, nullptr);
    auto dY2 = up(y), dOut2 = up(F(N * cols, 7.f));
    cu::lora_up_forward(dY2.as<cu::bf16>(), dU.as<cu::bf16>(), dB.as<cu::bf16>(), N, cols, r,
                        scale, nullptr);
    cu::residual_add(dOut2.as<cu::bf16>(), dX.as<cu::bf16>(), dY2.as<cu::bf16>(), N * cols,
                     nullptr);
    F t(N * cols), ref(N * cols);
    cpu::matmul_nt(t.data(), u.data(), B.data(), N, cols, r, 1.f, false);
    for (int64_t i = 0; i < N * cols; ++i) ref[i] = x[i] + (y[i] + scale * t[i]);
    INFO("residual N=" << N << " cols=" << cols << " r=" << r);
    const F got = down(dOut, N * cols);
    CHECK(mismatches(got, down(dOut2, N * cols)) == 0);
    CHECK(err(got, ref) < kTol);
    CHECK(down(dY, N * cols) == y);  // y is read, not written
  }
  struct Rope { int64_t N, heads, hd, r; };
  for (const Rope sh : {Rope{1, 1, 8, 1}, Rope{33, 3, 64, 3}, Rope{300, 4, 128, 8},
                        Rope{1000, 8, 128, 8}, Rope{257, 2, 64, 8}}) {
    const auto [N, heads, hd, r] = sh;
    const int64_t cols = heads * hd, half = hd / 2, max_pos = 2048;
    F cs(max_pos * half), sn(max_pos * half);
    for (int64_t p = 0; p < max_pos; ++p)
      for (int64_t i = 0; i < half; ++i) {
        const double a = p * std::pow(500000.0, -2.0 * i / hd);
        cs[p * half + i] = float(std::cos(a));
        sn[p * half + i] = float(std::sin(a));
      }
    std::vector<int32_t> pos(N);
    std::uniform_int_distribution<int32_t> pick(0, max_pos - 1);
    for (auto& p : pos) p = pick(rng);
    const float scale = 0.5f;
    const F y = rand_bf16(rng, N * cols, 2.f), u = rand_bf16(rng, N * r);
    const F B = rand_bf16(rng, cols * r, 0.1f);
    auto dC = cu::to_device(cs), dS = cu::to_device(sn), dP = cu::to_device(pos);
    auto dY = up(y), dY2 = up(y), dU = up(u), dB = up(B);
    REQUIRE(cu::lora_up_rope_supported(r, hd, dY.get(), dU.get(), dC.as<float>(), dS.as<float>()));
    cu::lora_up_rope_forward(dY.as<cu::bf16>(), dU.as<cu::bf16>(), dB.as<cu::bf16>(),
                             dC.as<float>(), dS.as<float>(), dP.as<int32_t>(), N, heads, hd, r,
                             scale, nullptr);
    cu::lora_up_forward(dY2.as<cu::bf16>(), dU.as<cu::bf16>(), dB.as<cu::bf16>(), N, cols, r,
                        scale, nullptr);
    cu::rope_forward(dY2.as<cu::bf16>(), dC.as<float>(), dS.as<float>(), dP.as<int32_t>(), N,
                     heads, hd, nullptr);
    F t(N * cols), ref(N * cols);
    cpu::matmul_nt(t.data(), u.data(), B.data(), N, cols, r, 1.f, false);
    for (int64_t i = 0; i < N * cols; ++i) ref[i] = y[i] + scale * t[i];
    cpu::rope_forward(ref.data(), cs.data(), sn.data(), pos.data(), N, heads, hd);
    INFO("rope N=" << N << " heads=" << heads << " hd=" << hd << " r=" << r);
    const F got = down(dY, N * cols);
    CHECK(mismatches(got, down(dY2, N * cols)) == 0);
    CHECK(err(got, ref) < kTol);
  }
  CHECK_FALSE(cu::lora_up_rope_supported(16, 128, nullptr, nullptr, nullptr, nullptr));
  CHECK_FALSE(cu::lora_up_rope_supported(8, 12, nullptr, nullptr, nullptr, nullptr));
}
