// RoPE in place (HF rotate_half): element i of a head pairs with i + head_dim/2. One thread
// per pair (two adjacent pairs with bf16x2 accesses when half is even). fp32 math in the
// CPU twin's order with explicitly rounded multiplies (no FMA contraction), so before the
// final bf16 rounding the values equal cpu::rope_* on the same inputs.
#include "common.cuh"
#include "ftune/kernels/cuda_ops.hpp"

namespace ftune::cuda {
namespace {
using namespace detail;

// kPair: each thread rotates pairs (i, i+half) and (i+1, i+1+half) with 4-byte accesses.
template <bool kPair>
__global__ void rope_kernel(__nv_bfloat16* x, const float* cos, const float* sin,
                            const int32_t* positions, int64_t N, int64_t heads, int64_t half,
                            float sign) {
  constexpr int V = kPair ? 2 : 1;
  const int64_t per_head = half / V;
  const int64_t total = N * heads * per_head;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t nh = idx / per_head;  // token * heads + head
    const int64_t i = (idx - nh * per_head) * V;
    const int64_t n = nh / heads;
    const int64_t t = static_cast<int64_t>(positions[n]) * half + i;
    __nv_bfloat16* v = x + nh * 2 * half + i;
    if constexpr (kPair) {
      const float2 a = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(v));
      const float2 b = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(v + half));
      const float2 c = *reinterpret_cast<const float2*>(cos + t);
      const float2 s = *reinterpret_cast<const float2*>(sin + t);
      float2 oa, ob;
      rope_rotate(a.x, b.x, c.x, sign * s.x, oa.x, ob.x);
      rope_rotate(a.y, b.y, c.y, sign * s.y, oa.y, ob.y);
      *reinterpret_cast<__nv_bfloat162*>(v) = __floats2bfloat162_rn(oa.x, oa.y);
      *reinterpret_cast<__nv_bfloat162*>(v + half) = __floats2bfloat162_rn(ob.x, ob.y);
    } else {
      float oa, ob;
      rope_rotate(ld(v), ld(v + half), cos[t], sign * sin[t], oa, ob);
      st(v, oa);
      st(v + half, ob);
    }
  }
}

void rope_launch(bf16* x, const float* cos, const float* sin, const int32_t* positions,
                 int64_t N, int64_t heads, int64_t head_dim, float sign, stream_t stream) {
  if (N <= 0 || heads <= 0 || head_dim <= 0) return;
  if (head_dim % 2) throw CudaError("rope: head_dim must be even");
  const int64_t half = head_dim / 2;
  // Pairs of pairs need even half and 4/8-byte aligned bases (row offsets stay aligned).
  const bool pair = half % 2 == 0 && (reinterpret_cast<uintptr_t>(x) & 3) == 0 &&
                    (reinterpret_cast<uintptr_t>(cos) & 7) == 0 &&
                    (reinterpret_cast<uintptr_t>(sin) & 7) == 0;
  const int threads = 256;
  if (pair)
    rope_kernel<true><<<grid_for(N * heads * half / 2, threads), threads, 0, stream>>>(
        dev(x), cos, sin, positions, N, heads, half, sign);
  else
    rope_kernel<false><<<grid_for(N * heads * half, threads), threads, 0, stream>>>(
        dev(x), cos, sin, positions, N, heads, half, sign);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace

void rope_forward(bf16* x, const float* cos, const float* sin, const int32_t* positions,
                  int64_t N, int64_t heads, int64_t head_dim, stream_t stream) {
  rope_launch(x, cos, sin, positions, N, heads, head_dim, 1.f, stream);
}

void rope_backward(bf16* dx, const float* cos, const float* sin, const int32_t* positions,
                   int64_t N, int64_t heads, int64_t head_dim, stream_t stream) {
  rope_launch(dx, cos, sin, positions, N, heads, head_dim, -1.f, stream);
}

}  // namespace ftune::cuda
