// Host code of the phase profiler (a .cu so that it builds only with the CUDA backend).
#include "profiler.cuh"

#include <cstdio>
#include <cstdlib>

namespace ftune::cuda::model {

namespace {
const char* phase_name(int p) {
  static const char* names[] = {"embedding",        "rms_norm",         "rope",
                                "attention fwd",    "attention bwd",    "base GEMM fwd",
                                "base GEMM bwd",    "LoRA fwd",         "LoRA bwd",
                                "LoRA dropout",     "swiglu/residual",  "head (lm_head+CE)",
                                "dequantise",       "full FT weight grads",
                                "recompute (total)"};
  return names[p];
}
}  // namespace

PhaseProfiler::PhaseProfiler() {
  const char* e = std::getenv("FTUNE_PROFILE");
  on_ = e && *e && std::string(e) != "0";
}

size_t PhaseProfiler::take() {
  if (used_ == events_.size()) events_.emplace_back();
  return used_++;
}

void PhaseProfiler::begin(Phase p, stream_t s) {
  const size_t i = take();
  events_[i].record(s);
  open_[static_cast<int>(p)] = static_cast<int64_t>(i) + 1;
}

void PhaseProfiler::end(Phase p, stream_t s) {
  const int k = static_cast<int>(p);
  if (!open_[k]) return;
  const size_t i = take();
  events_[i].record(s);
  pending_.push_back({p, static_cast<size_t>(open_[k] - 1), i});
  open_[k] = 0;
}

void PhaseProfiler::collect() {
  if (!on_) return;
  for (const Open& o : pending_) {
    events_[o.stop].synchronize();
    ms_[static_cast<int>(o.phase)] += events_[o.stop].elapsed_ms_since(events_[o.start]);
    ++calls_[static_cast<int>(o.phase)];
  }
  pending_.clear();
  used_ = 0;
}

PhaseProfiler::~PhaseProfiler() {
  if (!on_ || micro_steps_ == 0) return;
  double total = 0;
  for (int p = 0; p < static_cast<int>(Phase::recompute_total); ++p) total += ms_[p];
  std::fprintf(stderr, "\n[ftune profile] %lld micro-steps; GPU time per micro-step by phase\n",
               static_cast<long long>(micro_steps_));
  std::fprintf(stderr, "| phase | ms / micro-step | share | regions / micro-step |\n|---|---:|---:|---:|\n");
  for (int p = 0; p < static_cast<int>(Phase::kCount); ++p) {
    if (!calls_[p]) continue;
    const bool aggregate = p == static_cast<int>(Phase::recompute_total);
    std::fprintf(stderr, "| %s | %.2f | %s%.1f%% | %.0f |\n", phase_name(p), ms_[p] / micro_steps_,
                 aggregate ? "(of all) " : "", total > 0 ? 100.0 * ms_[p] / total : 0.0,
                 static_cast<double>(calls_[p]) / micro_steps_);
  }
  std::fprintf(stderr, "| sum of phases | %.2f | 100%% | |\n", total / micro_steps_);
}

}  // namespace ftune::cuda::model
