#pragma once
// model module: what the trainer needs from a backend (CPU reference or CUDA): one
// micro-batch's forward + backward into LoRA gradients, and a loss-only forward.
#include <cstdint>
#include <memory>
#include <string>

#include "ftune/model/batch.hpp"
#include "ftune/model/lora.hpp"
#include "ftune/model/weights.hpp"

namespace ftune {

struct LossSum {
  double loss_sum = 0;      // sum of token cross-entropies
  int64_t num_targets = 0;  // tokens that carried a loss
};

class TrainBackend {
 public:
  virtual ~TrainBackend() = default;
  virtual std::string name() const = 0;  // "cpu", "cuda:0 (NVIDIA H200)"
  // Adds to `grads` (host, same layout as adapter.params) the gradient of
  // loss_scale * (sum of token cross-entropies of mb). Dropout masks derive from dropout_seed.
  virtual LossSum forward_backward(const MicroBatch& mb, const LoraAdapter& adapter, float* grads,
                                   float loss_scale, uint64_t dropout_seed) = 0;
  // Loss only (evaluation: no dropout, no gradients).
  virtual LossSum forward_loss(const MicroBatch& mb, const LoraAdapter& adapter) = 0;
};

}  // namespace ftune
