#pragma once
// model module: the CPU reference backend. Forward and hand-written backward of a
// Llama/Qwen decoder with LoRA on the seven projections, in fp32, on packed micro-batches.
// Only LoRA parameters get gradients: base weights are frozen, so no weight gradient of a
// base matrix is ever formed.
#include <cstdint>
#include <memory>
#include <vector>

#include "ftune/model/backend.hpp"
#include "ftune/model/batch.hpp"
#include "ftune/model/lora.hpp"
#include "ftune/model/weights.hpp"

namespace ftune {

class CpuTransformer final : public TrainBackend {
 public:
  // gradient_checkpointing: keep only each layer's input and recompute the layer's
  // activations during backward (same results, memory of one layer).
  CpuTransformer(const BaseWeights& weights, bool gradient_checkpointing);
  ~CpuTransformer() override;
  std::string name() const override { return "cpu"; }

  // Adds to `grads` (same layout as adapter.params) the gradient of
  // loss_scale * (sum of token cross-entropies of mb). Dropout masks derive from
  // dropout_seed, so a step is reproducible.
  LossSum forward_backward(const MicroBatch& mb, const LoraAdapter& adapter, float* grads,
                           float loss_scale, uint64_t dropout_seed) override;
  // Loss only (evaluation: no dropout, no gradients).
  LossSum forward_loss(const MicroBatch& mb, const LoraAdapter& adapter) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The rotary inverse frequencies [head_dim/2] for a model (default, linear, llama3).
std::vector<double> rope_inv_freq(const ModelConfig& c);

}  // namespace ftune
