#pragma once
// model module: ZeRO-3 for full fine-tuning (use_peft = false, zero_stage = 3) on the CPU
// backend. The trained vector (BaseWeights::layout order) is partitioned as the ZeRO-1/2
// optimizer partitions it: rank r of W owns shard_range(n, r, W), its fp32 masters and the
// gradient accumulator of that range, and nothing else. The model is used block by block
// (the embedding table, each decoder layer, the tail: final norm and untied lm_head): a
// block is gathered from its owners just before use (one broadcast per owner), and its
// gradient, formed in a block-sized scratch, is summed over ranks and added to the owners'
// accumulators right after the block's backward. Per-rank memory: the shard (params,
// gradients) plus one layer, the embedding table and the tail, instead of the model 3 times.
// Every gather and flush is a collective: all ranks make the same calls in the same order
// (CpuTransformer runs the same sequence for an empty micro-batch).
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "ftune/dist/shard_range.hpp"
#include "ftune/model/weights.hpp"
#include "ftune/model/zero3_weights.hpp"

namespace ftune {

struct Zero3Collectives {
  // Every rank passes a buffer of the same size; root's values end up in all of them.
  std::function<void(std::span<float> data, int root)> broadcast;
  // Every rank ends with the element-wise sum over ranks, the same bits everywhere.
  std::function<void(std::span<float> data)> all_reduce_sum;
};

class Zero3TrainedWeights {
 public:
  // params: the whole vector (the trainer's starting model); only this rank's shard is kept.
  // The collectives may be empty when size == 1.
  Zero3TrainedWeights(const ModelConfig& c, int rank, int size, Zero3Collectives coll,
                      std::span<const float> params);
  const ModelConfig& config() const { return cfg_; }
  size_t num_params() const { return n_; }
  ShardRange owned() const { return owned_; }
  std::span<float> params() { return params_; }  // the owned masters, updated by the optimizer
  std::span<float> grads() { return grads_; }    // the owned accumulator
  // The owned params changed (an optimizer step, a resume): gathered copies are stale.
  void invalidate();

  // Views of a gathered block; each gathers unless that block is the one held (collective).
  const LayerWeights& layer(int l);
  const float* embed();
  const float* final_norm();
  const float* lm_head();  // the embedding table when tied
  // The gradient scratch of a weight inside a gathered block.
  float* grad_of(const float* weight);
  // Sum a block's gradient scratch over ranks, add the owned part to grads(), clear it.
  void flush_layer(int l);
  void flush_tail();
  void flush_embed();

  size_t bytes() const;  // host bytes this rank holds: shard, gathered blocks, scratch

 private:
  void gather(size_t lo, std::span<float> block);
  void flush(size_t lo, std::span<float> scratch);

  ModelConfig cfg_;
  Zero3LayerLayout layout_;
  int rank_, size_;
  Zero3Collectives coll_;
  size_t n_;
  ShardRange owned_;
  std::vector<float> params_, grads_;
  size_t tail_begin_ = 0;
  std::vector<float> embed_, tail_, layer_;        // gathered blocks
  std::vector<float> embed_g_, tail_g_, layer_g_;  // their gradient scratch
  LayerWeights view_;
  int held_layer_ = -1;
  bool embed_held_ = false, tail_held_ = false;
};

}  // namespace ftune
