// zero_stage = 3 with use_peft = false on the CPU backend: the step runner owns the trained
// shards (model/zero3_trained.hpp) and the model that computes from them. Each rank keeps
// the masters, gradient accumulator and Adam moments of its shard_range only (the same
// range ZeroAdamW's stages 1-2 give it, so checkpoints are interchangeable). The gradient
// arrives already summed over ranks (the backend flushes each block after its backward), so
// a step is: norm of the shards (all-reduced), clip, AdamW on the shard. Nothing is gathered
// at the end of a step; the next micro-batch gathers each block as it needs it.
#include <cmath>
#include <stdexcept>
#include <vector>

#include "ftune/model/transformer_cpu.hpp"
#include "ftune/model/zero3_trained.hpp"
#include "ftune/train/full_finetune.hpp"
#include "ftune/train/step_runner.hpp"

namespace ftune {

namespace {

class Zero3FullStepRunner final : public StepRunner {
 public:
  Zero3FullStepRunner(const LoraAdapter& full, Communicator& comm, const AdamWHyper& h,
                      bool gradient_checkpointing)
      : comm_(comm), hyper_(h), layout_(full_model_shape(full.model)),
        shards_(full.model, comm.rank(), comm.size(), collectives(comm), full.params),
        model_(shards_, gradient_checkpointing) {
    state_.resize(shards_.owned().size());
  }

  std::string describe() const override {
    return "host AdamW (ZeRO 3: parameters, gradients and optimizer state sharded)";
  }
  LossSum accumulate(const MicroBatch& mb, float loss_scale, uint64_t) override {
    return model_.forward_backward_full(mb, nullptr, loss_scale);
  }
  LossSum evaluate(const MicroBatch& mb) override { return model_.forward_loss(mb, layout_); }

  double step(double lr, double max_grad_norm) override {
    const std::span<float> g = shards_.grads();
    double ss = sum_of_squares(g);  // as ZeroAdamW's stage 2: the shards' sums, all-reduced
    if (comm_.size() > 1) comm_.all_reduce_sum(std::span<double>(&ss, 1));
    const double norm = std::sqrt(ss);
    state_.step += 1;
    adamw_update(shards_.params(), g, state_.m, state_.v, state_.step, lr, hyper_, decays_,
                 clip_coefficient(norm, max_grad_norm));
    std::fill(g.begin(), g.end(), 0.0f);
    shards_.invalidate();
    return norm;
  }

  // Collective: every rank ends with the whole vector (saves are rare; the vector is freed
  // by the trainer afterwards).
  void params_to_host(LoraAdapter& a) override {
    a.params.resize(shards_.num_params());
    comm_.all_gather(shards_.params(), a.params);
  }
  void params_from_host(const LoraAdapter& a) override {
    if (a.params.size() != shards_.num_params())
      throw std::runtime_error("ZeRO-3 step runner: parameter vector size changed");
    const ShardRange o = shards_.owned();
    std::copy(a.params.begin() + o.begin, a.params.begin() + o.end, shards_.params().begin());
    shards_.invalidate();
  }
  void set_decay_mask(std::span<const uint8_t> decays) override {
    if (decays.size() != shards_.num_params())
      throw std::runtime_error("ZeRO-3 step runner: decay mask size mismatch");
    const ShardRange o = shards_.owned();
    decays_.assign(decays.begin() + o.begin, decays.begin() + o.end);
  }
  ShardRange owned() const override { return shards_.owned(); }
  size_t state_bytes() const override { return 3 * shards_.owned().size() * sizeof(float); }
  OptimizerShard export_shard(std::span<const float>) override {
    OptimizerShard s;
    const ShardRange o = shards_.owned();
    s.rank = comm_.rank();
    s.world_size = comm_.size();
    s.begin = o.begin;
    s.end = o.end;
    s.step = state_.step;
    s.m = state_.m;
    s.v = state_.v;
    s.master.assign(shards_.params().begin(), shards_.params().end());
    return s;
  }
  void import_shard(const OptimizerShard& s, std::span<float> params) override {
    const ShardRange o = shards_.owned();
    if (s.begin != o.begin || s.end != o.end)
      throw std::runtime_error("optimizer shard range does not match this rank's");
    state_.step = s.step;
    state_.m = s.m;
    state_.v = s.v;
    std::copy(s.master.begin(), s.master.end(), shards_.params().begin());
    if (params.size() == shards_.num_params())
      std::copy(s.master.begin(), s.master.end(), params.begin() + o.begin);
    shards_.invalidate();
  }

  const Zero3TrainedWeights& shards() const { return shards_; }

 private:
  static Zero3Collectives collectives(Communicator& comm) {
    Zero3Collectives c;
    c.broadcast = [&comm](std::span<float> data, int root) {
      comm.broadcast(std::as_writable_bytes(data), root);
    };
    c.all_reduce_sum = [&comm](std::span<float> data) { comm.all_reduce_sum(data); };
    return c;
  }

  Communicator& comm_;
  AdamWHyper hyper_;
  LoraAdapter layout_;  // the full model's adapter shape, without its values
  Zero3TrainedWeights shards_;
  CpuTransformer model_;
  AdamWState state_;
  std::vector<uint8_t> decays_;  // owned range; empty = decay everything
};

}  // namespace

std::unique_ptr<StepRunner> make_zero3_full_step_runner(const LoraAdapter& full_model,
                                                        Communicator& comm,
                                                        const AdamWHyper& h,
                                                        bool gradient_checkpointing) {
  return std::make_unique<Zero3FullStepRunner>(full_model, comm, h, gradient_checkpointing);
}

size_t zero3_full_bytes(const StepRunner& runner) {
  const auto* z = dynamic_cast<const Zero3FullStepRunner*>(&runner);
  return z ? z->shards().bytes() : 0;
}

}  // namespace ftune
