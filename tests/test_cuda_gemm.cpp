// CUDA backend, cuBLASLt GEMM wrapper against cpu::matmul_nt / nn / tn (fp32, on the same
// bf16-rounded inputs), all three layouts, bf16 and fp32 outputs, alpha/beta accumulation,
// ragged shapes; then 4096^3 products timed for a TFLOP/s print (no assertion on speed).
// Error of entry (i,j): |got - want| / (|alpha| (|A||B|)_ij + |beta C0_ij|), i.e. relative
// to the sum of the magnitudes that entered it (sign cancellation cannot inflate it).
// fp32 accumulation in another order: <= ~K * 6e-8 worst case, ~1e-6 typical; a bf16 output
// adds one rounding, <= 2^-9 ~ 2e-3. Bounds: 1e-4 (fp32 out), 8e-3 (bf16 out).
// Skips without a GPU.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_util.hpp"
#include "ftune/kernels/cpu_ops.hpp"
#include "ftune/kernels/cuda_device.hpp"
#include "ftune/kernels/cuda_gemm.hpp"

using namespace ftune::test::cuda;  // REQUIRE_GPU, cu, F, rbf, rand_bf16, pack, unpack
namespace cpu = ftune::cpu;

namespace {

F abs_of(F v) {
  for (auto& e : v) e = std::abs(e);
  return v;
}

std::string name(cu::GemmOp op) {  // (doctest prints a const char* as a pointer)
  return op == cu::GemmOp::NT ? "NT" : op == cu::GemmOp::NN ? "NN" : "TN";
}

// The CPU twin of each layout (A, B as the GPU sees them).
void cpu_matmul(cu::GemmOp op, float* C, const float* A, const float* B, int64_t M, int64_t N,
                int64_t K, float alpha, bool acc) {
  if (op == cu::GemmOp::NT) cpu::matmul_nt(C, A, B, M, N, K, alpha, acc);
  if (op == cu::GemmOp::NN) cpu::matmul_nn(C, A, B, M, N, K, alpha, acc);
  if (op == cu::GemmOp::TN) cpu::matmul_tn(C, A, B, M, N, K, alpha, acc);
}

// One product on the GPU: C0 is the prior content of C (used when beta != 0).
F gpu_matmul(cu::Gemm& g, cu::GemmOp op, bool f32, const F& A, const F& B, const F& C0,
             int64_t M, int64_t N, int64_t K, float alpha, float beta) {
  auto dA = cu::to_device(pack(A)), dB = cu::to_device(pack(B));
  if (f32) {
    auto dC = cu::to_device(C0);
    g.matmul(op, dC.as<float>(), dA.as<cu::bf16>(), dB.as<cu::bf16>(), M, N, K, alpha, beta,
             nullptr);
    return cu::to_host<float>(dC, M * N);
  }
  auto dC = cu::to_device(pack(C0));
  g.matmul(op, dC.as<cu::bf16>(), dA.as<cu::bf16>(), dB.as<cu::bf16>(), M, N, K, alpha, beta,
           nullptr);
  return unpack(cu::to_host<cu::bf16>(dC, M * N));
}

struct Shape {
  int64_t M, N, K;
};

// One layout on one shape: bf16 and fp32 outputs, (alpha, beta) = (1, 0) and (0.5, 1).
void check_shape(cu::Gemm& gemm, std::mt19937& rng, cu::GemmOp op, Shape s) {
  const F A = rand_bf16(rng, s.M * s.K), B = rand_bf16(rng, s.N * s.K),
          C0 = rand_bf16(rng, s.M * s.N);
  // |A||B|: the magnitude scale of every dot product.
  F mag(s.M * s.N);
  cpu_matmul(op, mag.data(), abs_of(A).data(), abs_of(B).data(), s.M, s.N, s.K, 1.f, false);
  for (bool f32 : {false, true}) {
    for (auto [alpha, beta] : {std::pair{1.f, 0.f}, std::pair{0.5f, 1.f}}) {
      F want = C0;
      cpu_matmul(op, want.data(), A.data(), B.data(), s.M, s.N, s.K, alpha, beta != 0.f);
      const F got = gpu_matmul(gemm, op, f32, A, B, C0, s.M, s.N, s.K, alpha, beta);
      double e = 0;
      for (int64_t i = 0; i < s.M * s.N; ++i) {
        const double scale = std::abs(alpha) * mag[i] + std::abs(beta * C0[i]);
        e = std::max(e, std::abs(double(got[i]) - want[i]) / scale);
      }
      const std::string out = f32 ? "fp32" : "bf16";
      MESSAGE(name(op) << " M=" << s.M << " N=" << s.N << " K=" << s.K << " out " << out
                       << " alpha=" << alpha << " beta=" << beta << ": err " << e);
      CHECK(e < (f32 ? 1e-4 : 8e-3));
    }
  }
}

}  // namespace

