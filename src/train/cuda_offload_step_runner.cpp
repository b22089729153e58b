// offload_optimizer = "cpu" with the CUDA backend: the fp32 master weights and Adam moments
// live in host memory (ZeroAdamW, as the host runner), while the bf16 parameter copy and the
// fp32 gradient accumulator stay on the GPU across the micro-batches of a step. Per
// optimizer step, not per micro-batch:
//   - one rank: the gradient's norm is formed on the GPU (in the host's block order, so the
//     same bits), then the gradient streams to the host in 64 MiB chunks through two pinned
//     buffers, each chunk clipped, updated and staged in one pass (OpenMP) while the next
//     one downloads; the staged masters go up as bf16 (two more pinned buffers: the
//     conversion kernel reads a staged chunk over PCIe, pinned memory being device-
//     accessible) while the host updates the next. Host memory: masters + moments (12 bytes per parameter) and
//     256 MiB of staging, so an 8B model's full fine-tuning fits 128 GB of host memory.
//   - several ranks: the whole gradient comes to pinned host memory, and the ZeRO
//     collectives run over the bootstrap communicator, then the same chunked upload.
//   - ZeRO-3 full fine-tuning (make_cuda_zero3_offload_full_step_runner): the backend
//     gathers the blocks and flushes each block's summed gradient into this rank's range
//     (CudaTransformer::shard_full_finetuning), so the runner holds only its shard_range of
//     the vector (masters and moments on the host, bf16 copy and gradient on the GPU) and
//     every rank takes the one-rank streamed path over it; the squared norm is all-reduced
//     (double, the bootstrap communicator) first.
// Device memory: 6 bytes per parameter (bf16 copy + fp32 gradients) instead of the GPU
// runner's 18 (+ fp32 master, gradient, two moments). For LoRA that is a few hundred MB; for
// full fine-tuning (use_peft = false) it is what lets a model's optimizer state exceed the GPU.
#include "ftune/train/step_runner.hpp"

#if FTUNE_HAVE_CUDA

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "ftune/kernels/cuda_device.hpp"
#include "ftune/kernels/cuda_optim.hpp"
#include "ftune/model/transformer_cuda.hpp"
#include "ftune/train/optimizer.hpp"
#include "ftune/train/zero_optimizer.hpp"

namespace ftune {

namespace {

namespace cu = ftune::cuda;

constexpr size_t kUploadChunk = size_t(16) << 20;  // floats per staged chunk (64 MiB)

// memcpy of n floats split over the OpenMP threads (one thread copies at a few GB/s).
void parallel_copy(float* dst, const float* src, size_t n) {
  constexpr size_t kPiece = size_t(1) << 18;
  const int64_t pieces = static_cast<int64_t>((n + kPiece - 1) / kPiece);
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < pieces; ++p) {
    const size_t lo = static_cast<size_t>(p) * kPiece;
    std::memcpy(dst + lo, src + lo, std::min(kPiece, n - lo) * sizeof(float));
  }
}

class CudaOffloadStepRunner final : public StepRunner {
 public:
  CudaOffloadStepRunner(CudaTransformer& model, LoraAdapter& adapter, int stage,
                        Communicator& comm, const AdamWHyper& h)
      : CudaOffloadStepRunner(model, adapter, stage, comm, h, nullptr) {}
  // ZeRO-3 full fine-tuning: this rank's range of `full` only, the backend sharded.
  CudaOffloadStepRunner(CudaTransformer& model, LoraAdapter& full, Communicator& comm,
                        const AdamWHyper& h, CudaTransformer::FullSharding sharding)
      : CudaOffloadStepRunner(model, full, 3, comm, h, &sharding) {}

