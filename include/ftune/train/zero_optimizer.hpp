#pragma once
// train module: data-parallel AdamW with DeepSpeed-style ZeRO stages over the flat LoRA
// parameter vector.
//   stage 0: gradients all-reduced; every rank keeps the whole optimizer state.
//   stage 1: gradients all-reduced; Adam moments and fp32 master weights sharded, each rank
//            updates its shard, then the parameters are all-gathered.
//   stage 2: as stage 1, but gradients are reduce-scattered (each rank gets only its shard).
//   stage 3: the adapter as stage 2; what stage 3 adds, sharding the frozen base weights,
//            is the backend's (model/zero3_weights.hpp, the CUDA backend's layer gathers).
//            Full fine-tuning at stage 3 has its own runners (zero3_full_step_runner.cpp,
//            cuda_zero3_full_step_runner.cpp), whose shards are this class's stage-1/2 ranges.
// Optimizer-state memory per rank is 1/N of stage 0's for stages 1 to 3.
#include <cstdint>
#include <span>

#include "ftune/dist/communicator.hpp"
#include "ftune/train/checkpoint.hpp"
#include "ftune/train/optimizer.hpp"

namespace ftune {

class ZeroAdamW {
 public:
  ZeroAdamW(size_t num_params, int zero_stage, Communicator& comm, const AdamWHyper& hyper);

  // grads: this rank's summed gradient (full length; clobbered). On return `params` (full,
  // identical on every rank) hold the updated values. Returns the pre-clip global norm.
  double step(std::span<float> params, std::span<float> grads, double lr, double max_grad_norm);
  // step() in three phases, for a caller that moves updated pieces while others update
  // (the CUDA offload runner): begin_step reduces the gradients, forms the norm and clips
  // (collective; grads clobbered and kept for update, so it must outlive the step) and
  // returns the pre-clip norm; update applies AdamW to params[lo, hi) inside owned(), the
  // calls tiling owned() once; end_step all-gathers the parameters where the stage shards
  // them (collective). step() = begin_step + update(owned()) + end_step.
  double begin_step(std::span<float> grads, double max_grad_norm);
  void update(std::span<float> params, size_t lo, size_t hi, double lr);
  void end_step(std::span<float> params);
  // Whether end_step moves anything (stage > 0 over several ranks).
  bool gathers() const { return stage_ > 0 && comm_.size() > 1; }
  // One rank whose gradient is not in host memory as a whole (the CUDA offload runner
  // streams it from the GPU in chunks): begin_streamed_step takes the gradient's sum of
  // squares, formed in sum_of_squares' order, and returns the pre-clip norm; each
  // update_streamed clips `grads` (the gradient of params[lo, lo + grads.size())) and
  // applies AdamW there, the calls tiling the vector once; copy_to (if not null) also
  // receives the updated values. Same values as step().
  double begin_streamed_step(double sum_of_squares, double max_grad_norm);
  void update_streamed(std::span<float> params, size_t lo, std::span<const float> grads,
                       double lr, float* copy_to = nullptr);

  // Weight decay only where decays[i] != 0 (full length; default: everywhere).
  void set_decay_mask(std::span<const uint8_t> decays);
  ShardRange owned() const { return owned_; }   // the state this rank keeps
  size_t state_bytes() const;                    // m + v + master held by this rank
  int stage() const { return stage_; }
  OptimizerShard export_shard(std::span<const float> params) const;
  // Restores moments, master weights (into params) and the step from a checkpoint shard
  // covering owned(); params outside owned() must come from the adapter file.
  void import_shard(const OptimizerShard& s, std::span<float> params);

 private:
  void apply(std::span<float> params, size_t lo, std::span<const float> grads, double lr,
             float clip, std::span<float> copy_to);

  Communicator& comm_;
  int stage_;
  AdamWHyper hyper_;
  size_t n_;
  ShardRange owned_;
  AdamWState state_;  // moments for owned_
  std::vector<float> grad_shard_;
  std::vector<uint8_t> decays_;  // owned range; empty = decay everything
  std::span<float> g_;           // during a step: the clipped gradient of the owned range
  float clip_ = 1.0f;            // during a streamed step: the clipping coefficient (1: none)
};

}  // namespace ftune
