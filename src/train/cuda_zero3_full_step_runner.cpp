// zero_stage = 3 with use_peft = false on the CUDA backend: this rank's GPU holds the fp32
// masters, bf16 copy, gradient accumulator and Adam moments of its range of the parameter
// vector only (shard_range, the CPU twin's and ZeRO-1/2's range), and the backend gathers
// each block from the owners as it needs it (CudaTransformer::shard_full_finetuning). The
// gradient arrives summed over ranks (the backend flushes each block after its backward),
// so a step is: squared norm of the range (deterministic reduction, all-reduced), clip
// coefficient on the device, AdamW over the range, its bf16 copy. Nothing is gathered at the
// end of a step. Device memory per rank: 18 bytes per owned parameter plus the block slots
// (about 6 bytes per parameter of the largest blocks: a layer, the embedding table and the
// tail) instead of 18 per parameter of the model.
#include "ftune/train/step_runner.hpp"

#if FTUNE_HAVE_CUDA

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "ftune/dist/nccl.hpp"
#include "ftune/kernels/cuda_device.hpp"
#include "ftune/kernels/cuda_optim.hpp"
#include "ftune/model/transformer_cuda.hpp"
#include "cuda_adamw_state.hpp"

namespace ftune {

namespace {

namespace cu = ftune::cuda;

class CudaZero3FullStepRunner final : public StepRunner {
 public:
  CudaZero3FullStepRunner(CudaTransformer& model, const LoraAdapter& full, Communicator& comm,
                          const AdamWHyper& h, CudaTransformer::FullSharding sharding)
      : model_(model), comm_(comm), n_(full.params.size()),
        own_(shard_range(n_, comm.rank(), comm.size())), adam_(own_, h),
        all_reduce_(sharding.all_reduce_sum) {
    layout_.spec = full.spec;
    layout_.model = full.model;
    layout_.slot_of = full.slot_of;
    model_.shard_full_finetuning(std::move(sharding));
    const size_t k = std::max<size_t>(own_.size(), 1);
    master_ = cu::DeviceBuffer(k * sizeof(float));
    params16_ = cu::DeviceBuffer(k * sizeof(cu::bf16));
    grads_ = cu::DeviceBuffer(k * sizeof(float));
    grads_.zero();
    params_from_host(full);
  }

  std::string describe() const override {
    return "GPU AdamW (ZeRO 3: parameters, gradients and optimizer state sharded)";
  }
  LossSum accumulate(const MicroBatch& mb, float loss_scale, uint64_t seed) override {
    return model_.forward_backward_on_device(mb, layout_, params16_.as<cu::bf16>(),
                                             grads_.as<float>(), loss_scale, seed);
  }
  LossSum evaluate(const MicroBatch& mb) override {
    return model_.forward_loss_on_device(mb, layout_, params16_.as<cu::bf16>());
  }

  double step(double lr, double max_grad_norm) override {
    const cu::stream_t s = model_.stream();
    float* g = grads_.as<float>();
    const int64_t n = static_cast<int64_t>(own_.size());
    float* sumsq = adam_.squared_norm(g, n, s);
    if (comm_.size() > 1) all_reduce_(sumsq, 1, s);
    adam_.clip(max_grad_norm, s);
    adam_.update(master_.as<float>(), g, lr, s);
    cu::to_bf16(params16_.as<cu::bf16>(), master_.as<float>(), n, s);
    cu::zero_async(g, n, s);
    const float norm = adam_.norm_on_host(s);
    model_.drop_gathered();
    return norm;
  }

