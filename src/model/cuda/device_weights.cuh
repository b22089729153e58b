#pragma once
// The frozen base model for the CUDA backend, read from a WeightSource tensor by tensor (host
// memory holds one slice, or one projection matrix when quantising, never the model):
//   - embeddings, lm_head (tied: the embedding's copy), norms and biases: bf16 on the device;
//   - each layer's seven projections: one "layer block" per layer, the same layout in every
//     layer, holding bf16 matrices, or with quant_bits 8 (load_in_8bit) / 4 (load_in_4bit)
//     their quantised form (kernels/cpu_quant.hpp), which the transformer dequantises a
//     layer at a time. The blocks live on the device, or with offload (offload_param = "cpu")
//     in pinned host memory, from where LayerStreamer copies them in as layers are used.
//   - ZeRO-3 (sharding): every block is cut into `size` equal chunks (the last padded) and
//     this rank keeps only chunk `rank` of each, on the device or with offload in pinned
//     host memory; LayerStreamer gathers a layer's chunks from all ranks just in time.
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

// zero_stage = 3: which chunk of every layer block this rank keeps. on with size 1 keeps the
// whole block as one chunk but still streams it (the multi-rank path minus the gather).
struct BlockSharding {
  bool on = false;
  int rank = 0, size = 1;
};

class DeviceWeights {
 public:
  DeviceWeights(const WeightSource& src, stream_t stream, int quant_bits = 0, bool offload = false,
                BlockSharding sharding = {});
  // Holds nothing: full fine-tuning points the views into the trainer's bf16 parameter copy.
  explicit DeviceWeights(const ModelConfig& c) : layers(c.num_hidden_layers) {}
  int quant_bits = 0;  // 0: bf16 projections
  bool offload = false;
  const bf16* embed = nullptr;
  const bf16* final_norm = nullptr;
  const bf16* lm_head = nullptr;
  std::vector<DeviceLayer> layers;

  BlockSharding sharding;
  size_t layer_bytes = 0;                  // one layer block
  std::array<ProjParts, kNumProj> parts{};  // inside every block
  // What this rank stores of each block: the block, or with sharding its chunk
  // (chunk_bytes * sharding.size >= layer_bytes; chunk_bytes a multiple of 256).
  size_t chunk_bytes = 0;
  // This rank's chunk of layer l (the whole block unless sharded): a device address, or
  // with offload a pinned host address.
  const char* chunk(int l) const { return blocks_base() + static_cast<size_t>(l) * chunk_bytes; }
  // Layer l's whole block, where it is resident (not offloaded, not sharded).
  const char* block(int l) const { return chunk(l); }
  // Whether the transformer must go through a LayerStreamer to see a block.
  bool streamed() const { return offload || sharding.on; }
  // Device bytes held (with offload the blocks are host memory: not counted).
  size_t bytes() const { return buf_.bytes() + dev_blocks_.bytes(); }
  size_t host_bytes() const { return host_blocks_.bytes(); }

 private:
  const char* blocks_base() const {
    return offload ? host_blocks_.as<const char>() : dev_blocks_.as<const char>();
  }
  void layout_blocks(const ModelConfig& c);
  void fill_blocks(const WeightSource& src, stream_t stream);
  void keep_chunk(const char* block, int l, stream_t stream);
  DeviceBuffer buf_, dev_blocks_;
  PinnedBuffer host_blocks_;
};

}  // namespace ftune::cuda::model
