#pragma once
// FTUNE_PROFILE=1: where a CUDA micro-step's time goes, without a profiler binary (the GPU
// machine has no nsys). CUDA events bracket each region of the step on the backend's
// stream; after the stream syncs, the elapsed times are summed per phase. The table goes
// to stderr when the backend is destroyed. Off (the default), every call is a no-op.
// Host-only C++ (events through cuda_device.hpp).
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "ftune/kernels/cuda_device.hpp"

namespace ftune::cuda::model {

enum class Phase {
  embed, norm, rope, attention_fwd, attention_bwd, base_gemm_fwd, base_gemm_bwd, lora_fwd,
  lora_bwd, dropout, elementwise, head, dequant, full_grads, recompute_total, kCount
};

class PhaseProfiler {
 public:
  PhaseProfiler();  // reads FTUNE_PROFILE
  ~PhaseProfiler();
  bool on() const { return on_; }
  void begin(Phase p, stream_t s);
  void end(Phase p, stream_t s);
  void collect();  // call after the stream synchronized: folds recorded pairs into totals
  void count_micro_step() { micro_steps_ += on_; }

 private:
  bool on_ = false;
  struct Open {
    Phase phase;
    size_t start, stop;  // indices into events_
  };
  std::vector<Event> events_;
  size_t used_ = 0;
  std::vector<Open> pending_;
  std::array<int64_t, static_cast<int>(Phase::kCount)> open_{};  // start index + 1 per phase
  std::array<double, static_cast<int>(Phase::kCount)> ms_{};
  std::array<int64_t, static_cast<int>(Phase::kCount)> calls_{};
  int64_t micro_steps_ = 0;
  size_t take();
};

// Scoped region: ProfileScope s(prof, Phase::lora_fwd, stream);
class ProfileScope {
 public:
  ProfileScope(PhaseProfiler* p, Phase phase, stream_t s) : p_(p && p->on() ? p : nullptr), phase_(phase), s_(s) {
    if (p_) p_->begin(phase_, s_);
  }
  ~ProfileScope() {
    if (p_) p_->end(phase_, s_);
  }
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;

 private:
  PhaseProfiler* p_;
  Phase phase_;
  stream_t s_;
};

}  // namespace ftune::cuda::model
