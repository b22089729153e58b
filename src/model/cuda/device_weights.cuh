#pragma once
// The frozen base model on the device: every tensor of a WeightSource converted once from
// fp32 to bf16 into one allocation, read tensor by tensor (host memory holds one slice, or
// one projection matrix when quantising, never the model) (tied lm_head shares the embedding's copy). With quant_bits 8
// (load_in_8bit) or 4 (load_in_4bit) the projection weights are kept quantised instead
// (kernels/cpu_quant.hpp; w[] null, q[]/qscale[] set), and the transformer dequantises a layer
// before using it.
#include <array>
#include <vector>

#include "ftune/kernels/cuda_device.hpp"
#include "ftune/model/weight_source.hpp"

namespace ftune::cuda::model {

struct DeviceLayer {
  std::array<const bf16*, kNumProj> w{};  // [out, in]; null when quantised
  // int8: q = int8 [out, in], qscale = fp32 [out].
  // nf4: q = packed codes [out * in / 2], qabs = uint8 block absmaxes, qscale = fp32 [groups].
  std::array<const void*, kNumProj> q{};
  std::array<const uint8_t*, kNumProj> qabs{};
  std::array<const float*, kNumProj> qscale{};
  std::array<const bf16*, kNumProj> b{};  // [out] or nullptr
  const bf16* input_norm = nullptr;
  const bf16* post_norm = nullptr;
  const bf16* q_norm = nullptr;  // qwen3 only
  const bf16* k_norm = nullptr;
};

class DeviceWeights {
 public:
  DeviceWeights(const WeightSource& src, stream_t stream, int quant_bits = 0);
  int quant_bits = 0;  // 0: bf16 projections
  const bf16* embed = nullptr;
  const bf16* final_norm = nullptr;
  const bf16* lm_head = nullptr;
  std::vector<DeviceLayer> layers;
  size_t bytes() const { return buf_.bytes() + q_buf_.bytes(); }

 private:
  void upload_quantised(const WeightSource& src, stream_t stream);
  DeviceBuffer buf_, q_buf_;
};

}  // namespace ftune::cuda::model
