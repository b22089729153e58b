#include "ftune/train/schedule.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace ftune {

double LrSchedule::at(int64_t step) const {
  const double s = static_cast<double>(step), w = static_cast<double>(warmup_steps);
  const double T = static_cast<double>(total_steps);
  double f = 1.0;
  if (type == "constant") {
    f = 1.0;  // HF's "constant" ignores warmup
  } else if (step < warmup_steps) {
    f = s / std::max(1.0, w);
  } else if (type == "constant_with_warmup") {
    f = 1.0;
  } else if (type == "linear") {
    f = std::max(0.0, (T - s) / std::max(1.0, T - w));
  } else if (type == "cosine") {
    const double progress = (s - w) / std::max(1.0, T - w);
    f = std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * 0.5 * 2.0 * progress)));
  } else {
    throw std::runtime_error("unknown lr_scheduler_type '" + type + "'");
  }
  return base_lr * f;
}

int64_t resolve_warmup_steps(int64_t warmup_steps, double warmup_ratio, int64_t total_steps) {
  if (warmup_steps > 0) return warmup_steps;
  return static_cast<int64_t>(std::ceil(warmup_ratio * static_cast<double>(total_steps)));
}

}  // namespace ftune
