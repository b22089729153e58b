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

namespace ftune {

namespace {

namespace cu = ftune::cuda;

class CudaStepRunner final : public StepRunner {
 public:
  CudaStepRunner(CudaTransformer& model, LoraAdapter& adapter, int stage, Communicator& comm,
                 const AdamWHyper& h)
      : model_(model), layout_(adapter), comm_(comm), stage_(stage), hyper_(h),
        n_(adapter.params.size()) {
    if (stage < 0 || stage > 3) throw std::runtime_error("zero_stage must be 0, 1, 2 or 3");
    const size_t W = static_cast<size_t>(comm.size());
    if (W > 1) nccl_ = NcclCommunicator::create(comm);
    // NCCL's reduce-scatter and all-gather want equal chunks: pad the vector to W chunks.
    chunk_ = (n_ + W - 1) / W;
    padded_ = chunk_ * W;
    const size_t r = static_cast<size_t>(comm.rank());
    owned_ = stage == 0 ? ShardRange{0, n_}
                        : ShardRange{std::min(n_, r * chunk_), std::min(n_, (r + 1) * chunk_)};
    master_ = cu::DeviceBuffer(padded_ * sizeof(float));
    params16_ = cu::DeviceBuffer(n_ * sizeof(cu::bf16));
    grads_ = cu::DeviceBuffer(padded_ * sizeof(float));
    m_ = cu::DeviceBuffer(std::max<size_t>(owned_.size(), 1) * sizeof(float));
    v_ = cu::DeviceBuffer(std::max<size_t>(owned_.size(), 1) * sizeof(float));
    scalars_ = cu::DeviceBuffer(4 * sizeof(float));  // sumsq, norm, scale
    reduce_ws_ = cu::DeviceBuffer(cu::kReduceWorkspaceFloats * sizeof(float));
    master_.zero();
    grads_.zero();
    m_.zero();
    v_.zero();
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
    float* sumsq = scalars_.as<float>();
    float* norm = sumsq + 1;
    float* scale = sumsq + 2;
    const size_t r = static_cast<size_t>(comm_.rank());
    const float* g_owned = g + owned_.begin;
    if (stage_ >= 2 && nccl_) {  // ZeRO-3: the adapter as ZeRO-2 (frozen weights: the backend)
      // In place: rank r's summed chunk lands at g + r * chunk = g + owned.begin.
      nccl_->reduce_scatter_sum(g, g + r * chunk_, chunk_, s);
      cu::reduce_sum(sumsq, g_owned, static_cast<int64_t>(owned_.size()), true, false,
                     reduce_ws_.as<float>(), s);
      nccl_->all_reduce_sum(sumsq, 1, s);
    } else {
      if (nccl_) nccl_->all_reduce_sum(g, n_, s);
      cu::reduce_sum(sumsq, g, static_cast<int64_t>(n_), true, false, reduce_ws_.as<float>(), s);
    }
    cu::clip_scale(scale, norm, sumsq, max_grad_norm, s);
    ++step_count_;
    const cu::AdamWScalars k = cu::adamw_scalars(step_count_, lr, hyper_.beta1, hyper_.beta2,
                                                 hyper_.eps, hyper_.weight_decay);
    if (decay_runs_.empty()) {
      cu::adamw_step(master_.as<float>() + owned_.begin, g_owned, m_.as<float>(), v_.as<float>(),
                     static_cast<int64_t>(owned_.size()), k, scale, s);
    } else {
      // Full fine-tuning's exemptions (biases, norms): one launch per run of equal decay
      // within the owned range, the exempt runs with weight_decay 0.
      const cu::AdamWScalars k0 =
          cu::adamw_scalars(step_count_, lr, hyper_.beta1, hyper_.beta2, hyper_.eps, 0.0);
      for (const DecayRun& d : decay_runs_) {
        const size_t b = std::max(d.begin, owned_.begin), e = std::min(d.end, owned_.end);
        if (b >= e) continue;
        const size_t o = b - owned_.begin;
        cu::adamw_step(master_.as<float>() + b, g + b, m_.as<float>() + o, v_.as<float>() + o,
                       static_cast<int64_t>(e - b), d.decays ? k : k0, scale, s);
      }
    }
    if (stage_ > 0 && nccl_) {
      float* p = master_.as<float>();
      nccl_->all_gather(p + r * chunk_, p, chunk_, s);
    }
    cu::to_bf16(params16_.as<cu::bf16>(), master_.as<float>(), static_cast<int64_t>(n_), s);
    cu::zero_async(g, static_cast<int64_t>(padded_), s);
    float host_norm = 0;
    cu::copy_to_host_async(&host_norm, norm, sizeof(float), s);
    cu::synchronize(s);
    return host_norm;
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
    decay_runs_.clear();
    for (size_t i = 0; i < n_;) {
      size_t j = i;
      while (j < n_ && (decays[j] != 0) == (decays[i] != 0)) ++j;
      decay_runs_.push_back({i, j, decays[i] != 0});
      i = j;
    }
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
    out.begin = e.begin;
    out.end = e.end;
    out.step = step_count_;
    out.m.resize(e.size());
    out.v.resize(e.size());
    const size_t off = e.begin - owned_.begin;
    const cu::stream_t s = model_.stream();
    cu::copy_to_host_async(out.m.data(), m_.as<float>() + off, e.size() * sizeof(float), s);
    cu::copy_to_host_async(out.v.data(), v_.as<float>() + off, e.size() * sizeof(float), s);
    cu::synchronize(s);
    out.master.assign(params.begin() + e.begin, params.begin() + e.end);
    return out;
  }

  void import_shard(const OptimizerShard& sh, std::span<float> params) override {
    if (sh.begin != owned_.begin || sh.end != owned_.end)
      throw std::runtime_error("optimizer shard range does not match this rank's");
    step_count_ = sh.step;
    const cu::stream_t s = model_.stream();
    cu::copy_to_device_async(m_.get(), sh.m.data(), sh.m.size() * sizeof(float), s);
    cu::copy_to_device_async(v_.get(), sh.v.data(), sh.v.size() * sizeof(float), s);
    cu::synchronize(s);
    std::copy(sh.master.begin(), sh.master.end(), params.begin() + owned_.begin);
  }

 private:
  CudaTransformer& model_;
  const LoraAdapter& layout_;  // slots and spec; its params are not read while training
  Communicator& comm_;
  int stage_;
  AdamWHyper hyper_;
  size_t n_, chunk_ = 0, padded_ = 0;
  ShardRange owned_;
  std::unique_ptr<NcclCommunicator> nccl_;
  cu::DeviceBuffer master_, params16_, grads_, m_, v_, scalars_, reduce_ws_;
  int64_t step_count_ = 0;
  struct DecayRun {
    size_t begin, end;
    bool decays;
  };
  std::vector<DecayRun> decay_runs_;  // empty: every parameter decays
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
