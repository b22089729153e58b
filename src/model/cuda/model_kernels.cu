// Small kernels and copy helpers of the CUDA transformer (see model_kernels.cuh).
#include "../../kernels/cuda/common.cuh"
#include "model_kernels.cuh"

namespace ftune::cuda::model {
namespace {
using namespace detail;

__global__ void add_bias_kernel(__nv_bfloat16* y, const __nv_bfloat16* b, int64_t n,
                                int64_t out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    st(y + i, ld(y + i) + ld(b + i % out));
}

// One block per row; plain 2-byte copies (D need not be a multiple of 8).
__global__ void scatter_rows_kernel(__nv_bfloat16* dst, const __nv_bfloat16* src,
                                    const int32_t* rows, int64_t D) {
  const int64_t i = blockIdx.x;
  __nv_bfloat16* d = dst + int64_t(rows[i]) * D;
  const __nv_bfloat16* s = src + i * D;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) d[j] = s[j];
}

}  // namespace

void add_bias(bf16* y, const bf16* b, int64_t N, int64_t out, stream_t stream) {
  const int64_t n = N * out;
  if (n <= 0) return;
  add_bias_kernel<<<grid_for(n, 256, 8192), 256, 0, stream>>>(dev(y), dev(b), n, out);
  FTUNE_CUDA_LAUNCH_CHECK();
}

void scatter_rows(bf16* dst, const bf16* src, const int32_t* rows, int64_t m, int64_t D,
                  stream_t stream) {
  if (m <= 0) return;
  scatter_rows_kernel<<<static_cast<unsigned>(m), 128, 0, stream>>>(dev(dst), dev(src), rows, D);
  FTUNE_CUDA_LAUNCH_CHECK();
}

void h2d(void* dst, const void* src, size_t bytes, stream_t stream) {
  if (bytes) FTUNE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
}
void d2h(void* dst, const void* src, size_t bytes, stream_t stream) {
  if (bytes) FTUNE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
}
void memset0(void* dst, size_t bytes, stream_t stream) {
  if (bytes) FTUNE_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, stream));
}
void stream_sync(stream_t stream) { FTUNE_CUDA_CHECK(cudaStreamSynchronize(stream)); }
void use_device(int device) { FTUNE_CUDA_CHECK(cudaSetDevice(device)); }

}  // namespace ftune::cuda::model
