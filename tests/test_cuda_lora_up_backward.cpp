// lora_up_backward (dB += scale dy^T u, du = bf16(scale dy B) in one tensor-core pass over dy)
// against its CPU twin, cpu::matmul_tn / matmul_nn in fp32 on the same bf16 inputs. Shapes are
// ragged around the kernel's tiles: 512-column blocks, 32-row stages, 16-row mma tiles and
// 128-row groups; ranks 1..8 (ranks below 8 are zero-padded in the mma). du is rounded to bf16
// once (kTol); dB is fp32 (sums in another order: 1e-4). Skips without a GPU.
#include <doctest/doctest.h>

#include <random>
#include <vector>

#include "cuda_test_util.hpp"
#include "ftune/kernels/cpu_ops.hpp"
#include "ftune/kernels/cuda_lora.hpp"

using namespace ftune::test::cuda;
namespace cpu = ftune::cpu;

TEST_CASE("cuda: LoRA up-product backward (dB, du in one pass) vs cpu") {
  REQUIRE_GPU();
  std::mt19937 rng(29);
  struct Shape { int64_t N, out, r; };
  for (const Shape sh : {Shape{1, 8, 1}, Shape{37, 136, 4}, Shape{300, 1032, 8},
                         Shape{513, 520, 7}, Shape{131, 3080, 8}, Shape{1000, 4096, 8},
                         Shape{4111, 1024, 8}, Shape{2049, 14336, 8}, Shape{96, 24, 3}}) {
    const auto [N, out, r] = sh;
    INFO("N=" << N << " out=" << out << " r=" << r);
    REQUIRE(cu::lora_up_backward_supported(r, out, nullptr));
    const float scale = 2.f;  // PEFT's alpha / r at alpha 16, r 8
    const F dy = rand_bf16(rng, N * out), u = rand_bf16(rng, N * r);
    const F B = rand_bf16(rng, out * r, 0.05f), dB0 = rand_bf16(rng, out * r, 0.1f);
    F dB_ref = dB0, du_ref(N * r);
    cpu::matmul_tn(dB_ref.data(), dy.data(), u.data(), out, r, N, scale, true);
    cpu::matmul_nn(du_ref.data(), dy.data(), B.data(), N, r, out, scale, false);

    auto dDy = up(dy), dU = up(u);
    // B at an odd element offset: the kernel reads PEFT's [out, r] layout at any alignment.
    F B_shifted(out * r + 1, 0.f);
    std::copy(B.begin(), B.end(), B_shifted.begin() + 1);
    auto dBw = up(B_shifted);
    const cu::bf16* B_dev = dBw.as<cu::bf16>() + 1;
    cu::DeviceBuffer ws(cu::lora_up_backward_workspace(N, out, r) * sizeof(float));
    auto run = [&](std::vector<float>& dB, F& du) {
      auto dG = cu::to_device(dB0);
      cu::DeviceBuffer dDu(N * r * 2);
      cu::lora_up_backward(dG.as<float>(), dDu.as<cu::bf16>(), dDy.as<cu::bf16>(),
                           dU.as<cu::bf16>(), B_dev, N, out, r, scale, ws.as<float>(), nullptr);
      dB = cu::to_host<float>(dG, out * r);
      du = down(dDu, N * r);
    };
    std::vector<float> dB, dB2;
    F du, du2;
    run(dB, du);
    run(dB2, du2);
    const double eb = err(dB, dB_ref), eu = err(du, du_ref);
    CHECK(eb < 1e-4);
    CHECK(eu < kTol);
    // A fixed summation order: the same bits on every call.
    CHECK(mismatches(dB, dB2) == 0);
    CHECK(mismatches(du, du2) == 0);
    if (out == 14336) MESSAGE("lora_up_backward 2049x14336 r8: dB err " << eb << ", du err " << eu);
  }
}

TEST_CASE("cuda: LoRA up-product backward refuses what it does not support") {
  CHECK_FALSE(cu::lora_up_backward_supported(9, 64, nullptr));
  CHECK_FALSE(cu::lora_up_backward_supported(0, 64, nullptr));
  CHECK_FALSE(cu::lora_up_backward_supported(8, 12, nullptr));
  alignas(16) static const char buf[32] = {};
  CHECK_FALSE(cu::lora_up_backward_supported(8, 64, buf + 2));
  CHECK_THROWS(cu::lora_up_backward(nullptr, nullptr, nullptr, nullptr, nullptr, 4, 12, 8, 1.f,
                                    nullptr, nullptr));
}
