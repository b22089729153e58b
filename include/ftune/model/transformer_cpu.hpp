#pragma once
// model module: the CPU reference backend. Forward and hand-written backward of a
// Llama/Qwen decoder with LoRA on the seven projections, in fp32, on packed micro-batches.
// With LoRA only the adapter gets gradients (base weights frozen, no base weight gradient
// formed); forward_backward_full is full fine-tuning's micro-step (use_peft = false): the
// gradient of every base weight.
#include <cstdint>
#include <memory>
#include <vector>

#include "ftune/model/backend.hpp"
#include "ftune/model/batch.hpp"
#include "ftune/model/lora.hpp"
#include "ftune/model/weights.hpp"

namespace ftune {

class Zero3Weights;         // model/zero3_weights.hpp
class Zero3TrainedWeights;  // model/zero3_trained.hpp

class CpuTransformer final : public TrainBackend {
 public:
  // gradient_checkpointing: keep only each layer's input and recompute the layer's
  // activations during backward (same results, memory of one layer).
  CpuTransformer(const BaseWeights& weights, bool gradient_checkpointing);
  // ZeRO-3 (zero_stage = 3): the layers are this rank's shards, each gathered just before it
  // is used; the same results as the whole model. Every call is then collective: all ranks
  // make the same calls in the same order (an empty micro-batch still gathers). LoRA only.
  CpuTransformer(std::unique_ptr<Zero3Weights> shards, bool gradient_checkpointing);
  // ZeRO-3 full fine-tuning: every weight from the trained shards (gathered block by block;
  // must outlive this), and forward_backward_full's gradients go to their accumulator
  // (grads = nullptr). forward_backward (LoRA) is refused.
  CpuTransformer(Zero3TrainedWeights& shards, bool gradient_checkpointing);
  ~CpuTransformer() override;
  const Zero3Weights* zero3() const;  // null unless sharded

  std::string name() const override { return "cpu"; }

  // Adds to `grads` (same layout as adapter.params) the gradient of
  // loss_scale * (sum of token cross-entropies of mb). Dropout masks derive from
  // dropout_seed, so a step is reproducible.
  LossSum forward_backward(const MicroBatch& mb, const LoraAdapter& adapter, float* grads,
                           float loss_scale, uint64_t dropout_seed) override;
  // Loss only (evaluation: no dropout, no gradients).
  LossSum forward_loss(const MicroBatch& mb, const LoraAdapter& adapter) override;
  // Adds to `grads` (laid out like weights.storage: one float per stored weight, tied
  // embeddings once) the gradient of loss_scale * (sum of token cross-entropies of mb) with
  // respect to every base weight: embeddings, norms, projections and their biases, lm_head.
  LossSum forward_backward_full(const MicroBatch& mb, float* grads, float loss_scale);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The rotary inverse frequencies [head_dim/2] for a model (default, linear, llama3).
std::vector<double> rope_inv_freq(const ModelConfig& c);

}  // namespace ftune
