// Layout of the frozen base weights in one flat buffer, named as in HF checkpoints.
#include "ftune/model/weights.hpp"

#include <stdexcept>

namespace ftune {

const char* proj_name(Proj p) {
  static const char* names[kNumProj] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                        "gate_proj", "up_proj", "down_proj"};
  return names[static_cast<int>(p)];
}

const char* proj_parent(Proj p) { return static_cast<int>(p) <= 3 ? "self_attn" : "mlp"; }

bool proj_from_name(const std::string& name, Proj* out) {
  for (Proj p : kAllProj) {
    if (name == proj_name(p)) {
      *out = p;
      return true;
    }
  }
  return false;
}

int64_t proj_in_features(const ModelConfig& c, Proj p) {
  switch (p) {
    case Proj::o: return c.q_dim();
    case Proj::down: return c.intermediate_size;
    default: return c.hidden_size;
  }
}

int64_t proj_out_features(const ModelConfig& c, Proj p) {
  switch (p) {
    case Proj::q: return c.q_dim();
    case Proj::k:
    case Proj::v: return c.kv_dim();
    case Proj::o:
    case Proj::down: return c.hidden_size;
    default: return c.intermediate_size;
  }
}

size_t BaseWeights::Entry::numel() const {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

std::vector<BaseWeights::Entry> BaseWeights::layout(const ModelConfig& c) {
  if (c.hidden_size <= 0 || c.num_hidden_layers <= 0 || c.vocab_size <= 0 || c.head_dim <= 0)
    throw std::runtime_error("model config has non-positive sizes");
  std::vector<Entry> entries;
  size_t total = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, Kind kind, int64_t layer = -1,
                 Proj proj = Proj::q) {
    entries.push_back({std::move(name), total, std::move(shape), kind, layer, proj});
    total += entries.back().numel();
  };
  const int64_t H = c.hidden_size, V = c.vocab_size;
  add("model.embed_tokens.weight", {V, H}, Kind::embed);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    add(pre + "input_layernorm.weight", {H}, Kind::input_norm, l);
    for (Proj p : kAllProj) {
      const std::string base = pre + proj_parent(p) + "." + proj_name(p);
      add(base + ".weight", {proj_out_features(c, p), proj_in_features(c, p)}, Kind::proj_weight,
          l, p);
      if (c.attention_bias && (p == Proj::q || p == Proj::k || p == Proj::v))
        add(base + ".bias", {proj_out_features(c, p)}, Kind::proj_bias, l, p);
    }
    if (c.qk_norm) {
      add(pre + "self_attn.q_norm.weight", {c.head_dim}, Kind::q_norm, l);
      add(pre + "self_attn.k_norm.weight", {c.head_dim}, Kind::k_norm, l);
    }
    add(pre + "post_attention_layernorm.weight", {H}, Kind::post_norm, l);
  }
  add("model.norm.weight", {H}, Kind::final_norm);
  if (!c.tie_word_embeddings) add("lm_head.weight", {V, H}, Kind::lm_head);
  return entries;
}

std::vector<BaseWeights::Entry> BaseWeights::allocate(const ModelConfig& c) {
  std::vector<Entry> entries = layout(c);
  cfg = c;
  storage.assign(layout_size(entries), 0.0f);
  point_views(entries);
  return entries;
}

BaseWeights BaseWeights::adopt(const ModelConfig& c, std::vector<float>&& values) {
  const std::vector<Entry> entries = layout(c);
  if (values.size() != layout_size(entries))
    throw std::logic_error("BaseWeights::adopt: " + std::to_string(values.size()) +
                           " values for a model of " +
                           std::to_string(layout_size(entries)));
  BaseWeights w;
  w.cfg = c;
  w.storage = std::move(values);
  w.point_views(entries);
  return w;
}

void BaseWeights::point_views(const std::vector<Entry>& entries) {
  const ModelConfig& c = cfg;
  // Point the named views into storage. Entries were added in a fixed order, so walk them.
  layers.assign(c.num_hidden_layers, LayerWeights{});
  size_t i = 0;
  auto next = [&]() { return storage.data() + entries[i++].offset; };
  embed = next();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights& L = layers[l];
    L.input_norm = next();
    for (Proj p : kAllProj) {
      L.w[static_cast<int>(p)] = next();
      if (c.attention_bias && (p == Proj::q || p == Proj::k || p == Proj::v))
        L.b[static_cast<int>(p)] = next();
    }
    if (c.qk_norm) {
      L.q_norm = next();
      L.k_norm = next();
    }
    L.post_norm = next();
  }
  final_norm = next();
  lm_head = c.tie_word_embeddings ? embed : next();
}

}  // namespace ftune
