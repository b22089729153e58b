// Base weights fp32 (any WeightSource) -> bf16 or quantised, on the device or in pinned host
// memory. The bf16 conversion runs on the GPU through an fp32 staging buffer (a host loop
// over billions of floats would dominate start-up); quantisation runs on the host (OpenMP),
// one matrix at a time.
#include <algorithm>
#include <cstring>

#include <cuda_runtime.h>

#include <string>

#include "../../kernels/cuda/common.cuh"
#include "device_weights.cuh"
#include "ftune/kernels/cpu_quant.hpp"
#include "ftune/kernels/cuda_optim.hpp"
#include "model_kernels.cuh"

namespace ftune::cuda::model {

namespace {
using Kind = BaseWeights::Kind;
size_t align256(size_t b) { return (b + 255) / 256 * 256; }
constexpr int64_t kStageFloats = int64_t(16) << 20;  // 64 MiB of fp32 per staged slice

void d2h_sync(void* dst, const void* src, size_t bytes, stream_t stream) {
  d2h(dst, src, bytes, stream);
  stream_sync(stream);
}
}  // namespace

void DeviceWeights::layout_blocks(const ModelConfig& c) {
  size_t off = 0;
  for (Proj p : kAllProj) {
    const int64_t rows = proj_out_features(c, p), n = rows * proj_in_features(c, p);
    ProjParts& P = parts[static_cast<int>(p)];
    auto take = [&](size_t bytes) {
      const size_t at = off;
      off += align256(bytes);
      return at;
    };
    if (quant_bits == 0) {
      P.w = take(size_t(n) * sizeof(bf16));
    } else if (quant_bits == 8) {
      P.q = take(size_t(n));
      P.scale = take(size_t(rows) * sizeof(float));
    } else {
      P.q = take(size_t(n + 1) / 2);
      P.abs = take(size_t(cpu::nf4_blocks(n)));
      P.scale = take(size_t(cpu::nf4_groups(n)) * sizeof(float));
    }
  }
  layer_bytes = off;
}

DeviceWeights::DeviceWeights(const WeightSource& src, stream_t stream, int bits, bool to_host,
                             BlockSharding sh)
    : quant_bits(bits), offload(to_host), sharding(sh) {
  if (bits != 0 && bits != 8 && bits != 4)
    throw CudaError("DeviceWeights: quant_bits must be 0, 8 or 4");
  if (sh.on && (sh.size < 1 || sh.rank < 0 || sh.rank >= sh.size))
    throw CudaError("DeviceWeights: shard rank " + std::to_string(sh.rank) + " of " +
                    std::to_string(sh.size));
  const ModelConfig& c = src.config();
  const auto& entries = src.entries();
  layers.resize(c.num_hidden_layers);
  // Where each tensor other than a projection matrix goes (bf16, on the device).
  auto slot = [&](const BaseWeights::Entry& e) -> const bf16** {
    DeviceLayer* L = e.layer >= 0 ? &layers[e.layer] : nullptr;
    switch (e.kind) {
      case Kind::embed: return &embed;
      case Kind::final_norm: return &final_norm;
      case Kind::lm_head: return &lm_head;
      case Kind::input_norm: return &L->input_norm;
      case Kind::post_norm: return &L->post_norm;
      case Kind::q_norm: return &L->q_norm;
      case Kind::k_norm: return &L->k_norm;
      case Kind::proj_bias: return &L->b[static_cast<int>(e.proj)];
      case Kind::proj_weight: return nullptr;  // layer blocks
    }
    return nullptr;
  };
  size_t total = 0;
  for (const auto& e : entries)
    if (slot(e)) total += align256(e.numel() * sizeof(bf16));
  buf_ = DeviceBuffer(total);

  int64_t largest = 0;
  for (const auto& e : entries) largest = std::max<int64_t>(largest, static_cast<int64_t>(e.numel()));
  const int64_t stage_n = std::min<int64_t>(largest, kStageFloats);
  DeviceBuffer stage(stage_n * sizeof(float));
  std::vector<float> host(stage_n);
  char* base = buf_.as<char>();
  size_t off = 0;
  for (size_t t = 0; t < entries.size(); ++t) {
    const BaseWeights::Entry& e = entries[t];
    const bf16** dst_slot = slot(e);
    if (!dst_slot) continue;
    bf16* dst = reinterpret_cast<bf16*>(base + off);
    const int64_t n = static_cast<int64_t>(e.numel());
    for (int64_t i = 0; i < n; i += stage_n) {
      const int64_t m = std::min(stage_n, n - i);
      // `stage` is rewritten only after the previous conversion read it (same stream);
      // pageable `host` may be refilled once h2d returns.
      src.read(t, static_cast<size_t>(i), static_cast<size_t>(m), host.data());
      h2d(stage.get(), host.data(), m * sizeof(float), stream);
      cuda::to_bf16(dst + i, stage.as<float>(), m, stream);
    }
    *dst_slot = dst;
    off += align256(e.numel() * sizeof(bf16));
  }
  if (c.tie_word_embeddings) lm_head = embed;
  stream_sync(stream);  // `stage` is freed on return
  layout_blocks(c);
  chunk_bytes = sharding.on ? align256((layer_bytes + sharding.size - 1) / sharding.size)
                            : layer_bytes;
  const size_t all = chunk_bytes * layers.size();
  if (offload) {
    host_blocks_ = PinnedBuffer(all);
    if (sharding.on) std::memset(host_blocks_.get(), 0, all);  // the last chunk's padding
  } else {
    dev_blocks_ = DeviceBuffer(all);
    if (sharding.on) dev_blocks_.zero();
  }
  fill_blocks(src, stream);
}

// Sharded: layer l's block was assembled whole in `block` (host memory with offload, else
// the device); this rank's chunk of it goes to chunk(l).
void DeviceWeights::keep_chunk(const char* block, int l, stream_t stream) {
  const size_t begin = static_cast<size_t>(sharding.rank) * chunk_bytes;
  if (begin >= layer_bytes) return;  // all padding
  const size_t n = std::min(chunk_bytes, layer_bytes - begin);
  char* dst = const_cast<char*>(chunk(l));
  if (offload) {
    std::memcpy(dst, block + begin, n);
  } else {
    FTUNE_CUDA_CHECK(cudaMemcpyAsync(dst, block + begin, n, cudaMemcpyDeviceToDevice, stream));
  }
}

// Each projection matrix read whole into host memory, converted (bf16, on the GPU) or
// quantised (host), then copied into its layer block; one matrix in host memory at a time.
void DeviceWeights::fill_blocks(const WeightSource& src, stream_t stream) {
  const ModelConfig& c = src.config();
  const auto& entries = src.entries();
  char* blocks = offload ? host_blocks_.as<char>() : dev_blocks_.as<char>();
  // Sharded: each layer's block is assembled whole in one scratch (host memory with offload,
  // else the device), then this rank keeps its chunk.
  PinnedBuffer host_scratch;
  DeviceBuffer dev_scratch;
  if (sharding.on) {
    if (offload) host_scratch = PinnedBuffer(layer_bytes);
    else dev_scratch = DeviceBuffer(layer_bytes);
  }
  char* scratch = offload ? host_scratch.as<char>() : dev_scratch.as<char>();
  int assembling = -1;  // the layer in scratch
  auto put = [&](char* dst, const void* host_src, size_t bytes) {
    if (offload)
      std::memcpy(dst, host_src, bytes);
    else
      h2d(dst, host_src, bytes, stream);
  };
  int64_t largest = 0;
  for (Proj p : kAllProj) largest = std::max(largest, proj_in_features(c, p) * proj_out_features(c, p));
  DeviceBuffer stage, stage16;  // bf16 conversion on the GPU
  if (!quant_bits) {
    stage = DeviceBuffer(std::min(largest, kStageFloats) * sizeof(float));
    if (offload) stage16 = DeviceBuffer(std::min(largest, kStageFloats) * sizeof(bf16));
  }
  std::vector<float> m;
  std::vector<uint8_t> q, abs;
  std::vector<float> scale;
  for (size_t t = 0; t < entries.size(); ++t) {
    const BaseWeights::Entry& e = entries[t];
    if (e.kind != Kind::proj_weight) continue;
    const int pi = static_cast<int>(e.proj);
    const ProjParts& P = parts[pi];
    if (sharding.on && assembling != e.layer) {  // entries come layer by layer
      if (assembling >= 0) keep_chunk(scratch, assembling, stream);
      assembling = static_cast<int>(e.layer);
    }
    char* blk = sharding.on ? scratch : blocks + static_cast<size_t>(e.layer) * layer_bytes;
    const int64_t in = proj_in_features(c, e.proj), out = proj_out_features(c, e.proj), n = in * out;
    if (!quant_bits) {
      const int64_t stage_n = std::min(n, kStageFloats);
      m.resize(stage_n);
      bf16* dst = reinterpret_cast<bf16*>(blk + P.w);
      for (int64_t i = 0; i < n; i += stage_n) {
        const int64_t k = std::min(stage_n, n - i);
        src.read(t, static_cast<size_t>(i), static_cast<size_t>(k), m.data());
        h2d(stage.get(), m.data(), k * sizeof(float), stream);
        if (offload) {
          cuda::to_bf16(stage16.as<bf16>(), stage.as<float>(), k, stream);
          d2h_sync(dst + i, stage16.get(), k * sizeof(bf16), stream);
        } else {
          cuda::to_bf16(dst + i, stage.as<float>(), k, stream);
        }
      }
      continue;
    }
    m.resize(n);
    src.read(t, 0, static_cast<size_t>(n), m.data());
    if (quant_bits == 8) {
      q.resize(n);
      scale.resize(out);
      cpu::quantize_int8_rows(reinterpret_cast<int8_t*>(q.data()), scale.data(), m.data(), out, in);
    } else {
      q.resize((n + 1) / 2);
      abs.resize(cpu::nf4_blocks(n));
      scale.resize(cpu::nf4_groups(n));
      cpu::quantize_nf4(q.data(), abs.data(), scale.data(), m.data(), n);
    }
    put(blk + P.q, q.data(), q.size());
    if (quant_bits == 4) put(blk + P.abs, abs.data(), abs.size());
    put(blk + P.scale, scale.data(), scale.size() * sizeof(float));
    if (!offload) stream_sync(stream);  // the host vectors are reused for the next matrix
  }
  if (assembling >= 0) keep_chunk(scratch, assembling, stream);
  stream_sync(stream);
}

}  // namespace ftune::cuda::model
