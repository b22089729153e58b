#pragma once
// kernels module (CUDA): causal attention over packed sequences, the GPU twin of
// cpu::attention_forward/backward. Layouts match the CPU op: q [N, Hq*d], k/v [N, Hkv*d],
// out [N, Hq*d] (bf16, row-major by token), lse [N, Hq] (fp32); sequence s holds tokens
// seq_start[s] .. seq_start[s+1]-1 (int64 on the device, like MicroBatch::seq_start); query
// head h reads kv head h / (Hq / Hkv). Scale 1/sqrt(d). Plain C++ header (no CUDA includes).
#include <cstddef>
#include <cstdint>

#include "ftune/kernels/cuda_device.hpp"

namespace ftune::cuda {

struct AttentionShape {
  int64_t num_tokens = 0;   // N
  int64_t num_seqs = 0;
  int64_t max_seqlen = 0;   // longest sequence (host-side, for grid sizing)
  int Hq = 0, Hkv = 0, d = 0;
};

// Flash attention (online softmax, bf16 tensor-core MMA, fp32 accumulation), head_dim 64
// or 128; never materialises the score matrix. Hopper warpgroup-MMA kernels on compute
// capability 9.0 when the build carries sm_90a code, mma.sync ones elsewhere (sm_80+);
// FTUNE_FA_FWD / FTUNE_FA_BWD pick a tile variant (src/kernels/cuda/attention_flash_*.cu).
void flash_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                             const int64_t* seq_start, const AttentionShape& s, stream_t stream);
// Bytes of device workspace flash_attention_backward needs (e.g. fp32 dq accumulators, D).
size_t flash_attention_backward_workspace(const AttentionShape& s);
void flash_attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
                              const float* lse, const bf16* q, const bf16* k, const bf16* v,
                              const int64_t* seq_start, const AttentionShape& s, void* workspace,
                              stream_t stream);

// The reference path for `flash_attn = false`: straightforward kernels that materialise
// one row of scores at a time in fp32 (any head_dim <= 256). Same outputs and lse layout.
void naive_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                             const int64_t* seq_start, const AttentionShape& s, stream_t stream);
void naive_attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
                              const float* lse, const bf16* q, const bf16* k, const bf16* v,
                              const int64_t* seq_start, const AttentionShape& s, stream_t stream);

}  // namespace ftune::cuda
