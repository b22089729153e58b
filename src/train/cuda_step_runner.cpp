// The CUDA step runner: the adapter's fp32 master weights, its bf16 copy, the gradient
// accumulator and the Adam moments all live on the GPU of a CudaTransformer. One step:
//   stage 0/1: NCCL all-reduce of the gradients;   stage 2 (and 3): NCCL reduce-scatter;
//   squared norm (deterministic reduction; stage 2 all-reduces the shards' partial sums),
//   clip coefficient on the device, AdamW over the owned range, NCCL all-gather of the
//   updated masters (stages 1-3), bf16 copy for the next forward.
// Everything is enqueued on the model's stream, so the collectives are ordered after the
// backward that produced the gradients; the host waits once per step, for the norm.
// Overlapping the reduction with the backward is not done: with gradient accumulation the
// reduction runs once per optimizer step, and for LoRA it moves tens of MB (under 1 ms on
// NVLink) against a step of hundreds of ms.
#include "ftune/train/step_runner.hpp"

#if FTUNE_HAVE_CUDA

#include <algorithm>
#include <span>
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

class CudaStepRunner final : public StepRunner {
 public:
  CudaStepRunner(CudaTransformer& model, LoraAdapter& adapter, int stage, Communicator& comm,
                 const AdamWHyper& h)
      : model_(model), layout_(adapter), comm_(comm), stage_(stage), n_(adapter.params.size()),
        chunk_(padded_chunk(n_, comm.size())),
        owned_(stage == 0 ? ShardRange{0, n_} : chunk_range(n_, chunk_, comm.rank())),
        adam_(owned_, h) {
    if (stage < 0 || stage > 3) throw std::runtime_error("zero_stage must be 0, 1, 2 or 3");
    if (comm.size() > 1) nccl_ = NcclCommunicator::create(comm);
    padded_ = chunk_ * static_cast<size_t>(comm.size());
    master_ = cu::DeviceBuffer(padded_ * sizeof(float));
    params16_ = cu::DeviceBuffer(n_ * sizeof(cu::bf16));
    grads_ = cu::DeviceBuffer(padded_ * sizeof(float));
    master_.zero();
    grads_.zero();
    params_from_host(adapter);
  }

  std::string describe() const override {
    return "GPU AdamW (ZeRO " + std::to_string(stage_) + (nccl_ ? ", NCCL" : "") + ")";
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
    const size_t r = static_cast<size_t>(comm_.rank());
    const float* g_owned = g + owned_.begin;
    if (stage_ >= 2 && nccl_) {  // ZeRO-3: the adapter as ZeRO-2 (frozen weights: the backend)
      // In place: rank r's summed chunk lands at g + r * chunk = g + owned.begin.
      nccl_->reduce_scatter_sum(g, g + r * chunk_, chunk_, s);
      nccl_->all_reduce_sum(adam_.squared_norm(g_owned, static_cast<int64_t>(owned_.size()), s),
                            1, s);
    } else {
      if (nccl_) nccl_->all_reduce_sum(g, n_, s);
      adam_.squared_norm(g, static_cast<int64_t>(n_), s);
    }
    adam_.clip(max_grad_norm, s);
    adam_.update(master_.as<float>() + owned_.begin, g_owned, lr, s);
    if (stage_ > 0 && nccl_) {
      float* p = master_.as<float>();
      nccl_->all_gather(p + r * chunk_, p, chunk_, s);
    }
    cu::to_bf16(params16_.as<cu::bf16>(), master_.as<float>(), static_cast<int64_t>(n_), s);
    cu::zero_async(g, static_cast<int64_t>(padded_), s);
    return adam_.norm_on_host(s);
  }

  void params_to_host(LoraAdapter& a) override {
    a.params.resize(n_);
    cu::copy_to_host_async(a.params.data(), master_.get(), n_ * sizeof(float), model_.stream());
    cu::synchronize(model_.stream());
  }
  void params_from_host(const LoraAdapter& a) override {
    if (a.params.size() != n_) throw std::runtime_error("CudaStepRunner: adapter size changed");
    const cu::stream_t s = model_.stream();
    cu::copy_to_device_async(master_.get(), a.params.data(), n_ * sizeof(float), s);
    cu::to_bf16(params16_.as<cu::bf16>(), master_.as<float>(), static_cast<int64_t>(n_), s);
    cu::synchronize(s);
  }

  void set_decay_mask(std::span<const uint8_t> decays) override {
    if (decays.size() != n_)
      throw std::runtime_error("CudaStepRunner: decay mask size differs from the parameters");
    adam_.set_decay_mask(decays);
  }

  ShardRange owned() const override { return owned_; }
  size_t state_bytes() const override { return 3 * owned_.size() * sizeof(float); }

  OptimizerShard export_shard(std::span<const float> params) override {
    // Stage 0 keeps everything everywhere; each rank saves its balanced shard so that the
    // files tile the vector once (as ZeroAdamW does). Stages 1/2 save the owned chunk.
    const ShardRange e = stage_ == 0 ? shard_range(n_, comm_.rank(), comm_.size()) : owned_;
    OptimizerShard out;
    out.rank = comm_.rank();
    out.world_size = comm_.size();
    adam_.export_moments(out, e, model_.stream());
    out.master.assign(params.begin() + e.begin, params.begin() + e.end);
    return out;
  }

  void import_shard(const OptimizerShard& sh, std::span<float> params) override {
    adam_.import_moments(sh, model_.stream());
    std::copy(sh.master.begin(), sh.master.end(), params.begin() + owned_.begin);
  }

 private:
  CudaTransformer& model_;
  const LoraAdapter& layout_;  // slots and spec; its params are not read while training
  Communicator& comm_;
  int stage_;
  size_t n_, chunk_, padded_ = 0;
  ShardRange owned_;
  CudaAdamWState adam_;  // over owned_
  std::unique_ptr<NcclCommunicator> nccl_;
  cu::DeviceBuffer master_, params16_, grads_;

  // NCCL's reduce-scatter and all-gather want equal chunks: the vector padded to W chunks.
  static size_t padded_chunk(size_t n, int world) {
    const size_t W = static_cast<size_t>(world);
    return (n + W - 1) / W;
  }
  static ShardRange chunk_range(size_t n, size_t chunk, int rank) {
    const size_t r = static_cast<size_t>(rank);
    return ShardRange{std::min(n, r * chunk), std::min(n, (r + 1) * chunk)};
  }
};

}  // namespace

std::unique_ptr<StepRunner> make_cuda_step_runner(TrainBackend& model, LoraAdapter& adapter,
                                                  int stage, Communicator& comm,
                                                  const AdamWHyper& h) {
  auto* cuda_model = dynamic_cast<CudaTransformer*>(&model);
  if (!cuda_model) throw std::runtime_error("make_cuda_step_runner: the backend is not CUDA");
  if (comm.size() > 1 && !nccl_available())
    throw std::runtime_error("multi-rank GPU training without the host optimizer needs NCCL");
  return std::make_unique<CudaStepRunner>(*cuda_model, adapter, stage, comm, h);
}

}  // namespace ftune

#endif  // FTUNE_HAVE_CUDA
