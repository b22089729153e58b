// The GPU step runners' AdamW state over one range (see cuda_adamw_state.hpp).
#include "cuda_adamw_state.hpp"

#if FTUNE_HAVE_CUDA

#include <algorithm>
#include <stdexcept>

#include "ftune/kernels/cuda_optim.hpp"

namespace ftune {

namespace cu = ftune::cuda;

CudaAdamWState::CudaAdamWState(ShardRange owned, const AdamWHyper& h)
    : owned_(owned), hyper_(h) {
  const size_t k = std::max<size_t>(owned.size(), 1);
  m_ = cu::DeviceBuffer(k * sizeof(float));
  v_ = cu::DeviceBuffer(k * sizeof(float));
  m_.zero();
  v_.zero();
  scalars_ = cu::DeviceBuffer(4 * sizeof(float));
  reduce_ws_ = cu::DeviceBuffer(cu::kReduceWorkspaceFloats * sizeof(float));
}

float* CudaAdamWState::squared_norm(const float* grad, int64_t n, cu::stream_t s) {
  float* sumsq = scalars_.as<float>();
  cu::reduce_sum(sumsq, grad, n, true, false, reduce_ws_.as<float>(), s);
  return sumsq;
}

void CudaAdamWState::clip(double max_grad_norm, cu::stream_t s) {
  float* sumsq = scalars_.as<float>();
  cu::clip_scale(sumsq + 2, sumsq + 1, sumsq, max_grad_norm, s);
}

float CudaAdamWState::norm_on_host(cu::stream_t s) const {
  float host_norm = 0;
  cu::copy_to_host_async(&host_norm, scalars_.as<float>() + 1, sizeof(float), s);
  cu::synchronize(s);
  return host_norm;
}

void CudaAdamWState::set_decay_mask(std::span<const uint8_t> decays) {
  if (decays.size() < owned_.end)
    throw std::runtime_error("AdamW: the decay mask is shorter than the parameter vector");
  runs_.clear();
  for (size_t i = owned_.begin; i < owned_.end;) {
    size_t j = i;
    while (j < owned_.end && (decays[j] != 0) == (decays[i] != 0)) ++j;
    runs_.push_back({i, j, decays[i] != 0});
    i = j;
  }
}

void CudaAdamWState::update(float* master, const float* grad, double lr, cu::stream_t s) {
  const float* grad_scale = scalars_.as<float>() + 2;
  ++steps_;
  const cu::AdamWScalars k =
      cu::adamw_scalars(steps_, lr, hyper_.beta1, hyper_.beta2, hyper_.eps, hyper_.weight_decay);
  float *m = m_.as<float>(), *v = v_.as<float>();
  if (runs_.empty()) {
    cu::adamw_step(master, grad, m, v, static_cast<int64_t>(owned_.size()), k, grad_scale, s);
    return;
  }
  // Full fine-tuning's exemptions (biases, norms): one launch per run of equal decay, the
  // exempt runs with weight_decay 0.
  const cu::AdamWScalars k0 =
      cu::adamw_scalars(steps_, lr, hyper_.beta1, hyper_.beta2, hyper_.eps, 0.0);
  for (const DecayRun& d : runs_) {
    const size_t o = d.begin - owned_.begin;
    cu::adamw_step(master + o, grad + o, m + o, v + o, static_cast<int64_t>(d.end - d.begin),
                   d.decays ? k : k0, grad_scale, s);
  }
}

void CudaAdamWState::export_moments(OptimizerShard& out, ShardRange e, cu::stream_t s) const {
  if (e.begin < owned_.begin || e.end > owned_.end)
    throw std::logic_error("AdamW: exported range outside the owned range");
  out.begin = e.begin;
  out.end = e.end;
  out.step = steps_;
  out.m.resize(e.size());
  out.v.resize(e.size());
  const size_t off = e.begin - owned_.begin, bytes = e.size() * sizeof(float);
  cu::copy_to_host_async(out.m.data(), m_.as<float>() + off, bytes, s);
  cu::copy_to_host_async(out.v.data(), v_.as<float>() + off, bytes, s);
  cu::synchronize(s);
}

void CudaAdamWState::import_moments(const OptimizerShard& sh, cu::stream_t s) {
  if (sh.begin != owned_.begin || sh.end != owned_.end)
    throw std::runtime_error("optimizer shard range does not match this rank's");
  if (sh.m.size() != owned_.size() || sh.v.size() != owned_.size())
    throw std::runtime_error("optimizer shard: moments of the wrong length");
  steps_ = sh.step;
  cu::copy_to_device_async(m_.get(), sh.m.data(), sh.m.size() * sizeof(float), s);
  cu::copy_to_device_async(v_.get(), sh.v.data(), sh.v.size() * sizeof(float), s);
  cu::synchronize(s);
}

}  // namespace ftune

#endif  // FTUNE_HAVE_CUDA
