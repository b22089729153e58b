#pragma once
// model module: the LoRA adapter (trainable A/B pairs) with PEFT's semantics:
// y = W x + b + scale * B A dropout(x), A [r, in] kaiming-uniform(a=sqrt(5)), B [out, r] zeros,
// scale = alpha / r (alpha / sqrt(r) with rslora). Params live in one flat fp32 buffer so
// the optimizer, grad-norm and collectives see a single span.
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "ftune/model/model_config.hpp"
#include "ftune/model/weights.hpp"

namespace ftune {

struct LoraSpec {
  int rank = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  bool use_rslora = false;
  std::array<bool, kNumProj> targets{};  // which of the seven projections carry LoRA
  float scale() const;
  // "all" / "all-linear" or names of the seven projections; throws on unknown names.
  static std::array<bool, kNumProj> parse_targets(const std::vector<std::string>& names);
  std::vector<std::string> target_names() const;
};

struct LoraSlot {
  int layer;
  Proj proj;
  int64_t in, out;
  size_t a_offset;  // A: [rank, in]
  size_t b_offset;  // B: [out, rank]
};

struct LoraAdapter {
  LoraSpec spec;
  ModelConfig model;
  std::vector<LoraSlot> slots;
  std::vector<float> params;            // all A and B tensors
  std::vector<int> slot_of;             // [layer * kNumProj + proj] -> slot index or -1

  void allocate(const ModelConfig& m, const LoraSpec& s);   // zeros
  void init_peft_default(uint64_t seed);                    // A kaiming-uniform, B = 0
  const LoraSlot* slot(int layer, Proj p) const {
    int i = slot_of[layer * kNumProj + static_cast<int>(p)];
    return i < 0 ? nullptr : &slots[i];
  }
  // PEFT key, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
  static std::string peft_key(int layer, Proj p, char which /* 'A' or 'B' */);
};

}  // namespace ftune
