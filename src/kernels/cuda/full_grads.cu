// Gradients that only full fine-tuning forms (use_peft = false): RMSNorm weights, biases
// (column sums) and the embedding table. All sum in a fixed order (no atomics), so a run
// repeats bit for bit: rows are cut into chunks of kRowsPerChunk, each chunk's column sums go
// to a workspace, and a second pass adds the chunks in order into the fp32 gradient.
#include "common.cuh"
#include "ftune/kernels/cuda_ops.hpp"

namespace ftune::cuda {
namespace {
using namespace detail;

constexpr int64_t kRowsPerChunk = 64;
constexpr int kThreads = 256;

// ws[chunk, d] = sum over the chunk's rows n of dy[n, d] * (x[n, d] * rstd[n])  (WITH_X),
// or of dy[n, d] (column sums, for biases).
template <bool WITH_X>
__global__ void column_partials_kernel(float* ws, const __nv_bfloat16* dy,
                                       const __nv_bfloat16* x, const float* rstd, int64_t N,
                                       int64_t D) {
  const int64_t d = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (d >= D) return;
  const int64_t n0 = chunk * kRowsPerChunk, n1 = min(N, n0 + kRowsPerChunk);
  float acc = 0.f;
  for (int64_t n = n0; n < n1; ++n) {
    const float g = __bfloat162float(dy[n * D + d]);
    if constexpr (WITH_X)
      acc += g * (__bfloat162float(x[n * D + d]) * rstd[n]);
    else
      acc += g;
  }
  ws[chunk * D + d] = acc;
}

__global__ void add_partials_kernel(float* out, const float* ws, int64_t chunks, int64_t D) {
  const int64_t d = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (d >= D) return;
  float acc = 0.f;
  for (int64_t c = 0; c < chunks; ++c) acc += ws[c * D + d];
  out[d] += acc;
}

// dtable[uniq[u], :] += sum over j in [start[u], start[u+1]) of dy[order[j], :].
__global__ void embedding_backward_kernel(float* dtable, const __nv_bfloat16* dy,
                                          const int32_t* uniq, const int32_t* start,
                                          const int32_t* order, int64_t D) {
  const int64_t u = blockIdx.x;
  float* row = dtable + static_cast<int64_t>(uniq[u]) * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int32_t j = start[u]; j < start[u + 1]; ++j)
      acc += __bfloat162float(dy[static_cast<int64_t>(order[j]) * D + d]);
    row[d] += acc;
  }
}

template <bool WITH_X>
void column_grad(float* out, const bf16* dy, const bf16* x, const float* rstd, int64_t N,
                 int64_t D, float* ws, stream_t stream) {
  if (N <= 0 || D <= 0) return;
  const int64_t chunks = (N + kRowsPerChunk - 1) / kRowsPerChunk;
  const dim3 grid(static_cast<unsigned>((D + kThreads - 1) / kThreads), static_cast<unsigned>(chunks));
  column_partials_kernel<WITH_X><<<grid, kThreads, 0, stream>>>(ws, dev(dy), dev(x), rstd, N, D);
  FTUNE_CUDA_LAUNCH_CHECK();
  add_partials_kernel<<<static_cast<unsigned>((D + kThreads - 1) / kThreads), kThreads, 0,
                        stream>>>(out, ws, chunks, D);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace

int64_t column_grad_workspace_floats(int64_t N, int64_t D) {
  return ((N + kRowsPerChunk - 1) / kRowsPerChunk) * D;
}

void rms_norm_weight_backward(float* dw, const bf16* dy, const bf16* x, const float* rstd,
                              int64_t N, int64_t D, float* ws, stream_t stream) {
  column_grad<true>(dw, dy, x, rstd, N, D, ws, stream);
}

void bias_backward(float* db, const bf16* dy, int64_t N, int64_t D, float* ws, stream_t stream) {
  column_grad<false>(db, dy, nullptr, nullptr, N, D, ws, stream);
}

void embedding_backward(float* dtable, const bf16* dy, const int32_t* uniq, const int32_t* start,
                        const int32_t* order, int64_t U, int64_t D, stream_t stream) {
  if (U <= 0 || D <= 0) return;
  embedding_backward_kernel<<<static_cast<unsigned>(U), kThreads, 0, stream>>>(
      dtable, dev(dy), uniq, start, order, D);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace ftune::cuda