 private:
  CudaOffloadStepRunner(CudaTransformer& model, LoraAdapter& adapter, int stage,
                        Communicator& comm, const AdamWHyper& h,
                        CudaTransformer::FullSharding* zero3)
      : model_(model), adapter_(adapter), comm_(comm), local_(make_single_rank_communicator()),
        own_(zero3 ? shard_range(adapter.params.size(), comm.rank(), comm.size())
                   : ShardRange{0, adapter.params.size()}),
        sharded_(zero3 != nullptr),
        opt_(own_.size(), sharded_ ? 0 : stage, sharded_ ? *local_ : comm, h),
        n_(own_.size()), chunk_(std::min(n_, kUploadChunk)),
        streamed_(sharded_ || comm.size() == 1) {
    if (sharded_) {
      own_master_.assign(adapter.params.begin() + own_.begin, adapter.params.begin() + own_.end);
      model_.shard_full_finetuning(std::move(*zero3));
    }
    params16_ = cu::DeviceBuffer(std::max<size_t>(n_, 1) * sizeof(cu::bf16));
    grads_ = cu::DeviceBuffer(std::max<size_t>(n_, 1) * sizeof(float));
    const size_t blocks = (n_ + kSumOfSquaresBlock - 1) / kSumOfSquaresBlock;
    if (streamed_) {
      block_sums_ = cu::DeviceBuffer(std::max<size_t>(blocks, 1) * sizeof(double));
      host_block_sums_.resize(blocks);
    } else {
      host_grads_ = cu::PinnedBuffer(std::max<size_t>(n_, 1) * sizeof(float));
    }
    for (int i = 0; i < 2; ++i) {
      host_stage_[i] = cu::PinnedBuffer(std::max<size_t>(chunk_, 1) * sizeof(float));
      staged_[i].record(model_.stream());
      if (streamed_) grad_stage_[i] = cu::PinnedBuffer(std::max<size_t>(chunk_, 1) * sizeof(float));
    }
    grads_.zero();
    upload_params();
  }

 public:
  std::string describe() const override {
    return "host AdamW (ZeRO " + std::to_string(sharded_ ? 3 : opt_.stage()) +
           ", offload_optimizer: gradients accumulate on the GPU, one transfer per step" +
           (sharded_ ? "; parameters, gradients and optimizer state sharded)" : ")");
  }

  LossSum accumulate(const MicroBatch& mb, float loss_scale, uint64_t seed) override {
    return model_.forward_backward_on_device(mb, adapter_, params16_.as<cu::bf16>(),
                                             grads_.as<float>(), loss_scale, seed);
  }
  LossSum evaluate(const MicroBatch& mb) override {
    return model_.forward_loss_on_device(mb, adapter_, params16_.as<cu::bf16>());
  }

  double step(double lr, double max_grad_norm) override {
    if (streamed_) {
      const double norm = streamed_step(lr, max_grad_norm);
      if (sharded_) model_.drop_gathered();  // the owned parameters changed
      return norm;
    }
    const cu::stream_t s = model_.stream();
    float* g = host_grads_.as<float>();
    cu::copy_to_host_async(g, grads_.get(), n_ * sizeof(float), s);
    cu::zero_async(grads_.as<float>(), static_cast<int64_t>(n_), s);
    cu::synchronize(s);
    const double norm = opt_.begin_step(std::span<float>(g, n_), max_grad_norm);
    if (opt_.gathers()) {  // sharded over ranks: update the shard, gather, then upload all
      opt_.update(adapter_.params, opt_.owned().begin, opt_.owned().end, lr);
      opt_.end_step(adapter_.params);
      upload_params();
    } else {  // this rank updates everything: chunk k uploads while the host updates k+1
      upload_params([&](size_t lo, size_t hi, float* stage) {
        opt_.update(adapter_.params, lo, hi, lr);
        parallel_copy(stage, adapter_.params.data() + lo, hi - lo);
      });
      opt_.end_step(adapter_.params);
    }
    return norm;
  }

