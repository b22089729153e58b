#pragma once
// The frozen base model for the CUDA backend, read from a WeightSource tensor by tensor (host
// memory holds one slice, or one projection matrix when quantising, never the model):
//   - embeddings, lm_head (tied: the embedding's copy), norms and biases: bf16 on the device;
//   - each layer's seven projections: one "layer block" per layer, the same layout in every
//     layer, holding bf16 matrices, or with quant_bits 8 (load_in_8bit) / 4 (load_in_4bit)
//     their quantised form (kernels/cpu_quant.hpp), which the transformer dequantises a
//     layer at a time. The blocks live on the device, or with offload (offload_param = "cpu")
//     in pinned host memory, from where LayerStreamer copies them in as layers are used.
#include <array>
#include <vector>

#include "ftune/kernels/cuda_device.hpp"
#include "ftune/model/weight_source.hpp"

namespace ftune::cuda::model {

struct DeviceLayer {
  std::array<const bf16*, kNumProj> b{};  // [out] or nullptr
  const bf16* input_norm = nullptr;
  const bf16* post_norm = nullptr;
  const bf16* q_norm = nullptr;  // qwen3 only
  const bf16* k_norm = nullptr;
};

// Byte offsets of one projection's parts inside a layer block. bf16: w = [out, in].
// int8: q = int8 [out, in], scale = fp32 [out]. nf4: q = packed codes [out * in / 2],
// abs = uint8 block absmaxes, scale = fp32 [groups].
struct ProjParts {
  size_t w = 0, q = 0, abs = 0, scale = 0;
};

class DeviceWeights {
 public:
  DeviceWeights(const WeightSource& src, stream_t stream, int quant_bits = 0, bool offload = false);
  // Holds nothing: full fine-tuning points the views into the trainer's bf16 parameter copy.
  explicit DeviceWeights(const ModelConfig& c) : layers(c.num_hidden_layers) {}
  int quant_bits = 0;  // 0: bf16 projections
  bool offload = false;
  const bf16* embed = nullptr;
  const bf16* final_norm = nullptr;
  const bf16* lm_head = nullptr;
  std::vector<DeviceLayer> layers;

  size_t layer_bytes = 0;                  // one layer block
  std::array<ProjParts, kNumProj> parts{};  // inside every block
  // Layer l's block: a device address, or with offload a pinned host address.
  const char* block(int l) const { return blocks_base() + static_cast<size_t>(l) * layer_bytes; }
  // Device bytes held (with offload the blocks are host memory: not counted).
  size_t bytes() const { return buf_.bytes() + dev_blocks_.bytes(); }
  size_t host_bytes() const { return host_blocks_.bytes(); }

 private:
  const char* blocks_base() const {
    return offload ? host_blocks_.as<const char>() : dev_blocks_.as<const char>();
  }
  void layout_blocks(const ModelConfig& c);
  void fill_blocks(const WeightSource& src, stream_t stream);
  DeviceBuffer buf_, dev_blocks_;
  PinnedBuffer host_blocks_;
};

}  // namespace ftune::cuda::model
