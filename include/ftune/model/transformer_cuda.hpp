#pragma once
// model module (CUDA backend): the GPU twin of CpuTransformer. Same decoder, same LoRA
// semantics, same dropout masks (seeded per (seed, layer, projection) exactly as the CPU
// does), different numerics:
//   - frozen base weights, norms and biases in bf16 on the device (converted once, here);
//   - activations bf16, every product and row op accumulating in fp32, one rounding per
//     output; RMSNorm statistics, attention lse and the loss in fp32;
//   - LoRA A/B enter the products as bf16 copies; their gradients accumulate in fp32.
// First version, interface-bound: each forward_backward uploads the adapter's fp32 params
// and downloads the LoRA gradients (host round trip of 2x params per micro-batch). That
// cost goes away once the optimizer runs on the GPU.
// Plain C++ header (no CUDA includes); implemented in src/model/cuda/*.cu.
#include <cstddef>
#include <memory>
#include <string>

#include "ftune/model/backend.hpp"
#include "ftune/model/weights.hpp"

namespace ftune {

class CudaTransformer final : public TrainBackend {
 public:
  // gradient_checkpointing: keep each layer's input only and recompute the layer during
  // backward. flash_attn: flash kernels (head_dim 64/128; other head dims fall back to the
  // naive kernels, see uses_flash()); false = the naive reference kernels.
  // `weights` must outlive the backend only for the constructor (everything is copied).
  CudaTransformer(const BaseWeights& weights, bool gradient_checkpointing, bool flash_attn,
                  int device = 0);
  ~CudaTransformer() override;
  CudaTransformer(const CudaTransformer&) = delete;
  CudaTransformer& operator=(const CudaTransformer&) = delete;

  std::string name() const override;  // "cuda:0 (NVIDIA H200)"
  LossSum forward_backward(const MicroBatch& mb, const LoraAdapter& adapter, float* grads,
                           float loss_scale, uint64_t dropout_seed) override;
  LossSum forward_loss(const MicroBatch& mb, const LoraAdapter& adapter) override;

  bool uses_flash() const;
  // Most device memory this backend has held at once (weights, adapter copies, activation
  // arena, workspaces), in bytes; cuBLASLt's own handle state and the CUDA context excluded.
  size_t peak_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

std::unique_ptr<TrainBackend> make_cuda_backend(const BaseWeights& weights,
                                                bool gradient_checkpointing, bool flash_attn,
                                                int device);

}  // namespace ftune
