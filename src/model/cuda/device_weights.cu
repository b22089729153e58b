// Base weights fp32 (host) -> bf16 (device). The conversion runs on the GPU through an fp32
// staging buffer: a host loop over billions of floats would dominate start-up.
#include <algorithm>

#include "device_weights.cuh"
#include "ftune/kernels/cpu_quant.hpp"
#include "ftune/kernels/cuda_optim.hpp"
#include "model_kernels.cuh"

namespace ftune::cuda::model {

namespace {
struct Job {
  const float* src;
  int64_t n;
  const bf16** dst;
};
size_t align256(size_t b) { return (b + 255) / 256 * 256; }
}  // namespace

DeviceWeights::DeviceWeights(const BaseWeights& w, stream_t stream, int bits)
    : quant_bits(bits) {
  if (bits != 0 && bits != 8 && bits != 4)
    throw CudaError("DeviceWeights: quant_bits must be 0, 8 or 4");
  const ModelConfig& c = w.cfg;
  const int64_t H = c.hidden_size, V = c.vocab_size, d = c.head_dim;
  std::vector<Job> jobs;
  auto add = [&](const float* src, int64_t n, const bf16** dst) {
    if (src) jobs.push_back({src, n, dst});
  };
  add(w.embed, V * H, &embed);
  add(w.final_norm, H, &final_norm);
  const bool tied = w.lm_head == w.embed;
  if (!tied) add(w.lm_head, V * H, &lm_head);
  layers.resize(w.layers.size());
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& L = w.layers[l];
    DeviceLayer& D = layers[l];
    add(L.input_norm, H, &D.input_norm);
    add(L.post_norm, H, &D.post_norm);
    add(L.q_norm, d, &D.q_norm);
    add(L.k_norm, d, &D.k_norm);
    for (Proj p : kAllProj) {
      const int pi = static_cast<int>(p);
      const int64_t in = proj_in_features(c, p), out = proj_out_features(c, p);
      if (!quant_bits) add(L.w[pi], out * in, &D.w[pi]);
      add(L.b[pi], out, &D.b[pi]);
    }
  }
  size_t total = 0;
  for (const Job& j : jobs) total += align256(j.n * sizeof(bf16));
  buf_ = DeviceBuffer(total);

  int64_t largest = 0;
  for (const Job& j : jobs) largest = std::max(largest, j.n);
  const int64_t stage_n = std::min<int64_t>(largest, int64_t(16) << 20);  // 64 MiB of fp32
  DeviceBuffer stage(stage_n * sizeof(float));
  char* base = buf_.as<char>();
  size_t off = 0;
  for (const Job& j : jobs) {
    bf16* dst = reinterpret_cast<bf16*>(base + off);
    // Same stream throughout: the next copy into `stage` waits for the previous conversion.
    for (int64_t i = 0; i < j.n; i += stage_n) {
      const int64_t m = std::min(stage_n, j.n - i);
      h2d(stage.get(), j.src + i, m * sizeof(float), stream);
      cuda::to_bf16(dst + i, stage.as<float>(), m, stream);
    }
    *j.dst = dst;
    off += align256(j.n * sizeof(bf16));
  }
  if (tied) lm_head = embed;
  stream_sync(stream);  // `stage` is freed on return
  if (quant_bits) upload_quantised(w, stream);
}

// One allocation for every layer's quantised projections; quantised on the host one matrix at
// a time (host memory stays one matrix), each copy waited for before the buffers are reused.
void DeviceWeights::upload_quantised(const BaseWeights& w, stream_t stream) {
  const ModelConfig& c = w.cfg;
  struct Parts {
    size_t q, abs, scale;  // bytes
  };
  auto parts = [&](int64_t n, int64_t rows) {
    if (quant_bits == 8) return Parts{size_t(n), 0, size_t(rows) * sizeof(float)};
    return Parts{size_t(n + 1) / 2, size_t(cpu::nf4_blocks(n)),
                 size_t(cpu::nf4_groups(n)) * sizeof(float)};
  };
  size_t total = 0;
  for (size_t l = 0; l < w.layers.size(); ++l)
    for (Proj p : kAllProj) {
      if (!w.layers[l].w[static_cast<int>(p)]) continue;
      const Parts s = parts(proj_in_features(c, p) * proj_out_features(c, p), proj_out_features(c, p));
      total += align256(s.q) + align256(s.abs) + align256(s.scale);
    }
  q_buf_ = DeviceBuffer(total);
  char* base = q_buf_.as<char>();
  size_t off = 0;
  std::vector<uint8_t> q, abs;
  std::vector<float> scale;
  for (size_t l = 0; l < w.layers.size(); ++l)
    for (Proj p : kAllProj) {
      const int pi = static_cast<int>(p);
      const float* m = w.layers[l].w[pi];
      if (!m) continue;
      const int64_t in = proj_in_features(c, p), out = proj_out_features(c, p), n = in * out;
      const Parts s = parts(n, out);
      q.resize(s.q);
      abs.resize(s.abs);
      scale.resize(s.scale / sizeof(float));
      if (quant_bits == 8)
        cpu::quantize_int8_rows(reinterpret_cast<int8_t*>(q.data()), scale.data(), m, out, in);
      else
        cpu::quantize_nf4(q.data(), abs.data(), scale.data(), m, n);
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
      layers[l].q[pi] = dq;
      layers[l].qabs[pi] = s.abs ? reinterpret_cast<const uint8_t*>(da) : nullptr;
      layers[l].qscale[pi] = reinterpret_cast<const float*>(ds);
    }
}

}  // namespace ftune::cuda::model
