#include "ftune/train/optimizer.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace ftune {

void adamw_step(std::span<float> params, std::span<const float> grads, AdamWState& s, double lr,
                const AdamWHyper& h, std::span<const uint8_t> decays) {
  if (s.m.size() != params.size() || s.v.size() != params.size())
    throw std::runtime_error("adamw_step: size mismatch");
  s.step += 1;
  adamw_update(params, grads, s.m, s.v, s.step, lr, h, decays);
}

void adamw_update(std::span<float> params, std::span<const float> grads, std::span<float> m,
                  std::span<float> v, int64_t step, double lr, const AdamWHyper& h,
                  std::span<const uint8_t> decays, float grad_scale, std::span<float> copy_to) {
  if (params.size() != grads.size() || m.size() != params.size() || v.size() != params.size() ||
      (!decays.empty() && decays.size() != params.size()) ||
      (!copy_to.empty() && copy_to.size() != params.size()))
    throw std::runtime_error("adamw_update: size mismatch");
  // Scalars as torch's single-tensor AdamW forms them (in double, applied in fp32).
  const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(step));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, static_cast<double>(step)));
  const float step_size = static_cast<float>(lr / bc1);
  const float decay = static_cast<float>(1.0 - lr * h.weight_decay);
  const float w1 = static_cast<float>(1.0 - h.beta1);
  const float b2 = static_cast<float>(h.beta2), w2 = static_cast<float>(1.0 - h.beta2);
  const float eps = static_cast<float>(h.eps), bc2s = static_cast<float>(bc2_sqrt);
  const int64_t n = static_cast<int64_t>(params.size());
  const bool scaled = grad_scale != 1.0f;
  float* out = copy_to.empty() ? nullptr : copy_to.data();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float g = grads[i];
    if (scaled) g *= grad_scale;
    if (decays.empty() || decays[i]) params[i] *= decay;
    m[i] += w1 * (g - m[i]);  // torch: exp_avg.lerp_(grad, 1 - beta1)
    v[i] = v[i] * b2 + w2 * g * g;
    const float denom = std::sqrt(v[i]) / bc2s + eps;
    params[i] -= step_size * (m[i] / denom);
    if (out) out[i] = params[i];
  }
}

double sum_of_squares(std::span<const float> x) {
  constexpr size_t kBlock = kSumOfSquaresBlock;
  const int64_t blocks = static_cast<int64_t>((x.size() + kBlock - 1) / kBlock);
  std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const size_t lo = static_cast<size_t>(b) * kBlock, hi = std::min(x.size(), lo + kBlock);
    double ss = 0;
    for (size_t i = lo; i < hi; ++i) ss += static_cast<double>(x[i]) * x[i];
    partial[static_cast<size_t>(b)] = ss;
  }
  return sum_in_order(partial);
}

double sum_in_order(std::span<const double> block_sums) {
  double ss = 0;
  for (double p : block_sums) ss += p;
  return ss;
}

double global_grad_norm(std::span<const float> grads) { return std::sqrt(sum_of_squares(grads)); }

void scale_in_place(std::span<float> x, float coef) {
  const int64_t n = static_cast<int64_t>(x.size());
#pragma omp parallel for schedule(static) if (n > (int64_t{1} << 16))
  for (int64_t i = 0; i < n; ++i) x[static_cast<size_t>(i)] *= coef;
}

float clip_coefficient(double norm, double max_norm) {
  if (max_norm <= 0) return 1.0f;
  const double coef = max_norm / (norm + 1e-6);
  return coef < 1.0 ? static_cast<float>(coef) : 1.0f;
}

double clip_grad_norm(std::span<float> grads, double max_norm) {
  const double norm = global_grad_norm(grads);
  const float coef = clip_coefficient(norm, max_norm);
  if (coef != 1.0f) scale_in_place(grads, coef);
  return norm;
}

}  // namespace ftune
