// ZeRO-3 for full fine-tuning on the CPU backend (see zero3_trained.hpp): block gathers from
// the owners and the per-block gradient flush.
#include "ftune/model/zero3_trained.hpp"

#include <algorithm>
#include <stdexcept>

namespace ftune {

Zero3TrainedWeights::Zero3TrainedWeights(const ModelConfig& c, int rank, int size,
                                         Zero3Collectives coll, std::span<const float> params)
    : cfg_(c), layout_(zero3_layer_layout(c)), rank_(rank), size_(size), coll_(std::move(coll)) {
  const std::vector<BaseWeights::Entry> entries = BaseWeights::layout(c);
  n_ = BaseWeights::layout_size(entries);
  if (params.size() != n_)
    throw std::logic_error("Zero3TrainedWeights: " + std::to_string(params.size()) +
                           " parameters for a model of " + std::to_string(n_));
  if (size > 1 && (!coll_.broadcast || !coll_.all_reduce_sum))
    throw std::logic_error("Zero3TrainedWeights: several ranks need collectives");
  owned_ = shard_range(n_, rank, size);
  params_.assign(params.begin() + owned_.begin, params.begin() + owned_.end);
  grads_.assign(owned_.size(), 0.0f);
  tail_begin_ = layout_.begin(c.num_hidden_layers);
  embed_.resize(layout_.first);
  tail_.resize(n_ - tail_begin_);
  layer_.resize(layout_.span);
  embed_g_.assign(embed_.size(), 0.0f);
  tail_g_.assign(tail_.size(), 0.0f);
  layer_g_.assign(layer_.size(), 0.0f);
  view_ = layout_.view(layer_.data());
}

void Zero3TrainedWeights::invalidate() {
  held_layer_ = -1;
  embed_held_ = tail_held_ = false;
}

// block = the vector's [lo, lo + block.size()): each owner broadcasts its part of it, in
// rank order (the same calls on every rank).
void Zero3TrainedWeights::gather(size_t lo, std::span<float> block) {
  const size_t hi = lo + block.size();
  for (int r = 0; r < size_; ++r) {
    const ShardRange s = shard_range(n_, r, size_);
    const size_t b = std::max(lo, s.begin), e = std::min(hi, s.end);
    if (b >= e) continue;
    std::span<float> part = block.subspan(b - lo, e - b);
    if (r == rank_)
      std::copy(params_.begin() + (b - owned_.begin), params_.begin() + (e - owned_.begin),
                part.begin());
    if (size_ > 1) coll_.broadcast(part, r);
  }
}

void Zero3TrainedWeights::flush(size_t lo, std::span<float> scratch) {
  if (size_ > 1) coll_.all_reduce_sum(scratch);
  const size_t b = std::max(lo, owned_.begin), e = std::min(lo + scratch.size(), owned_.end);
  for (size_t i = b; i < e; ++i) grads_[i - owned_.begin] += scratch[i - lo];
  std::fill(scratch.begin(), scratch.end(), 0.0f);
}

const LayerWeights& Zero3TrainedWeights::layer(int l) {
  if (l < 0 || l >= cfg_.num_hidden_layers)
    throw std::out_of_range("Zero3TrainedWeights::layer " + std::to_string(l));
  if (l != held_layer_) {
    gather(layout_.begin(l), layer_);
    held_layer_ = l;
  }
  return view_;
}

const float* Zero3TrainedWeights::embed() {
  if (!embed_held_) {
    gather(0, embed_);
    embed_held_ = true;
  }
  return embed_.data();
}

const float* Zero3TrainedWeights::final_norm() {
  if (!tail_held_) {
    gather(tail_begin_, tail_);
    tail_held_ = true;
  }
  return tail_.data();
}

const float* Zero3TrainedWeights::lm_head() {
  if (cfg_.tie_word_embeddings) return embed();
  final_norm();  // the same block
  return tail_.data() + cfg_.hidden_size;
}

float* Zero3TrainedWeights::grad_of(const float* w) {
  auto inside = [w](const std::vector<float>& v) {
    return !v.empty() && w >= v.data() && w < v.data() + v.size();
  };
  if (inside(layer_)) return layer_g_.data() + (w - layer_.data());
  if (inside(embed_)) return embed_g_.data() + (w - embed_.data());
  if (inside(tail_)) return tail_g_.data() + (w - tail_.data());
  throw std::logic_error("Zero3TrainedWeights::grad_of: not a weight of a gathered block");
}

void Zero3TrainedWeights::flush_layer(int l) {
  if (l != held_layer_) throw std::logic_error("Zero3TrainedWeights: flush of a layer not held");
  flush(layout_.begin(l), layer_g_);
}
void Zero3TrainedWeights::flush_tail() { flush(tail_begin_, tail_g_); }
void Zero3TrainedWeights::flush_embed() { flush(0, embed_g_); }

size_t Zero3TrainedWeights::bytes() const {
  return sizeof(float) * (params_.size() + grads_.size() + 2 * (embed_.size() + tail_.size() +
                                                                layer_.size()));
}

}  // namespace ftune
