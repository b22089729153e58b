// LoRA adapter layout and PEFT-compatible initialisation.
#include "ftune/model/lora.hpp"

#include <cmath>
#include <random>
#include <stdexcept>

namespace ftune {

float LoraSpec::scale() const {
  return static_cast<float>(use_rslora ? alpha / std::sqrt(static_cast<double>(rank))
                                       : alpha / rank);
}

std::array<bool, kNumProj> LoraSpec::parse_targets(const std::vector<std::string>& names) {
  std::array<bool, kNumProj> t{};
  if (names.empty()) throw std::runtime_error("target_modules is empty");
  for (const std::string& n : names) {
    if (n == "all" || n == "all-linear" || n == "all_linear") {
      t.fill(true);
      continue;
    }
    Proj p;
    if (!proj_from_name(n, &p))
      throw std::runtime_error("target_modules: unknown module '" + n +
                               "' (expected all, q_proj, k_proj, v_proj, o_proj, gate_proj, "
                               "up_proj or down_proj)");
    t[static_cast<int>(p)] = true;
  }
  return t;
}

std::vector<std::string> LoraSpec::target_names() const {
  std::vector<std::string> out;
  for (Proj p : kAllProj)
    if (targets[static_cast<int>(p)]) out.push_back(proj_name(p));
  return out;
}

void LoraAdapter::allocate(const ModelConfig& m, const LoraSpec& s) {
  if (s.rank <= 0) throw std::runtime_error("lora_rank must be positive");
  model = m;
  spec = s;
  slots.clear();
  slot_of.assign(m.num_hidden_layers * kNumProj, -1);
  size_t total = 0;
  for (int l = 0; l < m.num_hidden_layers; ++l) {
    for (Proj p : kAllProj) {
      if (!s.targets[static_cast<int>(p)]) continue;
      LoraSlot slot{l, p, proj_in_features(m, p), proj_out_features(m, p), 0, 0};
      slot.a_offset = total;
      total += static_cast<size_t>(s.rank * slot.in);
      slot.b_offset = total;
      total += static_cast<size_t>(slot.out * s.rank);
      slot_of[l * kNumProj + static_cast<int>(p)] = static_cast<int>(slots.size());
      slots.push_back(slot);
    }
  }
  params.assign(total, 0.0f);
}

void LoraAdapter::init_peft_default(uint64_t seed) {
  // PEFT: nn.init.kaiming_uniform_(A, a=sqrt(5)) -> U(-b, b), b = sqrt(6/((1+a^2) fan_in))
  // = 1/sqrt(fan_in); B = 0, so the adapter starts as the identity change.
  std::mt19937_64 rng(seed);
  for (const LoraSlot& s : slots) {
    const float bound = 1.0f / std::sqrt(static_cast<float>(s.in));
    std::uniform_real_distribution<float> U(-bound, bound);
    float* A = params.data() + s.a_offset;
    for (int64_t i = 0; i < spec.rank * s.in; ++i) A[i] = U(rng);
    std::fill_n(params.data() + s.b_offset, s.out * spec.rank, 0.0f);
  }
}

std::string LoraAdapter::peft_key(int layer, Proj p, char which) {
  return "base_model.model.model.layers." + std::to_string(layer) + "." + proj_parent(p) + "." +
         proj_name(p) + ".lora_" + std::string(1, which) + ".weight";
}

}  // namespace ftune
