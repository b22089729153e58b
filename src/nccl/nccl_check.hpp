#pragma once
// Private to src/nccl/: error macros for NCCL and CUDA runtime calls made from plain .cpp
// files (common.cuh is for nvcc only). Messages name the call, file, line, rank and GPU.
#include <cuda_runtime.h>
#include <nccl.h>

#include "ftune/dist/nccl.hpp"

namespace ftune::nccl_detail {

// Rank and GPU printed in messages; set by NcclCommunicator::create (-1 = not known yet).
void set_context(int rank, int device);
std::string context();  // " [rank r, GPU d]" or ""

[[noreturn]] void fail(ncclResult_t r, const char* call, const char* file, int line);
[[noreturn]] void cuda_fail(cudaError_t e, const char* call, const char* file, int line);
// Destructors cannot throw: they print the same message to stderr.
void warn(ncclResult_t r, const char* call, const char* file, int line);

}  // namespace ftune::nccl_detail

#define FTUNE_NCCL_CHECK(call)                                                 \
  do {                                                                         \
    const ncclResult_t ftune_nccl_rc_ = (call);                                \
    if (ftune_nccl_rc_ != ncclSuccess)                                         \
      ::ftune::nccl_detail::fail(ftune_nccl_rc_, #call, __FILE__, __LINE__);   \
  } while (0)

#define FTUNE_NCCL_WARN(call)                                                  \
  do {                                                                         \
    const ncclResult_t ftune_nccl_rc_ = (call);                                \
    if (ftune_nccl_rc_ != ncclSuccess)                                         \
      ::ftune::nccl_detail::warn(ftune_nccl_rc_, #call, __FILE__, __LINE__);   \
  } while (0)

// CUDA runtime calls in src/nccl/*.cpp (throws ftune::cuda::CudaError).
#define FTUNE_NCCL_CUDA_CHECK(call)                                            \
  do {                                                                         \
    const cudaError_t ftune_cuda_rc_ = (call);                                 \
    if (ftune_cuda_rc_ != cudaSuccess)                                         \
      ::ftune::nccl_detail::cuda_fail(ftune_cuda_rc_, #call, __FILE__, __LINE__); \
  } while (0)
