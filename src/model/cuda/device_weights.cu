// Base weights fp32 (any WeightSource) -> bf16 (device). The conversion runs on the GPU
// through an fp32 staging buffer: a host loop over billions of floats would dominate
// start-up. The source is read slice by slice into one host buffer.
#include <algorithm>

#include "device_weights.cuh"
#include "ftune/kernels/cpu_quant.hpp"
#include "ftune/kernels/cuda_optim.hpp"
#include "model_kernels.cuh"

namespace ftune::cuda::model {

namespace {
using Kind = BaseWeights::Kind;
size_t align256(size_t b) { return (b + 255) / 256 * 256; }
}  // namespace

DeviceWeights::DeviceWeights(const WeightSource& src, stream_t stream, int bits)
    : quant_bits(bits) {
  if (bits != 0 && bits != 8 && bits != 4)
    throw CudaError("DeviceWeights: quant_bits must be 0, 8 or 4");
  const auto& entries = src.entries();
  layers.resize(src.config().num_hidden_layers);
  // Where each bf16 tensor goes; quantised projections are left to upload_quantised.
  auto slot = [&](const BaseWeights::Entry& e) -> const bf16** {
    DeviceLayer* L = e.layer >= 0 ? &layers[e.layer] : nullptr;
    const int pi = static_cast<int>(e.proj);
    switch (e.kind) {
      case Kind::embed: return &embed;
      case Kind::final_norm: return &final_norm;
      case Kind::lm_head: return &lm_head;
      case Kind::input_norm: return &L->input_norm;
      case Kind::post_norm: return &L->post_norm;
      case Kind::q_norm: return &L->q_norm;
      case Kind::k_norm: return &L->k_norm;
      case Kind::proj_bias: return &L->b[pi];
      case Kind::proj_weight: return quant_bits ? nullptr : &L->w[pi];
    }
    return nullptr;
  };
  size_t total = 0;
  int64_t largest = 0;
  for (const auto& e : entries)
    if (slot(e)) {
      total += align256(e.numel() * sizeof(bf16));
      largest = std::max<int64_t>(largest, static_cast<int64_t>(e.numel()));
    }
  buf_ = DeviceBuffer(total);

  const int64_t stage_n = std::min<int64_t>(largest, int64_t(16) << 20);  // 64 MiB of fp32
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
      // `stage` is rewritten only after the previous conversion read it: the copy below
      // follows that conversion on the same stream. Pageable `host` may be refilled once
      // h2d returns.
      src.read(t, static_cast<size_t>(i), static_cast<size_t>(m), host.data());
      h2d(stage.get(), host.data(), m * sizeof(float), stream);
      cuda::to_bf16(dst + i, stage.as<float>(), m, stream);
    }
    *dst_slot = dst;
    off += align256(e.numel() * sizeof(bf16));
  }
  if (src.config().tie_word_embeddings) lm_head = embed;
  stream_sync(stream);  // `stage` is freed on return
  if (quant_bits) upload_quantised(src, stream);
}

// One allocation for every layer's quantised projections; read and quantised on the host one
// matrix at a time, each copy waited for before the host buffers are reused.
void DeviceWeights::upload_quantised(const WeightSource& src, stream_t stream) {
  const ModelConfig& c = src.config();
  struct Parts {
    size_t q, abs, scale;  // bytes
  };
  auto parts = [&](int64_t n, int64_t rows) {
    if (quant_bits == 8) return Parts{size_t(n), 0, size_t(rows) * sizeof(float)};
    return Parts{size_t(n + 1) / 2, size_t(cpu::nf4_blocks(n)),
                 size_t(cpu::nf4_groups(n)) * sizeof(float)};
  };
  const auto& entries = src.entries();
  size_t total = 0;
  for (const auto& e : entries)
    if (e.kind == Kind::proj_weight) {
      const Parts s = parts(e.numel(), proj_out_features(c, e.proj));
      total += align256(s.q) + align256(s.abs) + align256(s.scale);
    }
  q_buf_ = DeviceBuffer(total);
  char* base = q_buf_.as<char>();
  size_t off = 0;
  std::vector<float> m;
  std::vector<uint8_t> q, abs;
  std::vector<float> scale;
  for (size_t t = 0; t < entries.size(); ++t) {
    const BaseWeights::Entry& e = entries[t];
    if (e.kind != Kind::proj_weight) continue;
    const int pi = static_cast<int>(e.proj);
    const int64_t in = proj_in_features(c, e.proj), out = proj_out_features(c, e.proj), n = in * out;
    const Parts s = parts(n, out);
    m.resize(n);
    src.read(t, 0, static_cast<size_t>(n), m.data());
    q.resize(s.q);
    abs.resize(s.abs);
    scale.resize(s.scale / sizeof(float));
    if (quant_bits == 8)
      cpu::quantize_int8_rows(reinterpret_cast<int8_t*>(q.data()), scale.data(), m.data(), out, in);
    else
      cpu::quantize_nf4(q.data(), abs.data(), scale.data(), m.data(), n);
    char* dq = base + off;
    off += align256(s.q);
    char* da = base + off;
    off += align256(s.abs);
    char* ds = base + off;
    off += align256(s.scale);
    h2d(dq, q.data(), s.q, stream);
    if (s.abs) h2d(da, abs.data(), s.abs, stream);
    h2d(ds, scale.data(), s.scale, stream);
    stream_sync(stream);  // the host vectors are reused for the next matrix
    DeviceLayer& L = layers[e.layer];
    L.q[pi] = dq;
    L.qabs[pi] = s.abs ? reinterpret_cast<const uint8_t*>(da) : nullptr;
    L.qscale[pi] = reinterpret_cast<const float*>(ds);
  }
}

}  // namespace ftune::cuda::model
