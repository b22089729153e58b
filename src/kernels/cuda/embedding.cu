// Embedding gather: one block per token row, 16-byte copies when rows allow them.
#include "common.cuh"
#include "ftune/kernels/cuda_ops.hpp"

namespace ftune::cuda {
namespace {

template <bool kVec>
__global__ void embedding_kernel(__nv_bfloat16* out, const __nv_bfloat16* table,
                                 const int32_t* ids, int64_t D, int64_t vocab) {
  const int64_t n = blockIdx.x;
  const int32_t id = ids[n];
  __nv_bfloat16* o = out + n * D;
  const bool valid = id >= 0 && id < vocab;
  const __nv_bfloat16* t = table + (valid ? static_cast<int64_t>(id) * D : 0);
  if constexpr (kVec) {
    const uint4 zero{0, 0, 0, 0};
    for (int64_t i = threadIdx.x * 8; i < D; i += blockDim.x * 8)
      *reinterpret_cast<uint4*>(o + i) = valid ? *reinterpret_cast<const uint4*>(t + i) : zero;
  } else {
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
      o[i] = valid ? t[i] : __float2bfloat16_rn(0.f);
  }
}

}  // namespace

void embedding_forward(bf16* out, const bf16* table, const int32_t* ids, int64_t N, int64_t D,
                       int64_t vocab, stream_t stream) {
  if (N <= 0 || D <= 0) return;
  using namespace detail;
  // Every row start is 16-byte aligned when D % 8 == 0 and both bases are.
  const bool vec = D % 8 == 0 && aligned16(out) && aligned16(table);
  const unsigned blocks = static_cast<unsigned>(N), threads = 128;
  if (vec)
    embedding_kernel<true><<<blocks, threads, 0, stream>>>(dev(out), dev(table), ids, D, vocab);
  else
    embedding_kernel<false><<<blocks, threads, 0, stream>>>(dev(out), dev(table), ids, D, vocab);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace ftune::cuda
