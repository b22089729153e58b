#pragma once
// train module (CUDA backend): the AdamW state of one contiguous range of a parameter
// vector on the GPU (the range this rank updates: all of it at ZeRO 0, its chunk at 1/2,
// its shard_range at ZeRO-3 full fine-tuning): the two moments, the step count, the runs
// of equal weight decay of full fine-tuning's mask, the gradient norm and clip coefficient
// (device scalars), the update, and the moments' way in and out of checkpoints. Shared by the GPU step runners (cuda_step_runner.cpp,
// cuda_zero3_full_step_runner.cpp), which own the masters and gradients themselves.
#if FTUNE_HAVE_CUDA

#include <cstdint>
#include <span>
#include <vector>

#include "ftune/dist/shard_range.hpp"
#include "ftune/kernels/cuda_device.hpp"
#include "ftune/train/checkpoint.hpp"
#include "ftune/train/optimizer.hpp"

namespace ftune {

class CudaAdamWState {
 public:
  CudaAdamWState(ShardRange owned, const AdamWHyper& h);

  // decays: one flag per parameter of the whole vector (full fine-tuning's exemptions,
  // full_finetune_decay_mask); the runs within the owned range are kept. Without a mask
  // every parameter decays.
  void set_decay_mask(std::span<const uint8_t> decays);
  // A step, in three calls on one stream: the squared norm of grad[0, n) into a device
  // scalar (deterministic order; the caller all-reduces it over ranks if it holds part of
  // the gradient), the clip coefficient from it, then AdamW over the owned range (master and
  // grad point at its first element, the parameter owned.begin), scaled by the coefficient.
  float* squared_norm(const float* grad, int64_t n, cuda::stream_t stream);
  void clip(double max_grad_norm, cuda::stream_t stream);
  void update(float* master, const float* grad, double lr, cuda::stream_t stream);
  // The norm clip() saw, copied back once the stream gets there (waits).
  float norm_on_host(cuda::stream_t stream) const;

  int64_t steps() const { return steps_; }
  // out.m, out.v and out.step for the range e (within the owned range); waits for them.
  void export_moments(OptimizerShard& out, ShardRange e, cuda::stream_t stream) const;
  // The moments and step count of a shard of exactly the owned range (else throws).
  void import_moments(const OptimizerShard& sh, cuda::stream_t stream);

 private:
  struct DecayRun {
    size_t begin, end;  // parameter indices, within the owned range
    bool decays;
  };
  ShardRange owned_;
  AdamWHyper hyper_;
  cuda::DeviceBuffer m_, v_;
  cuda::DeviceBuffer scalars_, reduce_ws_;  // squared norm, norm, clip coefficient; workspace
  int64_t steps_ = 0;
  std::vector<DecayRun> runs_;  // empty: every parameter decays
};

}  // namespace ftune

#endif  // FTUNE_HAVE_CUDA
