#pragma once
// Small device kernels the CUDA transformer needs beyond kernels/cuda_ops.hpp: bias add, row scatter for the loss head, and host<->device copies on the
// backend's stream. CUDA-side header (included by src/model/cuda/*.cu only).
#include <cstdint>

#include "ftune/kernels/cuda_device.hpp"

namespace ftune::cuda::model {

// y[n, o] += b[o] for n < N, o < out (one rounding).
void add_bias(bf16* y, const bf16* b, int64_t N, int64_t out, stream_t stream);
// dst[rows[i], :] = src[i, :] for i < m; rows are distinct (the inverse of the gather that
// embedding_forward does with a row-index table).
void scatter_rows(bf16* dst, const bf16* src, const int32_t* rows, int64_t m, int64_t D,
                  stream_t stream);

// Asynchronous copies on `stream` (pageable host memory: the host buffer may be reused as
// soon as h2d returns; d2h needs a stream sync before the data is read).
void h2d(void* dst, const void* src, size_t bytes, stream_t stream);
void d2h(void* dst, const void* src, size_t bytes, stream_t stream);
void memset0(void* dst, size_t bytes, stream_t stream);
void stream_sync(stream_t stream);
// cudaSetDevice for the calling thread (backends may be driven from several threads).
void use_device(int device);

}  // namespace ftune::cuda::model