TEST_CASE("cuda: gemm, three layouts, bf16/fp32 out, alpha/beta, ragged shapes") {
  REQUIRE_GPU();
  std::mt19937 rng(11);
  cu::Gemm gemm;
  const Shape shapes[] = {{256, 512, 384}, {130, 257, 129}, {37, 45, 70},
                          {64, 96, 33},    {17, 3, 4096},   {1, 1, 1}};
  for (Shape s : shapes)
    for (cu::GemmOp op : {cu::GemmOp::NT, cu::GemmOp::NN, cu::GemmOp::TN})
      // A throw (say, no algorithm for an odd alignment) fails this shape, not the rest.
      CHECK_NOTHROW(check_shape(gemm, rng, op, s));
  // Plans are cached per (op, shape, out type, alignment): repeating a product adds none.
  const size_t plans = gemm.cached_plans();
  F A = rand_bf16(rng, 37 * 70), B = rand_bf16(rng, 45 * 70), C(37 * 45, 0.f);
  gpu_matmul(gemm, cu::GemmOp::NT, true, A, B, C, 37, 45, 70, 1.f, 0.f);
  CHECK(gemm.cached_plans() == plans);
}

TEST_CASE("cuda: gemm 4096^3 throughput") {
  REQUIRE_GPU();
  const int64_t n = 4096;
  std::mt19937 rng(12);
  const F A = rand_bf16(rng, n * n), B = rand_bf16(rng, n * n);
  auto dA = cu::to_device(pack(A)), dB = cu::to_device(pack(B));
  cu::DeviceBuffer dC16(n * n * 2), dC32(n * n * 4);
  dC32.zero();
  cu::Gemm gemm;
  cu::Stream stream;
  for (cu::GemmOp op : {cu::GemmOp::NT, cu::GemmOp::NN, cu::GemmOp::TN}) {
    // Weight gradients (TN) accumulate in fp32; activations (NT, NN) come out in bf16.
    const bool f32 = op == cu::GemmOp::TN;
    auto run = [&] {
      if (f32)
        gemm.matmul(op, dC32.as<float>(), dA.as<cu::bf16>(), dB.as<cu::bf16>(), n, n, n, 1.f,
                    0.f, stream.get());
      else
        gemm.matmul(op, dC16.as<cu::bf16>(), dA.as<cu::bf16>(), dB.as<cu::bf16>(), n, n, n,
                    1.f, 0.f, stream.get());
    };
    for (int i = 0; i < 3; ++i) run();
    cu::Event e0, e1;
    const int iters = 20;
    e0.record(stream.get());
    for (int i = 0; i < iters; ++i) run();
    e1.record(stream.get());
    e1.synchronize();
    const double ms = e1.elapsed_ms_since(e0) / iters;
    const double tflops = 2.0 * n * n * n / (ms * 1e-3) / 1e12;
    const std::string out = f32 ? "fp32" : "bf16";
    MESSAGE("gemm " << name(op) << " 4096^3 bf16 -> " << out << ": " << ms << " ms, " << tflops
                    << " TFLOP/s");

    // Spot-check a few entries against double dot products of the same bf16 inputs.
    const F C = f32 ? cu::to_host<float>(dC32, n * n) : unpack(cu::to_host<cu::bf16>(dC16, n * n));
    std::uniform_int_distribution<int64_t> pick(0, n - 1);
    double e = 0;
    for (int t = 0; t < 16; ++t) {
      const int64_t i = pick(rng), j = pick(rng);
      double dot = 0, mag = 0;
      for (int64_t k = 0; k < n; ++k) {
        const double a = op == cu::GemmOp::TN ? A[k * n + i] : A[i * n + k];
        const double b = op == cu::GemmOp::NT ? B[j * n + k] : B[k * n + j];
        dot += a * b;
        mag += std::abs(a * b);
      }
      e = std::max(e, std::abs(C[i * n + j] - dot) / mag);
    }
    CHECK(e < (f32 ? 1e-4 : 8e-3));
  }
}
