#include "ftune/train/zero_optimizer.hpp"

#include <cmath>
#include <stdexcept>

namespace ftune {

ZeroAdamW::ZeroAdamW(size_t n, int stage, Communicator& comm, const AdamWHyper& hyper)
    : comm_(comm), stage_(stage), hyper_(hyper), n_(n) {
  if (stage < 0 || stage > 3) throw std::runtime_error("zero_stage must be 0, 1, 2 or 3");
  owned_ = stage == 0 ? ShardRange{0, n} : shard_range(n, comm.rank(), comm.size());
  state_.resize(owned_.size());
  if (stage >= 2 && comm.size() > 1) grad_shard_.resize(owned_.size());
}

size_t ZeroAdamW::state_bytes() const {
  // Adam moments plus the fp32 master copy of the owned range.
  return 3 * owned_.size() * sizeof(float);
}

double ZeroAdamW::step(std::span<float> params, std::span<float> grads, double lr,
                       double max_grad_norm) {
  if (params.size() != n_) throw std::runtime_error("ZeroAdamW: size mismatch");
  const double norm = begin_step(grads, max_grad_norm);
  update(params, owned_.begin, owned_.end, lr);
  end_step(params);
  return norm;
}

double ZeroAdamW::begin_step(std::span<float> grads, double max_grad_norm) {
  if (grads.size() != n_) throw std::runtime_error("ZeroAdamW: size mismatch");
  const bool multi = comm_.size() > 1;
  double norm = 0;
  if (stage_ >= 2 && multi) {  // ZeRO-3 shards the adapter like ZeRO-2 (its frozen weights: the backend)
    comm_.reduce_scatter_sum(grads, grad_shard_);
    g_ = grad_shard_;
    double ss = sum_of_squares(g_);
    std::span<double> ss_span(&ss, 1);
    comm_.all_reduce_sum(ss_span);
    norm = std::sqrt(ss);
  } else {
    if (multi) comm_.all_reduce_sum(grads);
    norm = global_grad_norm(grads);
    g_ = grads.subspan(owned_.begin, owned_.size());
  }
  // Same coefficient as clip_grad_norm_, applied to the owned range only.
  const float coef = clip_coefficient(norm, max_grad_norm);
  if (coef != 1.0f) scale_in_place(g_, coef);
  state_.step += 1;
  return norm;
}

void ZeroAdamW::update(std::span<float> params, size_t lo, size_t hi, double lr) {
  if (params.size() != n_ || lo < owned_.begin || hi > owned_.end || lo > hi)
    throw std::runtime_error("ZeroAdamW::update: range outside this rank's shard");
  const size_t o = lo - owned_.begin;
  apply(params, lo, g_.subspan(o, hi - lo), lr, 1.0f, {});  // g_ is clipped already
}

// AdamW on params[lo, lo + grads.size()) inside owned(), the gradient scaled by clip first.
void ZeroAdamW::apply(std::span<float> params, size_t lo, std::span<const float> grads,
                      double lr, float clip, std::span<float> copy_to) {
  const size_t o = lo - owned_.begin, len = grads.size();
  std::span<const uint8_t> d;
  if (!decays_.empty()) d = std::span<const uint8_t>(decays_).subspan(o, len);
  adamw_update(params.subspan(lo, len), grads, std::span<float>(state_.m).subspan(o, len),
               std::span<float>(state_.v).subspan(o, len), state_.step, lr, hyper_, d, clip,
               copy_to);
}

double ZeroAdamW::begin_streamed_step(double sum_sq, double max_grad_norm) {
  if (comm_.size() != 1) throw std::logic_error("ZeroAdamW: a streamed step is for one rank");
  const double norm = std::sqrt(sum_sq);
  clip_ = clip_coefficient(norm, max_grad_norm);
  state_.step += 1;
  return norm;
}

void ZeroAdamW::update_streamed(std::span<float> params, size_t lo,
                                std::span<const float> grads, double lr, float* copy_to) {
  const size_t len = grads.size();
  if (params.size() != n_ || lo + len > n_)
    throw std::runtime_error("ZeroAdamW::update_streamed: range outside the vector");
  // One pass: clip, update, and copy out (one rank: owned() is the whole vector).
  apply(params, lo, grads, lr, clip_, copy_to ? std::span<float>(copy_to, len) : std::span<float>());
}

void ZeroAdamW::end_step(std::span<float> params) {
  if (gathers()) comm_.all_gather(params.subspan(owned_.begin, owned_.size()), params);
}

void ZeroAdamW::set_decay_mask(std::span<const uint8_t> decays) {
  if (decays.size() != n_) throw std::runtime_error("ZeroAdamW: decay mask size mismatch");
  decays_.assign(decays.begin() + owned_.begin, decays.begin() + owned_.end);
}

OptimizerShard ZeroAdamW::export_shard(std::span<const float> params) const {
  // Stage 0 keeps everything on every rank, but each rank saves only its balanced shard so
  // the files of a checkpoint always tile the vector once.
  const ShardRange r = shard_range(n_, comm_.rank(), comm_.size());
  OptimizerShard s;
  s.rank = comm_.rank();
  s.world_size = comm_.size();
  s.begin = r.begin;
  s.end = r.end;
  s.step = state_.step;
  const size_t off = r.begin - owned_.begin;
  s.m.assign(state_.m.begin() + off, state_.m.begin() + off + r.size());
  s.v.assign(state_.v.begin() + off, state_.v.begin() + off + r.size());
  s.master.assign(params.begin() + r.begin, params.begin() + r.end);
  return s;
}

void ZeroAdamW::import_shard(const OptimizerShard& s, std::span<float> params) {
  if (s.begin != owned_.begin || s.end != owned_.end)
    throw std::runtime_error("optimizer shard range does not match this rank's");
  state_.step = s.step;
  state_.m = s.m;
  state_.v = s.v;
  std::copy(s.master.begin(), s.master.end(), params.begin() + owned_.begin);
}

}  // namespace ftune
