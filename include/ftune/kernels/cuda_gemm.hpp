#pragma once
// kernels module (CUDA backend): bf16 matrix products through cuBLASLt, row-major, fp32
// accumulation, bf16 or fp32 output, in the three layouts the model needs (the twins of
// cpu::matmul_nt / nn / tn):
//   NT: C[M,N] = alpha * A[M,K] * B[N,K]^T + beta * C   (linear layer:  x W^T)
//   NN: C[M,N] = alpha * A[M,K] * B[K,N]   + beta * C   (input grad:    dy W)
//   TN: C[M,N] = alpha * A[K,M]^T * B[K,N] + beta * C   (weight grad:   dy^T x)
// The algorithm is picked by cuBLASLt's heuristic once per (layout, shape, output type,
// pointer alignment) and cached with its descriptors. One Gemm owns one cuBLASLt handle and
// a 32 MiB workspace: use one Gemm per stream (the workspace is not shared safely across
// concurrent streams). Plain C++ header; implemented in src/kernels/cuda/gemm.cu.
#include <cstdint>
#include <memory>
#include <vector>

#include "ftune/kernels/cuda_device.hpp"

namespace ftune::cuda {

enum class GemmOp { NT, NN, TN };

class Gemm {
 public:
  static constexpr size_t kDefaultWorkspace = size_t(32) << 20;  // Hopper's recommendation
  explicit Gemm(size_t workspace_bytes = kDefaultWorkspace);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  void matmul(GemmOp op, bf16* C, const bf16* A, const bf16* B, int64_t M, int64_t N,
              int64_t K, float alpha, float beta, stream_t stream);
  void matmul(GemmOp op, float* C, const bf16* A, const bf16* B, int64_t M, int64_t N,
              int64_t K, float alpha, float beta, stream_t stream);

  size_t cached_plans() const;

  // tools/bench_gemm measured autotuning (keeping the fastest of these per shape) on an
  // H200: 2.6% less GEMM time alone at the 8B shape, 0.1% more tokens/s in training
  // (tools/results/bench_gemm.md), so the heuristic's first choice stays: it is repeatable.
  // Every algorithm the heuristic offers for this product (its first choice first), each
  // timed on these operands: mean ms of `reps` runs after two warm-ups, +inf where
  // cuBLASLt refused to launch it. C is overwritten (beta applies on every run).
  std::vector<float> time_algorithms(GemmOp op, bf16* C, const bf16* A, const bf16* B,
                                     int64_t M, int64_t N, int64_t K, float alpha, float beta,
                                     stream_t stream, int reps = 10);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ftune::cuda
