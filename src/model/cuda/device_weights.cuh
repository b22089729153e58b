#pragma once
// The frozen base model on the device: every tensor of BaseWeights converted once from fp32
// to bf16 into one allocation (tied lm_head shares the embedding's copy).
#include <array>
#include <vector>

#include "ftune/kernels/cuda_device.hpp"
#include "ftune/model/weights.hpp"

namespace ftune::cuda::model {

struct DeviceLayer {
  std::array<const bf16*, kNumProj> w{};  // [out, in]
  std::array<const bf16*, kNumProj> b{};  // [out] or nullptr
  const bf16* input_norm = nullptr;
  const bf16* post_norm = nullptr;
  const bf16* q_norm = nullptr;  // qwen3 only
  const bf16* k_norm = nullptr;
};

class DeviceWeights {
 public:
  DeviceWeights(const BaseWeights& w, stream_t stream);
  const bf16* embed = nullptr;
  const bf16* final_norm = nullptr;
  const bf16* lm_head = nullptr;
  std::vector<DeviceLayer> layers;
  size_t bytes() const { return buf_.bytes(); }

 private:
  DeviceBuffer buf_;
};

}  // namespace ftune::cuda::model