  // Sharded: collective, every rank ends with the whole vector.
  void params_to_host(LoraAdapter& a) override {
    if (sharded_) {
      a.params.resize(full_size());
      comm_.all_gather(own_master_, a.params);
    } else if (&a != &adapter_) {
      a.params = adapter_.params;
    }
  }
  void params_from_host(const LoraAdapter& a) override {
    if (a.params.size() != full_size())
      throw std::runtime_error("offload step runner: adapter size changed");
    if (sharded_)
      std::copy(a.params.begin() + own_.begin, a.params.begin() + own_.end, own_master_.begin());
    else if (&a != &adapter_)
      adapter_.params = a.params;
    upload_params();
    if (sharded_) model_.drop_gathered();
  }
  void set_decay_mask(std::span<const uint8_t> decays) override {
    opt_.set_decay_mask(sharded_ ? decays.subspan(own_.begin, n_) : decays);
  }
  ShardRange owned() const override { return sharded_ ? own_ : opt_.owned(); }
  size_t state_bytes() const override { return opt_.state_bytes(); }
  // Sharded, the local optimizer's shard (its vector is this rank's range) in the whole
  // vector's coordinates.
  OptimizerShard export_shard(std::span<const float> params) override {
    if (!sharded_) return opt_.export_shard(params);
    OptimizerShard sh = opt_.export_shard(own_master_);
    sh.rank = comm_.rank();
    sh.world_size = comm_.size();
    sh.begin += own_.begin;
    sh.end += own_.begin;
    return sh;
  }
  void import_shard(const OptimizerShard& sh, std::span<float> params) override {
    if (!sharded_) return opt_.import_shard(sh, params);
    if (sh.begin != own_.begin || sh.end != own_.end)
      throw std::runtime_error("optimizer shard range does not match this rank's");
    OptimizerShard local = sh;
    local.rank = 0;
    local.world_size = 1;
    local.begin -= own_.begin;
    local.end -= own_.begin;
    opt_.import_shard(local, own_master_);
    if (params.size() == full_size())
      std::copy(sh.master.begin(), sh.master.end(), params.begin() + own_.begin);
    upload_params();
    model_.drop_gathered();
  }

 private:
  // One rank: chunk k's gradient downloads (grad_stage_[k % 2], event fetched_) while the
  // host updates chunk k - 1; the update of chunk k runs just before it is staged for upload.
  double streamed_step(double lr, double max_grad_norm) {
    const cu::stream_t s = model_.stream();
    const float* g = grads_.as<float>();
    cu::sum_of_squares_blocks(block_sums_.as<double>(), g, static_cast<int64_t>(n_),
                              static_cast<int64_t>(kSumOfSquaresBlock), s);
    cu::copy_to_host_async(host_block_sums_.data(), block_sums_.get(),
                           host_block_sums_.size() * sizeof(double), s);
    cu::synchronize(s);
    double sum_sq = sum_in_order(host_block_sums_);
    if (sharded_ && comm_.size() > 1) comm_.all_reduce_sum(std::span<double>(&sum_sq, 1));
    const double norm = opt_.begin_streamed_step(sum_sq, max_grad_norm);
    auto fetch = [&](size_t off) {  // the chunk at off into grad_stage_[(off / chunk_) % 2]
      if (off >= n_) return;
      const size_t i = (off / chunk_) % 2, len = std::min(chunk_, n_ - off);
      cu::copy_to_host_async(grad_stage_[i].get(), g + off, len * sizeof(float), s);
      fetched_[i].record(s);
    };
    fetch(0);
    upload_params([&](size_t lo, size_t hi, float* stage) {
      const size_t i = (lo / chunk_) % 2;
      fetch(hi);  // the next chunk's stage was read by the previous update, which is done
      fetched_[i].synchronize();
      opt_.update_streamed(masters(), lo,
                           std::span<const float>(grad_stage_[i].as<float>(), hi - lo), lr,
                           stage);
    });
    cu::zero_async(grads_.as<float>(), static_cast<int64_t>(n_), s);
    cu::synchronize(s);
    return norm;
  }

