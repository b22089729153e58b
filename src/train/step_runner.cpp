// The host step runner (ZeroAdamW over host vectors) and the choice between the runners.
#include "ftune/train/step_runner.hpp"

#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "ftune/dist/nccl.hpp"
#include "ftune/train/zero_optimizer.hpp"
#if FTUNE_HAVE_CUDA
#include "ftune/model/transformer_cuda.hpp"
#endif

namespace ftune {

void StepRunner::set_decay_mask(std::span<const uint8_t>) {
  throw std::runtime_error(describe() + ": a per-parameter weight-decay mask is not supported");
}

namespace {

class HostStepRunner final : public StepRunner {
 public:
  HostStepRunner(TrainBackend& model, LoraAdapter& adapter, int stage, Communicator& comm,
                 const AdamWHyper& h)
      : model_(model), adapter_(adapter), opt_(adapter.params.size(), stage, comm, h),
        grads_(adapter.params.size(), 0.0f) {}

  std::string describe() const override {
    return "host AdamW (ZeRO " + std::to_string(opt_.stage()) + ")";
  }
  LossSum accumulate(const MicroBatch& mb, float loss_scale, uint64_t seed) override {
    return model_.forward_backward(mb, adapter_, grads_.data(), loss_scale, seed);
  }
  LossSum evaluate(const MicroBatch& mb) override { return model_.forward_loss(mb, adapter_); }
  double step(double lr, double max_grad_norm) override {
    const double norm = opt_.step(adapter_.params, grads_, lr, max_grad_norm);
    std::fill(grads_.begin(), grads_.end(), 0.0f);
    return norm;
  }
  void params_to_host(LoraAdapter& a) override {
    if (&a != &adapter_) a.params = adapter_.params;
  }
  void params_from_host(const LoraAdapter& a) override {
    if (&a != &adapter_) adapter_.params = a.params;
  }
  void set_decay_mask(std::span<const uint8_t> decays) override { opt_.set_decay_mask(decays); }
  ShardRange owned() const override { return opt_.owned(); }
  size_t state_bytes() const override { return opt_.state_bytes(); }
  OptimizerShard export_shard(std::span<const float> params) override {
    return opt_.export_shard(params);
  }
  void import_shard(const OptimizerShard& s, std::span<float> params) override {
    opt_.import_shard(s, params);
  }

 private:
  TrainBackend& model_;
  LoraAdapter& adapter_;
  ZeroAdamW opt_;
  std::vector<float> grads_;
};

}  // namespace

std::unique_ptr<StepRunner> make_host_step_runner(TrainBackend& model, LoraAdapter& adapter,
                                                  int stage, Communicator& comm,
                                                  const AdamWHyper& h) {
  return std::make_unique<HostStepRunner>(model, adapter, stage, comm, h);
}

std::unique_ptr<StepRunner> make_step_runner(TrainBackend& model, LoraAdapter& adapter,
                                             int stage, Communicator& comm,
                                             const AdamWHyper& h, bool offload_optimizer) {
#if FTUNE_HAVE_CUDA
  // FTUNE_HOST_OPTIMIZER=1 (tests): the host runner, the adapter crossing PCIe per micro-batch.
  const char* force_host = std::getenv("FTUNE_HOST_OPTIMIZER");
  const bool host = force_host && *force_host && std::string(force_host) != "0";
  const bool gpu = dynamic_cast<CudaTransformer*>(&model) != nullptr;
  if (!host && gpu && offload_optimizer)
    return make_cuda_offload_step_runner(model, adapter, stage, comm, h);
  if (!host && gpu && (comm.size() == 1 || nccl_available()))
    return make_cuda_step_runner(model, adapter, stage, comm, h);
#else
  (void)offload_optimizer;  // on the CPU backend everything is in host memory anyway
#endif
  return make_host_step_runner(model, adapter, stage, comm, h);
}

#if !FTUNE_HAVE_CUDA
std::unique_ptr<StepRunner> make_cuda_step_runner(TrainBackend&, LoraAdapter&, int,
                                                  Communicator&, const AdamWHyper&) {
  throw std::runtime_error("this ftune was built without the CUDA backend");
}
std::unique_ptr<StepRunner> make_cuda_offload_step_runner(TrainBackend&, LoraAdapter&, int,
                                                          Communicator&, const AdamWHyper&) {
  throw std::runtime_error("this ftune was built without the CUDA backend");
}
#endif

}  // namespace ftune
