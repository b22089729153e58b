#pragma once
// model module: frozen base weights of a decoder, as one flat fp32 buffer with
// named views (llm.c style). Loaded by io/hf_model.hpp, read by the backends.
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "ftune/model/model_config.hpp"

namespace ftune {

// The seven linear projections of a layer, in PEFT's "all-linear" order.
enum class Proj : int { q = 0, k, v, o, gate, up, down };
inline constexpr int kNumProj = 7;
inline constexpr std::array<Proj, kNumProj> kAllProj = {Proj::q, Proj::k, Proj::v, Proj::o,
                                                       Proj::gate, Proj::up, Proj::down};

const char* proj_name(Proj p);    // "q_proj", ...
const char* proj_parent(Proj p);  // "self_attn" or "mlp"
int64_t proj_in_features(const ModelConfig& c, Proj p);
int64_t proj_out_features(const ModelConfig& c, Proj p);
// "q_proj" -> Proj::q; false when the name is not one of the seven.
bool proj_from_name(const std::string& name, Proj* out);

struct LayerWeights {
  const float* input_norm = nullptr;          // [H]
  std::array<const float*, kNumProj> w{};     // [out, in] row-major, HF layout
  std::array<const float*, kNumProj> b{};     // bias [out] or nullptr (q/k/v only)
  const float* q_norm = nullptr;              // [head_dim] (qwen3) or nullptr
  const float* k_norm = nullptr;
  const float* post_norm = nullptr;           // [H]
};

struct BaseWeights {
  ModelConfig cfg;
  std::vector<float> storage;                 // owns every tensor below
  const float* embed = nullptr;               // [V, H]
  const float* final_norm = nullptr;          // [H]
  const float* lm_head = nullptr;             // [V, H]; == embed when tied
  std::vector<LayerWeights> layers;

  // What an HF tensor is in the model, so code that walks the layout (a backend converting
  // tensor by tensor) need not parse names.
  enum class Kind { embed, input_norm, proj_weight, proj_bias, q_norm, k_norm, post_norm,
                    final_norm, lm_head };
  // An HF tensor of the model: its name, shape and offset (in floats) into `storage`;
  // layer and proj where the kind has them.
  struct Entry {
    std::string name;
    size_t offset;
    std::vector<int64_t> shape;
    Kind kind = Kind::embed;
    int64_t layer = -1;
    Proj proj = Proj::q;
    size_t numel() const;
  };
  // The entries allocate(c) returns, in the same order, without allocating anything: for
  // code that walks the tensors of a model too large to hold (init-model writes 8B models).
  static std::vector<Entry> layout(const ModelConfig& c);
  // Values a layout spans (the flat vector's length): its last entry's end.
  static size_t layout_size(const std::vector<Entry>& entries) {
    return entries.empty() ? 0 : entries.back().offset + entries.back().numel();
  }
  // Lays out `storage` for cfg and points every view into it (values zeroed).
  // Returns the HF tensor names with their offsets/sizes, for loaders and writers.
  std::vector<Entry> allocate(const ModelConfig& c);
  // Weights whose storage is `values` (laid out as allocate(c) lays it out; moved in only
  // once its size matches): lends a parameter vector the named views without a copy (full
  // fine-tuning's saves).
  static BaseWeights adopt(const ModelConfig& c, std::vector<float>&& values);

 private:
  void point_views(const std::vector<Entry>& entries);
};

}  // namespace ftune

namespace ftune {
// Random initialisation as transformers does for a fresh model: linear and embedding
// weights ~ N(0, std), norms = 1, biases = 0. Used by `ftune init-model` and tests.
// One std::mt19937_64 sequence over the tensors in layout order, serial: existing models
// and tests depend on its exact values.
void init_random_weights(BaseWeights& w, uint64_t seed, double std);

// The same distribution from a counter-based generator (`init-model --fast_init true`):
// element i of layout tensor t is a pure function of (seed, t, i), so the fill runs in
// parallel (OpenMP) with the same values for any thread count, and any slice of any tensor
// can be made alone, without the rest of the model in memory. Values differ from
// init_random_weights.
void init_random_weights_fast(BaseWeights& w, uint64_t seed, double std);
// Elements [begin, begin + count) of tensor `e` = BaseWeights::layout(cfg)[tensor_index]
// into dst[0, count), exactly as init_random_weights_fast would set them.
void init_random_slice_fast(const BaseWeights::Entry& e, size_t tensor_index, uint64_t seed,
                            double std, size_t begin, size_t count, float* dst);
}  // namespace ftune
