#pragma once
// model module (CUDA backend): the GPU twin of CpuTransformer. Same decoder, same LoRA
// semantics, same dropout masks (seeded per (seed, layer, projection) exactly as the CPU
// does), different numerics:
//   - frozen base weights, norms and biases in bf16 on the device (converted once, here);
//   - activations bf16, every product and row op accumulating in fp32, one rounding per
//     output; RMSNorm statistics, attention lse and the loss in fp32;
//   - LoRA A/B enter the products as bf16 copies; their gradients accumulate in fp32.
// Two ways in: the TrainBackend interface (host adapter in, host gradients out: a PCIe round
// trip of the adapter per micro-batch, kept for tests and evaluation of host adapters), and
// the *_on_device pair the trainer uses, where the adapter's bf16 copy and the fp32
// gradient accumulator already live on this GPU (src/train/cuda_step.cpp keeps them there
// with the optimizer) and only the per-row losses come back.
// Plain C++ header (no CUDA includes); implemented in src/model/cuda/*.cu.
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "ftune/kernels/cuda_device.hpp"
#include "ftune/model/backend.hpp"
#include "ftune/model/weight_source.hpp"

namespace ftune {

class CudaTransformer final : public TrainBackend {
 public:
  // gradient_checkpointing: keep each layer's input only and recompute the layer during
  // backward. flash_attn: flash kernels (head_dim 64/128; other head dims fall back to the
  // naive kernels, see uses_flash()); false = the naive reference kernels.
  // quant_bits 8 (load_in_8bit) or 4 (load_in_4bit, NF4): the projection weights live on
  // the device quantised (kernels/cpu_quant.hpp) and each layer is dequantised to bf16 just
  // before its products (one layer's bf16 copy at a time).
  // offload_param (offload_param = "cpu"): the projection weights (bf16 or quantised) stay
  // in pinned host memory; each layer is copied in on a side stream while the previous one
  // computes (two layers on the device at a time). Same values, same results.
  // The weights are read from `weights` tensor by tensor while constructing (host memory
  // holds one slice or one matrix at a time) and not used afterwards.
  // zero_stage = 3: each rank keeps 1/size of every layer's projection block (on the GPU, or
  // with offload_param in pinned host memory) and gathers a layer from all ranks just before
  // it is used, the next one on a side stream while the current one computes. Embeddings,
  // norms, biases and lm_head stay whole. Every call is then collective: all ranks make the
  // same calls in the same order (an empty micro-batch still gathers).
  struct LayerSharding {
    int rank = 0, size = 1;
    // Collective, enqueued on `stream`: every rank sends `bytes` from `send`; recv
    // (size * bytes) receives rank r's at r * bytes; in place when send == recv + rank *
    // bytes. Unused (may be empty) when size == 1.
    std::function<void(const void* send, void* recv, size_t bytes, cuda::stream_t stream)>
        all_gather;
  };
  CudaTransformer(const WeightSource& weights, bool gradient_checkpointing, bool flash_attn,
                  int device = 0, int quant_bits = 0, bool offload_param = false,
                  const LayerSharding* zero3 = nullptr);
  CudaTransformer(const BaseWeights& weights, bool gradient_checkpointing, bool flash_attn,
                  int device = 0, int quant_bits = 0, bool offload_param = false);
  // Full fine-tuning (use_peft = false): the "adapter" is the whole model
  // (full_model_as_adapter: no LoRA slots, params in BaseWeights::layout order). The backend
  // holds no weights: every call reads them from the bf16 parameter copy it is given
  // (params16, or the uploaded adapter on the TrainBackend path) and adds the gradient of
  // every weight (embeddings, norms, projections, biases, lm_head; tied once) into grads.
  struct FullFineTuning {};
  CudaTransformer(const ModelConfig& config, bool gradient_checkpointing, bool flash_attn,
                  int device, FullFineTuning);
  bool full_finetuning() const;
  // ZeRO-3 full fine-tuning (zero_stage = 3, use_peft = false), on a FullFineTuning
  // backend: this rank keeps only its range shard_range(n, rank, size) of the parameter
  // vector, and the *_on_device calls then take that range's bf16 copy and fp32 gradient
  // (params16, grads32). Each block (embedding table, layer, final norm + untied lm_head)
  // is gathered into a device slot (from each owner: `broadcast`, in rank order) on a side
  // stream, the next layer while this one computes (two layer slots), and its gradient,
  // formed in a block-sized scratch, is summed over ranks (`all_reduce_sum`) and added to
  // the owners' range on that side stream while the next layer's backward computes. Every
  // call is then collective (an empty micro-batch still gathers and flushes, in the same
  // order). Both collectives enqueue on the stream they are given (the side stream, which
  // the step's own work on stream() never overlaps); they may be empty when size == 1.
  struct FullSharding {
    int rank = 0, size = 1;
    std::function<void(void* data, size_t bytes, int root, cuda::stream_t stream)> broadcast;
    std::function<void(float* data, size_t n, cuda::stream_t stream)> all_reduce_sum;
  };
  void shard_full_finetuning(FullSharding sharding);
  // The owned parameters changed (an optimizer step): the gathered blocks are stale.
  void drop_gathered();
  size_t full_sharding_bytes() const;  // the block slots and their gradient scratch
  ~CudaTransformer() override;
  CudaTransformer(const CudaTransformer&) = delete;
  CudaTransformer& operator=(const CudaTransformer&) = delete;

  std::string name() const override;  // "cuda:0 (NVIDIA H200)"
  LossSum forward_backward(const MicroBatch& mb, const LoraAdapter& adapter, float* grads,
                           float loss_scale, uint64_t dropout_seed) override;
  LossSum forward_loss(const MicroBatch& mb, const LoraAdapter& adapter) override;

  // Device-resident variants (LoRA, or full fine-tuning when constructed for it).
  // params16: bf16 copy of the adapter's parameters on this GPU,
  // in `layout`'s order (layout.params is not read); grads32 (fp32, same order) is added
  // to, not overwritten, so micro-batches accumulate. Work runs on stream(); the call
  // returns after that stream synchronized (the loss is known), so the accumulator is
  // complete on return.
  LossSum forward_backward_on_device(const MicroBatch& mb, const LoraAdapter& layout,
                                     const cuda::bf16* params16, float* grads32,
                                     float loss_scale, uint64_t dropout_seed);
  LossSum forward_loss_on_device(const MicroBatch& mb, const LoraAdapter& layout,
                                 const cuda::bf16* params16);
  int device() const;
  cuda::stream_t stream() const;

  bool uses_flash() const;
  // Selective recompute (selective_recompute = true): under gradient checkpointing also keep
  // each layer's residual after attention (x + o(attn), one [tokens, hidden] bf16 tensor
  // per layer), so the backward's recompute skips the o projection and its add. Same
  // values bit for bit; more memory, less time. Takes effect from the next micro-batch.
  void set_selective_recompute(bool on);
  // Most device memory this backend has held at once (weights, adapter copies, activation
  // arena, workspaces), in bytes; cuBLASLt's own handle state and the CUDA context excluded.
  size_t peak_bytes() const;
  // Device bytes of the frozen weights this rank holds (ZeRO-3: its shards), the streaming
  // slots excluded; and whether the layers are sharded.
  size_t weight_bytes() const;
  bool sharded() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ftune
