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

DeviceWeights::DeviceWeights(const BaseWeights& w, stream_t stream, bool int8_projections)
    : int8(int8_projections) {
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
      if (!int8) add(L.w[pi], out * in, &D.w[pi]);
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
  if (int8) upload_int8(w, stream);
}

// One allocation for every layer's int8 rows and scales; quantised on the host one
// projection at a time (host memory stays one matrix), each copy waited for before reuse.
void DeviceWeights::upload_int8(const BaseWeights& w, stream_t stream) {
  const ModelConfig& c = w.cfg;
  size_t total = 0;
  for (size_t l = 0; l < w.layers.size(); ++l)
    for (Proj p : kAllProj) {
      if (!w.layers[l].w[static_cast<int>(p)]) continue;
      const int64_t in = proj_in_features(c, p), out = proj_out_features(c, p);
      total += align256(out * in) + align256(out * sizeof(float));
    }
  q8_buf_ = DeviceBuffer(total);
  char* base = q8_buf_.as<char>();
  size_t off = 0;
  std::vector<int8_t> q;
  std::vector<float> scale;
  for (size_t l = 0; l < w.layers.size(); ++l)
    for (Proj p : kAllProj) {
      const int pi = static_cast<int>(p);
      const float* m = w.layers[l].w[pi];
      if (!m) continue;
      const int64_t in = proj_in_features(c, p), out = proj_out_features(c, p);
      q.resize(out * in);
      scale.resize(out);
      cpu::quantize_int8_rows(q.data(), scale.data(), m, out, in);
      auto* dq = reinterpret_cast<int8_t*>(base + off);
      off += align256(out * in);
      auto* ds = reinterpret_cast<float*>(base + off);
      off += align256(out * sizeof(float));
      h2d(dq, q.data(), out * in, stream);
      h2d(ds, scale.data(), out * sizeof(float), stream);
      stream_sync(stream);  // q and scale are reused for the next matrix
      layers[l].q8[pi] = dq;
      layers[l].scale8[pi] = ds;
    }
}

}  // namespace ftune::cuda::model
