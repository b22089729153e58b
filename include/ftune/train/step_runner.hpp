#pragma once
// train module: where the adapter, its gradient accumulator and the optimizer state live
// while training, and how one optimizer step is done over them.
//   host runner: host vectors and ZeroAdamW over the bootstrap Communicator; works with any
//                backend through TrainBackend's host interface (the CPU reference backend);
//   CUDA runner: everything on the GPU of a CudaTransformer; gradients reduced with NCCL,
//                AdamW, norm and clipping as kernels (src/train/cuda_step_runner.cpp).
// Both implement the ZeRO stages of zero_optimizer.hpp. The trainer picks the CUDA runner
// for a CUDA backend when the world is one rank or NCCL is built in, unless
// offload_optimizer = "cpu" (Adam moments and fp32 master weights in host memory: the host
// runner over the CUDA backend's host interface) or FTUNE_HOST_OPTIMIZER=1 (a cross-check).
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "ftune/dist/communicator.hpp"
#include "ftune/model/backend.hpp"
#include "ftune/train/checkpoint.hpp"
#include "ftune/train/optimizer.hpp"
#if FTUNE_HAVE_CUDA
#include "ftune/model/transformer_cuda.hpp"
#endif

namespace ftune {

class StepRunner {
 public:
  virtual ~StepRunner() = default;
  virtual std::string describe() const = 0;  // "host AdamW, ZeRO 1" / "GPU AdamW, NCCL ..."
  // Adds the gradient of loss_scale * (sum of token cross-entropies of mb).
  virtual LossSum accumulate(const MicroBatch& mb, float loss_scale, uint64_t dropout_seed) = 0;
  virtual LossSum evaluate(const MicroBatch& mb) = 0;
  // Sums the accumulated gradients over ranks, clips them to max_grad_norm (global norm,
  // torch's coefficient), takes one AdamW step at lr and clears the accumulator. Returns
  // the pre-clip norm. The host adapter's params are refreshed only by params_to_host().
  virtual double step(double lr, double max_grad_norm) = 0;
  // Copies the current parameters into adapter.params (checkpoints, the final adapter).
  virtual void params_to_host(LoraAdapter& adapter) = 0;
  // Takes adapter.params as the current parameters (after a resume rewrote them).
  virtual void params_from_host(const LoraAdapter& adapter) = 0;
  // The range of the parameter vector whose optimizer state this rank keeps (stage 0: all).
  virtual ShardRange owned() const = 0;
  virtual size_t state_bytes() const = 0;  // Adam moments + master weights held by this rank
  // This rank's part of an optimizer checkpoint: moments and master weights of a range; the
  // ranges of all ranks tile the vector once. `params`: the current full parameters.
  virtual OptimizerShard export_shard(std::span<const float> params) = 0;
  // Restores moments and the step count of owned(), and writes the shard's master weights
  // into params[owned()] (the caller gathers the rest, then calls params_from_host).
  virtual void import_shard(const OptimizerShard& s, std::span<float> params) = 0;
  // Weight decay only where decays[i] != 0 (full fine-tuning's exemptions). The host runner
  // implements it; the GPU runner (LoRA, decay everywhere) refuses.
  virtual void set_decay_mask(std::span<const uint8_t> decays);
};

// adapter must outlive the runner (the host runner updates adapter.params in place).
std::unique_ptr<StepRunner> make_step_runner(TrainBackend& model, LoraAdapter& adapter,
                                             int zero_stage, Communicator& comm,
                                             const AdamWHyper& hyper,
                                             bool offload_optimizer = false);

// The two implementations, for tests that want one in particular.
std::unique_ptr<StepRunner> make_host_step_runner(TrainBackend& model, LoraAdapter& adapter,
                                                  int zero_stage, Communicator& comm,
                                                  const AdamWHyper& hyper);
// Throws unless `model` is a CudaTransformer and (comm.size() == 1 or NCCL is built in).
std::unique_ptr<StepRunner> make_cuda_step_runner(TrainBackend& model, LoraAdapter& adapter,
                                                  int zero_stage, Communicator& comm,
                                                  const AdamWHyper& hyper);
// offload_optimizer = "cpu" on a GPU: masters and moments on the host (ZeroAdamW), the bf16
// copy and the gradient accumulator on the GPU; one transfer each way per optimizer step.
// Throws unless `model` is a CudaTransformer.
std::unique_ptr<StepRunner> make_cuda_offload_step_runner(TrainBackend& model,
                                                          LoraAdapter& adapter, int zero_stage,
                                                          Communicator& comm,
                                                          const AdamWHyper& hyper);

// zero_stage = 3 with use_peft = false on the CPU backend (src/train/zero3_full_step_runner.cpp):
// the runner owns the model too. full_model: full_model_as_adapter's vector, of which this
// rank keeps its shard_range (the caller may free the vector afterwards). Every call is
// collective. params_to_host gathers the whole vector on every rank.
std::unique_ptr<StepRunner> make_zero3_full_step_runner(const LoraAdapter& full_model,
                                                        Communicator& comm,
                                                        const AdamWHyper& hyper,
                                                        bool gradient_checkpointing);
#if FTUNE_HAVE_CUDA
// The same on the CUDA backend (a FullFineTuning CudaTransformer): masters, bf16 copy,
// gradient and moments of this rank's range on its GPU, the blocks gathered by the backend.
// Several ranks: NCCL (its own communicator). `sharding` (tests): given collectives.
std::unique_ptr<StepRunner> make_cuda_zero3_full_step_runner(TrainBackend& model,
                                                             const LoraAdapter& full_model,
                                                             Communicator& comm,
                                                             const AdamWHyper& hyper);
std::unique_ptr<StepRunner> make_cuda_zero3_full_step_runner(
    TrainBackend& model, const LoraAdapter& full_model, Communicator& comm,
    const AdamWHyper& hyper, CudaTransformer::FullSharding sharding);
// ... with offload_optimizer = "cpu": this rank's range of masters and moments in host
// memory, its bf16 copy and gradient on the GPU (the offload runner's streamed step over the
// range; the squared norm all-reduced over `comm`). full_model's params are read once; its
// spec and shape serve as the layout while training.
std::unique_ptr<StepRunner> make_cuda_zero3_offload_full_step_runner(TrainBackend& model,
                                                                     LoraAdapter& full_model,
                                                                     Communicator& comm,
                                                                     const AdamWHyper& hyper);
std::unique_ptr<StepRunner> make_cuda_zero3_offload_full_step_runner(
    TrainBackend& model, LoraAdapter& full_model, Communicator& comm, const AdamWHyper& hyper,
    CudaTransformer::FullSharding sharding);
// The NCCL collectives (a communicator of their own) both ZeRO-3 full fine-tuning runners
// give the backend over several ranks; no collectives on one.
CudaTransformer::FullSharding nccl_full_sharding(Communicator& comm);
#endif
// Host bytes of model state (shards, gathered blocks, gradient scratch) such a runner holds
// on this rank; 0 for other runners.
size_t zero3_full_bytes(const StepRunner& runner);

}  // namespace ftune
