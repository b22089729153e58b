// ZeRO-3's sharded base layers on the CPU backend: layout, loading of this rank's shards,
// and the just-in-time gather of a layer.
#include "ftune/model/zero3_weights.hpp"

#include <algorithm>
#include <stdexcept>

#include "ftune/dist/shard_range.hpp"
#include "ftune/model/quantize.hpp"

namespace ftune {

Zero3LayerLayout zero3_layer_layout(const ModelConfig& c) {
  Zero3LayerLayout z;
  const std::vector<BaseWeights::Entry> entries = BaseWeights::layout(c);
  // Layer 0's extent; every layer must then sit at begin(l) with its tensors in the same order.
  size_t end0 = 0;
  bool seen = false;
  for (const auto& e : entries)
    if (e.layer == 0) {
      if (!seen) z.first = e.offset;
      seen = true;
      end0 = e.offset + e.numel();
    }
  z.span = end0 - z.first;
  for (const auto& e : entries)
    if (e.layer >= 0 &&
        (e.offset < z.begin(e.layer) || e.offset + e.numel() > z.begin(e.layer) + z.span))
      throw std::logic_error("zero3_layer_layout: layers are not laid out back to back");
  // Layer 0's views, relative to its first element (every layer is laid out alike).
  Zero3LayerLayout::Offsets& o = z.offsets;
  o.w.fill(Zero3LayerLayout::kAbsent);
  o.b.fill(Zero3LayerLayout::kAbsent);
  for (const auto& e : entries) {
    if (e.layer != 0) continue;
    const size_t at = e.offset - z.first;
    const int pi = static_cast<int>(e.proj);
    switch (e.kind) {
      case BaseWeights::Kind::input_norm: o.input_norm = at; break;
      case BaseWeights::Kind::proj_weight: o.w[pi] = at; break;
      case BaseWeights::Kind::proj_bias: o.b[pi] = at; break;
      case BaseWeights::Kind::q_norm: o.q_norm = at; break;
      case BaseWeights::Kind::k_norm: o.k_norm = at; break;
      case BaseWeights::Kind::post_norm: o.post_norm = at; break;
      default: break;
    }
  }
  return z;
}

LayerWeights Zero3LayerLayout::view(const float* base) const {
  auto at = [&](size_t off) -> const float* { return off == kAbsent ? nullptr : base + off; };
  LayerWeights L;
  L.input_norm = at(offsets.input_norm);
  for (int p = 0; p < kNumProj; ++p) {
    L.w[p] = at(offsets.w[p]);
    L.b[p] = at(offsets.b[p]);
  }
  L.q_norm = at(offsets.q_norm);
  L.k_norm = at(offsets.k_norm);
  L.post_norm = at(offsets.post_norm);
  return L;
}

Zero3Weights::Zero3Weights(const WeightSource& src, int rank, int size, ShardGather gather,
                           int quant_bits)
    : cfg_(src.config()), layout_(zero3_layer_layout(src.config())), rank_(rank), size_(size),
      gather_(std::move(gather)) {
  if (!gather_ && size_ > 1) throw std::invalid_argument("Zero3Weights: no gather for " +
                                                         std::to_string(size_) + " ranks");
  const auto& entries = src.entries();
  for (size_t t = 0; t < entries.size(); ++t) {
    const auto& e = entries[t];
    std::vector<float>* whole = e.kind == BaseWeights::Kind::embed        ? &embed_
                                : e.kind == BaseWeights::Kind::final_norm ? &final_norm_
                                : e.kind == BaseWeights::Kind::lm_head    ? &lm_head_
                                                                          : nullptr;
    if (!whole) continue;
    whole->resize(e.numel());
    src.read(t, 0, e.numel(), whole->data());
  }
  // One layer at a time: read it whole (the quantisation round trip needs whole rows), keep
  // this rank's shard.
  const ShardRange own = shard_range(layout_.span, rank_, size_);
  std::vector<float> layer(layout_.span);
  shards_.resize(cfg_.num_hidden_layers);
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
    const size_t begin = layout_.begin(l);
    for (size_t t = 0; t < entries.size(); ++t)
      if (entries[t].layer == l)
        src.read(t, 0, entries[t].numel(), layer.data() + (entries[t].offset - begin));
    LayerWeights v = layout_.view(layer.data());
    apply_quant_roundtrip(cfg_, v, quant_bits);
    shards_[l].assign(layer.begin() + own.begin, layer.begin() + own.end);
  }
  gathered_.resize(layout_.span);
  view_ = layout_.view(gathered_.data());  // the buffer never moves: one set of views
}

const LayerWeights& Zero3Weights::layer(int l) {
  if (l < 0 || l >= cfg_.num_hidden_layers)
    throw std::out_of_range("Zero3Weights::layer: no layer " + std::to_string(l));
  if (l == gathered_layer_) return view_;
  if (size_ == 1)
    std::copy(shards_[l].begin(), shards_[l].end(), gathered_.begin());
  else
    gather_(l, shards_[l], gathered_);
  gathered_layer_ = l;
  ++gathers_;
  return view_;
}

std::span<const float> Zero3Weights::shard(int l) const { return shards_.at(l); }

size_t Zero3Weights::bytes() const {
  size_t n = embed_.size() + final_norm_.size() + lm_head_.size() + gathered_.size();
  for (const auto& s : shards_) n += s.size();
  return n * sizeof(float);
}

}  // namespace ftune
