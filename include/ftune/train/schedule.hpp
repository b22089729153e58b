#pragma once
// train module: learning-rate schedules with warmup, as transformers.get_scheduler builds them.
#include <cstdint>
#include <string>

namespace ftune {

struct LrSchedule {
  std::string type = "linear";  // constant | constant_with_warmup | linear | cosine
  double base_lr = 0;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  // Learning rate used by optimizer step `step` (0-based).
  double at(int64_t step) const;
};

// HF: warmup_steps if > 0, else ceil(warmup_ratio * total_steps).
int64_t resolve_warmup_steps(int64_t warmup_steps, double warmup_ratio, int64_t total_steps);

}  // namespace ftune
