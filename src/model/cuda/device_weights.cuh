#pragma once
// The frozen base model on the device: every tensor of BaseWeights converted once from fp32
// to bf16 into one allocation (tied lm_head shares the embedding's copy). With int8 = true
// (load_in_8bit) the projection weights are kept as int8 rows with fp32 scales instead
// (w[] null, q8[]/scale8[] set), and the transformer dequantises a layer before using it.
#include <array>
#include <vector>

#include "ftune/kernels/cuda_device.hpp"
#include "ftune/model/weights.hpp"

namespace ftune::cuda::model {

struct DeviceLayer {
  std::array<const bf16*, kNumProj> w{};  // [out, in]; null under int8
  std::array<const int8_t*, kNumProj> q8{};   // int8: [out, in]
  std::array<const float*, kNumProj> scale8{};  // int8: [out]
  std::array<const bf16*, kNumProj> b{};  // [out] or nullptr
  const bf16* input_norm = nullptr;
  const bf16* post_norm = nullptr;
  const bf16* q_norm = nullptr;  // qwen3 only
  const bf16* k_norm = nullptr;
};

class DeviceWeights {
 public:
  DeviceWeights(const BaseWeights& w, stream_t stream, bool int8 = false);
  bool int8 = false;
  const bf16* embed = nullptr;
  const bf16* final_norm = nullptr;
  const bf16* lm_head = nullptr;
  std::vector<DeviceLayer> layers;
  size_t bytes() const { return buf_.bytes() + q8_buf_.bytes(); }

 private:
  void upload_int8(const BaseWeights& w, stream_t stream);
  DeviceBuffer buf_, q8_buf_;
};

}  // namespace ftune::cuda::model