  // The host masters -> the device's bf16 copy, chunk by chunk: staging buffer i is refilled
  // only after the stream has consumed its previous chunk (event staged_[i]), while the GPU
  // still reads the other one. fill(lo, hi, stage) writes masters [lo, hi) into the stage
  // (default: copies them; a step updates them there first).
  void upload_params() {
    upload_params([&](size_t lo, size_t hi, float* stage) {
      parallel_copy(stage, masters().data() + lo, hi - lo);
    });
  }
  template <typename Fill>
  void upload_params(Fill fill) {
    const cu::stream_t s = model_.stream();
    cu::bf16* dst = params16_.as<cu::bf16>();
    for (size_t off = 0, k = 0; off < n_; off += chunk_, ++k) {
      const size_t i = k % 2, len = std::min(chunk_, n_ - off);
      staged_[i].synchronize();
      fill(off, off + len, host_stage_[i].as<float>());
      cu::to_bf16(dst + off, host_stage_[i].as<float>(), static_cast<int64_t>(len), s);
      staged_[i].record(s);
    }
    cu::synchronize(s);
  }

  // The fp32 masters ZeroAdamW updates: the adapter's own vector, or (sharded) this rank's
  // range of it; n_ values either way.
  std::vector<float>& masters() { return sharded_ ? own_master_ : adapter_.params; }
  size_t full_size() const { return sharded_ ? full_n_ : n_; }

  CudaTransformer& model_;
  LoraAdapter& adapter_;  // params: the fp32 masters, updated in place on the host (sharded:
                          // only read at construction, the caller may free them)
  Communicator& comm_;
  std::unique_ptr<Communicator> local_;  // sharded: the optimizer's one-rank world
  ShardRange own_;
  bool sharded_;
  size_t full_n_ = adapter_.params.size();
  std::vector<float> own_master_;
  ZeroAdamW opt_;
  size_t n_, chunk_;
  bool streamed_;  // one rank: the gradient streams to the host in chunks (streamed_step)
  cu::DeviceBuffer params16_, grads_, block_sums_;
  cu::PinnedBuffer host_grads_, host_stage_[2], grad_stage_[2];
  std::vector<double> host_block_sums_;
  cu::Event staged_[2], fetched_[2];
};

}  // namespace

std::unique_ptr<StepRunner> make_cuda_offload_step_runner(TrainBackend& model,
                                                          LoraAdapter& adapter, int stage,
                                                          Communicator& comm,
                                                          const AdamWHyper& h) {
  auto* cuda_model = dynamic_cast<CudaTransformer*>(&model);
  if (!cuda_model)
    throw std::runtime_error("make_cuda_offload_step_runner: the backend is not CUDA");
  return std::make_unique<CudaOffloadStepRunner>(*cuda_model, adapter, stage, comm, h);
}

std::unique_ptr<StepRunner> make_cuda_zero3_offload_full_step_runner(
    TrainBackend& model, LoraAdapter& full_model, Communicator& comm, const AdamWHyper& h,
    CudaTransformer::FullSharding sharding) {
  auto* cuda_model = dynamic_cast<CudaTransformer*>(&model);
  if (!cuda_model || !cuda_model->full_finetuning())
    throw std::runtime_error("ZeRO-3 full fine-tuning needs a full fine-tuning CUDA backend");
  return std::make_unique<CudaOffloadStepRunner>(*cuda_model, full_model, comm, h,
                                                 std::move(sharding));
}

std::unique_ptr<StepRunner> make_cuda_zero3_offload_full_step_runner(TrainBackend& model,
                                                                     LoraAdapter& full_model,
                                                                     Communicator& comm,
                                                                     const AdamWHyper& h) {
  return make_cuda_zero3_offload_full_step_runner(model, full_model, comm, h,
                                                  nccl_full_sharding(comm));
}

}  // namespace ftune

#endif  // FTUNE_HAVE_CUDA
