#pragma once
// model module: ZeRO-3 for the frozen base weights (zero_stage = 3). A decoder layer's tensors
// are one contiguous span of the flat model (BaseWeights::layout), of the same size in every
// layer. Rank r of W keeps only its shard of every layer's span; a layer is all-gathered just
// before it is used and dropped when the next one is. Per-rank layer memory falls as 1/W.
//   - Zero3LayerLayout: where each layer's span lies and the views into a gathered layer.
//     (The CUDA backend shards its own converted layer blocks, in bytes: device_weights.cuh.)
//   - Zero3Weights: the CPU backend's sharded model. Each rank reads its shards from the
//     WeightSource (one layer in host memory at a time), so no rank holds the whole model.
// Embeddings, the final norm and lm_head stay whole on every rank (DeepSpeed shards them
// too; here they are used by every micro-step's first and last operation, and for LoRA on
// a 70B model they are 4% of the weights).
// Gathers are collectives: every rank must use the same layers in the same order (the
// trainer runs the same number of micro-batches on every rank, evaluation included).
#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "ftune/model/weight_source.hpp"

namespace ftune {

struct Zero3LayerLayout {
  size_t span = 0;   // floats per layer
  size_t first = 0;  // layer 0's first element in the flat model; the layers follow back to back
  size_t begin(int64_t l) const { return first + static_cast<size_t>(l) * span; }
  // Each view's offset in floats from its layer's first element; kAbsent where the model
  // has no such tensor (biases, q/k norms).
  static constexpr size_t kAbsent = static_cast<size_t>(-1);
  struct Offsets {
    size_t input_norm = kAbsent, q_norm = kAbsent, k_norm = kAbsent, post_norm = kAbsent;
    std::array<size_t, kNumProj> w{}, b{};
  } offsets;
  // The views of a gathered layer whose first element is at base.
  LayerWeights view(const float* base) const;
};
Zero3LayerLayout zero3_layer_layout(const ModelConfig& c);

// Collective: each rank passes its shard_range(full.size(), rank, size) of layer `layer`'s
// span and every rank ends with the whole span (Communicator::all_gather; the layer index
// is for gathers that do not talk, such as tests simulating ranks).
using ShardGather =
    std::function<void(int layer, std::span<const float> shard, std::span<float> full)>;

class Zero3Weights {
 public:
  // quant_bits 8 / 4: the layers' projections are replaced by their int8 / NF4 round trip
  // before sharding, exactly as load_in_8bit / 4bit do to materialised weights.
  Zero3Weights(const WeightSource& src, int rank, int size, ShardGather gather,
               int quant_bits = 0);
  const ModelConfig& config() const { return cfg_; }
  const float* embed() const { return embed_.data(); }
  const float* final_norm() const { return final_norm_.data(); }
  const float* lm_head() const { return lm_head_.empty() ? embed_.data() : lm_head_.data(); }
  // Layer l's views, gathered if it is not the layer gathered last (a collective then).
  const LayerWeights& layer(int l);
  // This rank's shard of layer l (for tests).
  std::span<const float> shard(int l) const;
  // Bytes of weights this rank holds: whole tensors, its shards and the gather buffer.
  size_t bytes() const;
  int64_t gathers() const { return gathers_; }

 private:
  ModelConfig cfg_;
  Zero3LayerLayout layout_;
  int rank_, size_;
  ShardGather gather_;
  std::vector<float> embed_, final_norm_, lm_head_;
  std::vector<std::vector<float>> shards_;
  std::vector<float> gathered_;
  LayerWeights view_;
  int gathered_layer_ = -1;
  int64_t gathers_ = 0;
};

}  // namespace ftune
