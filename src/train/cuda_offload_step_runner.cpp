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
      : model_(model), adapter_(adapter), opt_(adapter.params.size(), stage, comm, h),
        n_(adapter.params.size()), chunk_(std::min(n_, kUploadChunk)),
        streamed_(comm.size() == 1) {
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

  std::string describe() const override {
    return "host AdamW (ZeRO " + std::to_string(opt_.stage()) +
           ", offload_optimizer: gradients accumulate on the GPU, one transfer per step)";
  }

  LossSum accumulate(const MicroBatch& mb, float loss_scale, uint64_t seed) override {
    return model_.forward_backward_on_device(mb, adapter_, params16_.as<cu::bf16>(),
                                             grads_.as<float>(), loss_scale, seed);
  }
  LossSum evaluate(const MicroBatch& mb) override {
    return model_.forward_loss_on_device(mb, adapter_, params16_.as<cu::bf16>());
  }

  double step(double lr, double max_grad_norm) override {
    if (streamed_) return streamed_step(lr, max_grad_norm);
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

  void params_to_host(LoraAdapter& a) override {
    if (&a != &adapter_) a.params = adapter_.params;
  }
  void params_from_host(const LoraAdapter& a) override {
    if (a.params.size() != n_) throw std::runtime_error("offload step runner: adapter size changed");
    if (&a != &adapter_) adapter_.params = a.params;
    upload_params();
  }
  void set_decay_mask(std::span<const uint8_t> decays) override { opt_.set_decay_mask(decays); }
  ShardRange owned() const override { return opt_.owned(); }
  size_t state_bytes() const override { return opt_.state_bytes(); }
  OptimizerShard export_shard(std::span<const float> params) override {
    return opt_.export_shard(params);
  }
  void import_shard(const OptimizerShard& sh, std::span<float> params) override {
    opt_.import_shard(sh, params);
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
    const double norm = opt_.begin_streamed_step(sum_in_order(host_block_sums_), max_grad_norm);
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
      opt_.update_streamed(adapter_.params, lo,
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
      parallel_copy(stage, adapter_.params.data() + lo, hi - lo);
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

  CudaTransformer& model_;
  LoraAdapter& adapter_;  // params: the fp32 masters, updated in place on the host
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

}  // namespace ftune

#endif  // FTUNE_HAVE_CUDA
