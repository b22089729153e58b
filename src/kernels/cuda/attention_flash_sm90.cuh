#pragma once
// The Hopper (sm_90a, wgmma) flash attention kernels, behind the launchers of
// attention_flash_fwd.cu / attention_flash_bwd.cu, which pick them on a device that can run
// them (sm90_available) unless the tuning hook asks for an mma.sync variant (1-4, 8).
// variant: 0 = default tiles; the launchers' comments list the others.
#include <cuda_runtime.h>

#include "common.cuh"
#include "ftune/kernels/cuda_attention.hpp"

namespace ftune::cuda::fa {

using bf = __nv_bfloat16;

// True when this build carries sm_90a code (CMake: FTUNE_CUDA_SM90A) and the current device
// is compute capability 9.0.
inline bool sm90_available() {
#ifdef FTUNE_CUDA_SM90A
  const detail::DeviceFacts f = detail::device_facts();
  return f.major == 9 && f.minor == 0;
#else
  return false;
#endif
}

void flash_forward_sm90(bf* out, float* lse, const bf* q, const bf* k, const bf* v,
                        const int64_t* seq_start, const AttentionShape& s, int variant,
                        cudaStream_t stream);
// dq_acc (fp32 [N, Hq*d], zeroed) and Dv (rowsum(dO*O), [N, Hq]) as in the mma.sync path.
void flash_backward_sm90(float* dq_acc, bf* dk, bf* dv, const bf* dout, const bf* q,
                         const bf* k, const bf* v, const float* lse, const float* Dv,
                         const int64_t* seq_start, const AttentionShape& s, int variant,
                         cudaStream_t stream);

}  // namespace ftune::cuda::fa