  // Collective: every rank ends with the whole vector.
  void params_to_host(LoraAdapter& a) override {
    std::vector<float> mine(own_.size());
    cu::copy_to_host_async(mine.data(), master_.get(), own_.size() * sizeof(float),
                           model_.stream());
    cu::synchronize(model_.stream());
    a.params.resize(n_);
    comm_.all_gather(mine, a.params);
  }
  void params_from_host(const LoraAdapter& a) override {
    if (a.params.size() != n_)
      throw std::runtime_error("ZeRO-3 step runner: parameter vector size changed");
    const cu::stream_t s = model_.stream();
    cu::copy_to_device_async(master_.get(), a.params.data() + own_.begin,
                             own_.size() * sizeof(float), s);
    cu::to_bf16(params16_.as<cu::bf16>(), master_.as<float>(),
                static_cast<int64_t>(own_.size()), s);
    cu::synchronize(s);
    model_.drop_gathered();
  }
  void set_decay_mask(std::span<const uint8_t> decays) override {
    if (decays.size() != n_) throw std::runtime_error("ZeRO-3 step runner: decay mask size");
    adam_.set_decay_mask(decays);
  }
  ShardRange owned() const override { return own_; }
  size_t state_bytes() const override { return 3 * own_.size() * sizeof(float); }
  OptimizerShard export_shard(std::span<const float>) override {
    OptimizerShard out;
    out.rank = comm_.rank();
    out.world_size = comm_.size();
    const cu::stream_t s = model_.stream();
    out.master.resize(own_.size());
    cu::copy_to_host_async(out.master.data(), master_.get(), own_.size() * sizeof(float), s);
    adam_.export_moments(out, own_, s);  // waits for the stream
    return out;
  }
  void import_shard(const OptimizerShard& sh, std::span<float> params) override {
    adam_.import_moments(sh, model_.stream());
    if (params.size() == n_) std::copy(sh.master.begin(), sh.master.end(), params.begin() + own_.begin);
  }

 private:
  CudaTransformer& model_;
  Communicator& comm_;
  size_t n_;
  ShardRange own_;
  CudaAdamWState adam_;  // over own_
  std::function<void(float*, size_t, cu::stream_t)> all_reduce_;
  LoraAdapter layout_;  // the full model's shape (no slots), without its values
  cu::DeviceBuffer master_, params16_, grads_;
};

}  // namespace

std::unique_ptr<StepRunner> make_cuda_zero3_full_step_runner(
    TrainBackend& model, const LoraAdapter& full_model, Communicator& comm,
    const AdamWHyper& h, CudaTransformer::FullSharding sharding) {
  auto* cuda_model = dynamic_cast<CudaTransformer*>(&model);
  if (!cuda_model || !cuda_model->full_finetuning())
    throw std::runtime_error("ZeRO-3 full fine-tuning needs a full fine-tuning CUDA backend");
  return std::make_unique<CudaZero3FullStepRunner>(*cuda_model, full_model, comm, h,
                                                   std::move(sharding));
}

CudaTransformer::FullSharding nccl_full_sharding(Communicator& comm) {
  CudaTransformer::FullSharding z;
  z.rank = comm.rank();
  z.size = comm.size();
  if (comm.size() > 1) {
    // Its own NCCL communicator: the backend's gathers and flushes run on its side stream,
    // the step's norm on the compute stream, never at the same time (the backend joins the
    // side stream before a call returns; its side work waits for the compute stream).
    std::shared_ptr<NcclCommunicator> nccl = NcclCommunicator::create(comm);
    z.broadcast = [nccl](void* data, size_t bytes, int root, cu::stream_t s) {
      nccl->broadcast_bytes(data, bytes, root, s);
    };
    z.all_reduce_sum = [nccl](float* data, size_t n, cu::stream_t s) {
      nccl->all_reduce_sum(data, n, s);
    };
  }
  return z;
}

std::unique_ptr<StepRunner> make_cuda_zero3_full_step_runner(TrainBackend& model,
                                                             const LoraAdapter& full_model,
                                                             Communicator& comm,
                                                             const AdamWHyper& h) {
  return make_cuda_zero3_full_step_runner(model, full_model, comm, h, nccl_full_sharding(comm));
}

}  // namespace ftune

#endif  // FTUNE_HAVE_CUDA
