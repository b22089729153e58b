// LoRA merge: W [out, in] += scale * B [out, r] A [r, in], as PEFT's get_delta_weight.
#include "ftune/model/merge.hpp"

#include <stdexcept>
#include <string>

#include "ftune/kernels/cpu_ops.hpp"

namespace ftune {
namespace {

void check_same_shape(const ModelConfig& w, const ModelConfig& a) {
  auto same = [&](const char* key, int64_t x, int64_t y) {
    if (x != y)
      throw std::runtime_error(std::string("merge_lora: adapter was built for ") + key + " = " +
                               std::to_string(y) + ", the model has " + std::to_string(x));
  };
  same("num_hidden_layers", w.num_hidden_layers, a.num_hidden_layers);
  same("hidden_size", w.hidden_size, a.hidden_size);
  same("intermediate_size", w.intermediate_size, a.intermediate_size);
  same("q_dim", w.q_dim(), a.q_dim());
  same("kv_dim", w.kv_dim(), a.kv_dim());
}

}  // namespace

void merge_lora(BaseWeights& w, const LoraAdapter& a) {
  check_same_shape(w.cfg, a.model);
  const int64_t r = a.spec.rank;
  const float scale = a.spec.scale();
  float* const begin = w.storage.data();
  for (const LoraSlot& s : a.slots) {
    if (s.layer < 0 || s.layer >= static_cast<int>(w.layers.size()))
      throw std::runtime_error("merge_lora: adapter slot for layer " + std::to_string(s.layer) +
                               " outside the model");
    // The views are const (backends only read them); the tensor lives in w.storage.
    const float* view = w.layers[s.layer].w[static_cast<int>(s.proj)];
    const size_t n = static_cast<size_t>(s.out * s.in);
    if (view < begin || view + n > begin + w.storage.size())
      throw std::runtime_error("merge_lora: weights do not own their tensors");
    if (s.out != proj_out_features(w.cfg, s.proj) || s.in != proj_in_features(w.cfg, s.proj))
      throw std::runtime_error(std::string("merge_lora: shape mismatch at ") + proj_name(s.proj));
    float* W = begin + (view - begin);
    const float* A = a.params.data() + s.a_offset;
    const float* B = a.params.data() + s.b_offset;
    cpu::matmul_nn<float>(W, B, A, s.out, s.in, r, scale, /*accumulate=*/true);
  }
}

}  // namespace ftune
