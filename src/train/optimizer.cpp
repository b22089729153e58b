#include "ftune/train/optimizer.hpp"

#include <cmath>
#include <stdexcept>

namespace ftune {

void adamw_step(std::span<float> params, std::span<const float> grads, AdamWState& s, double lr,
                const AdamWHyper& h, std::span<const uint8_t> decays) {
  if (params.size() != grads.size() || s.m.size() != params.size() ||
      (!decays.empty() && decays.size() != params.size()))
    throw std::runtime_error("adamw_step: size mismatch");
  s.step += 1;
  // Scalars as torch's single-tensor AdamW forms them (in double, applied in fp32).
  const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(s.step));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, static_cast<double>(s.step)));
  const float step_size = static_cast<float>(lr / bc1);
  const float decay = static_cast<float>(1.0 - lr * h.weight_decay);
  const float w1 = static_cast<float>(1.0 - h.beta1);
  const float b2 = static_cast<float>(h.beta2), w2 = static_cast<float>(1.0 - h.beta2);
  const float eps = static_cast<float>(h.eps), bc2s = static_cast<float>(bc2_sqrt);
  const int64_t n = static_cast<int64_t>(params.size());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float g = grads[i];
    if (decays.empty() || decays[i]) params[i] *= decay;
    s.m[i] += w1 * (g - s.m[i]);  // torch: exp_avg.lerp_(grad, 1 - beta1)
    s.v[i] = s.v[i] * b2 + w2 * g * g;
    const float denom = std::sqrt(s.v[i]) / bc2s + eps;
    params[i] -= step_size * (s.m[i] / denom);
  }
}

double global_grad_norm(std::span<const float> grads) {
  double ss = 0;
  for (float g : grads) ss += static_cast<double>(g) * g;
  return std::sqrt(ss);
}

double clip_grad_norm(std::span<float> grads, double max_norm) {
  const double norm = global_grad_norm(grads);
  if (max_norm > 0) {
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0)
      for (float& g : grads) g *= static_cast<float>(coef);
  }
  return norm;
}

}  // namespace ftune
