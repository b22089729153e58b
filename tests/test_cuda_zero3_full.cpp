// ZeRO-3 full fine-tuning on the CUDA backend (CudaTransformer::shard_full_finetuning and
// its step runners, the optimizer on the GPU or offloaded to the host): on one rank it is
// the GPU (or offload) runner's stage 0 bit for bit (same gradients,
// norm, AdamW and bf16 copies; an empty micro-batch included); over two ranks (two threads
// on one GPU, the collectives staged through host memory) it follows one rank that
// accumulates both ranks' micro-batches, a rank with an empty micro-batch included, and
// each rank holds half of the parameter state. Skips without a GPU.
#include <doctest/doctest.h>

#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <span>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cuda_test_util.hpp"
#include "ftune/kernels/cuda_optim.hpp"
#include "ftune/model/transformer_cuda.hpp"
#include "ftune/train/full_finetune.hpp"
#include "ftune/train/step_runner.hpp"
#include "model_test_util.hpp"

using namespace ftune::test::cuda;  // REQUIRE_GPU, cu

namespace {

ftune::ModelConfig config(const std::string& type) {
  ftune::ModelConfig c = ftune::mtest::tiny_config(type);
  c.attention_bias = type == "qwen2";
  c.tie_word_embeddings = type == "qwen2";
  c.hidden_size = 128;  // head_dim 64: the flash kernels
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 64;
  c.intermediate_size = 192;
  c.num_hidden_layers = 3;
  return c;
}

// A rank of a world whose collectives the step runner does not use (they go through
// FullSharding): rank and size only, and (sum_doubles, the offload runner's squared norm) a
// double all-reduce when given one.
class NoCollectives final : public ftune::Communicator {
 public:
  NoCollectives(int rank, int size, std::function<void(std::span<double>)> sum_doubles = {})
      : sum_doubles_(std::move(sum_doubles)) {
    w_.rank = rank, w_.size = size;
  }
  const ftune::WorldInfo& world() const override { return w_; }
  void all_reduce_sum(std::span<float>) override { fail(); }
  void all_reduce_sum(std::span<double> x) override {
    if (!sum_doubles_) fail();
    sum_doubles_(x);
  }
  void reduce_scatter_sum(std::span<const float>, std::span<float>) override { fail(); }
  void all_gather(std::span<const float>, std::span<float>) override { fail(); }
  void broadcast(std::span<std::byte>, int) override { fail(); }
  std::vector<std::string> all_gather_strings(const std::string&) override { fail(); }
  void barrier() override { fail(); }
  [[noreturn]] void abort(int) override { fail(); }

 private:
  [[noreturn]] static void fail() { throw std::logic_error("NoCollectives: not expected"); }
  ftune::WorldInfo w_;
  std::function<void(std::span<double>)> sum_doubles_;
};

// Two threads' collectives on one GPU, through host memory (NCCL wants a GPU per rank).
struct HostExchange {
  std::barrier<> sync{2};
  std::vector<char> bytes;
  std::vector<float> parts[2];
  std::vector<double> dparts[2];

  // The host all-reduce of doubles (summed in rank order).
  std::function<void(std::span<double>)> sum_doubles(int rank) {
    return [this, rank](std::span<double> x) {
      dparts[rank].assign(x.begin(), x.end());
      sync.arrive_and_wait();
      for (size_t i = 0; i < x.size(); ++i) x[i] = dparts[0][i] + dparts[1][i];
      sync.arrive_and_wait();
    };
  }

  ftune::CudaTransformer::FullSharding sharding(int rank) {
    ftune::CudaTransformer::FullSharding z;
    z.rank = rank;
    z.size = 2;
    z.broadcast = [this, rank](void* data, size_t n, int root, cu::stream_t s) {
      cu::synchronize(s);
      if (rank == root) {
        bytes.resize(n);
        cu::copy_to_host_async(bytes.data(), data, n, s);
        cu::synchronize(s);
      }
      sync.arrive_and_wait();
      if (rank != root) {
        cu::copy_to_device_async(data, bytes.data(), n, s);
        cu::synchronize(s);
      }
      sync.arrive_and_wait();
    };
    z.all_reduce_sum = [this, rank](float* data, size_t n, cu::stream_t s) {
      parts[rank].resize(n);
      cu::copy_to_host_async(parts[rank].data(), data, n * sizeof(float), s);
      cu::synchronize(s);
      sync.arrive_and_wait();
      std::vector<float> sum(n);
      for (size_t i = 0; i < n; ++i) sum[i] = parts[0][i] + parts[1][i];  // rank order
      cu::copy_to_device_async(data, sum.data(), n * sizeof(float), s);
      cu::synchronize(s);
      sync.arrive_and_wait();
    };
    return z;
  }
};

std::vector<ftune::MicroBatch> batches(const ftune::ModelConfig& c) {
  std::vector<ftune::MicroBatch> out;
  for (int k = 0; k < 6; ++k)
    out.push_back(ftune::mtest::pack(ftune::mtest::make_examples(
        {23 + 5 * k, 17 + 3 * k}, static_cast<int>(c.vocab_size), 40 + k)));
  return out;
}

}  // namespace

TEST_CASE("cuda: ZeRO-3 full fine-tuning on one rank = the GPU runner's stage 0, bit for bit") {
  REQUIRE_GPU();
  // offload: offload_optimizer = "cpu", against the offload runner's stage 0.
  for (const bool offload : {false, true})
  for (const std::string type : {"qwen2", "llama"}) {
    CAPTURE(type);
    CAPTURE(offload);
    const ftune::ModelConfig cfg = config(type);
    ftune::BaseWeights w;
    ftune::mtest::build_model(w, cfg, 9, 0.08);
    ftune::LoraAdapter plain = ftune::full_model_as_adapter(w);
    const ftune::LoraAdapter full = plain;
    NoCollectives one(0, 1);
    ftune::AdamWHyper h;
    h.weight_decay = 0.1;
    ftune::CudaTransformer g0(cfg, true, true, 0, ftune::CudaTransformer::FullFineTuning{});
    ftune::CudaTransformer g3(cfg, true, true, 0, ftune::CudaTransformer::FullFineTuning{});
    ftune::LoraAdapter f = full;
    auto r0 = offload ? ftune::make_cuda_offload_step_runner(g0, plain, 0, one, h)
                      : ftune::make_cuda_step_runner(g0, plain, 0, one, h);
    auto r3 = offload ? ftune::make_cuda_zero3_offload_full_step_runner(
                            g3, f, one, h, ftune::CudaTransformer::FullSharding{})
                      : ftune::make_cuda_zero3_full_step_runner(
                            g3, full, one, h, ftune::CudaTransformer::FullSharding{});
    const std::vector<uint8_t> decays = ftune::full_finetune_decay_mask(cfg);
    r0->set_decay_mask(decays);
    r3->set_decay_mask(decays);
    const std::vector<ftune::MicroBatch> mb = batches(cfg);
    for (int step = 0; step < 3; ++step) {
      const ftune::LossSum a = r0->accumulate(mb[step], 0.01f, 0);
      const ftune::LossSum b = r3->accumulate(mb[step], 0.01f, 0);
      CHECK(a.loss_sum == b.loss_sum);
      if (step == 1) {  // an empty micro-batch adds nothing
        r0->accumulate(ftune::MicroBatch{}, 0.01f, 0);
        r3->accumulate(ftune::MicroBatch{}, 0.01f, 0);
      }
      CHECK(r0->step(1e-3, 1.0) == r3->step(1e-3, 1.0));
      CHECK(r0->evaluate(mb[5]).loss_sum == r3->evaluate(mb[5]).loss_sum);
    }
    ftune::LoraAdapter p0 = full;
    r0->params_to_host(p0);
    const ftune::OptimizerShard sh = r3->export_shard({});
    REQUIRE(sh.master.size() == full.params.size());
    CHECK(std::memcmp(p0.params.data(), sh.master.data(), sh.master.size() * sizeof(float)) == 0);
    CHECK(p0.params != full.params);
  }
}

TEST_CASE("cuda: ZeRO-3 full fine-tuning over 2 ranks (threads, one GPU) follows 1 rank") {
  REQUIRE_GPU();
  // offload: the optimizer on the host (offload_optimizer = "cpu"), the same comparison.
  for (const bool offload : {false, true})
  for (const std::string type : {"qwen2", "llama"}) {
    CAPTURE(type);
    CAPTURE(offload);
    auto make = [&](ftune::CudaTransformer& g, ftune::LoraAdapter& f, ftune::Communicator& c,
                    const ftune::AdamWHyper& hy, ftune::CudaTransformer::FullSharding z) {
      return offload ? ftune::make_cuda_zero3_offload_full_step_runner(g, f, c, hy, std::move(z))
                     : ftune::make_cuda_zero3_full_step_runner(g, f, c, hy, std::move(z));
    };
    const ftune::ModelConfig cfg = config(type);
    ftune::BaseWeights w;
    ftune::mtest::build_model(w, cfg, 13, 0.08);
    const ftune::LoraAdapter full = ftune::full_model_as_adapter(w);
    const size_t n = full.params.size();
    const std::vector<ftune::MicroBatch> mb = batches(cfg);
    const std::vector<uint8_t> decays = ftune::full_finetune_decay_mask(cfg);
    ftune::AdamWHyper h;
    h.weight_decay = 0.1;
    // Step k: rank 0 takes mb[2k], rank 1 mb[2k + 1]; in step 2 rank 1 has none.
    auto mine = [&](int step, int rank) -> ftune::MicroBatch {
      if (step == 2 && rank == 1) return {};
      return mb[2 * step + rank];
    };

    // One rank, both micro-batches accumulated.
    std::vector<double> want_loss, want_norm;
    ftune::OptimizerShard want;
    {
      NoCollectives one(0, 1);
      ftune::CudaTransformer g(cfg, true, true, 0, ftune::CudaTransformer::FullFineTuning{});
      ftune::LoraAdapter f = full;
      auto r = make(g, f, one, h, ftune::CudaTransformer::FullSharding{});
      r->set_decay_mask(decays);
      for (int step = 0; step < 3; ++step) {
        double loss = 0;
        for (int rank = 0; rank < 2; ++rank) loss += r->accumulate(mine(step, rank), 0.01f, 0).loss_sum;
        want_loss.push_back(loss);
        want_norm.push_back(r->step(1e-3, 1.0));
      }
      want = r->export_shard({});
    }

    // Two ranks.
    HostExchange ex;
    std::vector<double> loss[2], norm[2];
    ftune::OptimizerShard got[2];
    size_t slot_bytes[2] = {0, 0};
    std::string error[2];
    auto rank_main = [&](int rank) {
      try {
        NoCollectives me(rank, 2, ex.sum_doubles(rank));
        ftune::CudaTransformer g(cfg, true, true, 0, ftune::CudaTransformer::FullFineTuning{});
        ftune::LoraAdapter f = full;
        auto r = make(g, f, me, h, ex.sharding(rank));
        r->set_decay_mask(decays);
        for (int step = 0; step < 3; ++step) {
          loss[rank].push_back(r->accumulate(mine(step, rank), 0.01f, 0).loss_sum);
          norm[rank].push_back(r->step(1e-3, 1.0));
        }
        got[rank] = r->export_shard({});
        slot_bytes[rank] = g.full_sharding_bytes();
      } catch (const std::exception& e) {
        error[rank] = e.what();
        ex.sync.arrive_and_drop();  // the other rank's waits then complete without this one
      }
    };
    std::thread t0(rank_main, 0), t1(rank_main, 1);
    t0.join();
    t1.join();
    REQUIRE(error[0].empty());
    REQUIRE(error[1].empty());
    REQUIRE(got[0].end == got[1].begin);
    REQUIRE(got[1].end == n);
    CHECK(got[0].master.size() <= n / 2 + 1);
    MESSAGE(type << ": " << n << " parameters; rank 0 keeps " << got[0].master.size()
                 << " (masters, bf16 copy, gradient, moments) and " << slot_bytes[0]
                 << " bytes of block slots and scratch, on " << cu::device_description(0));
    std::vector<float> masters = got[0].master;
    masters.insert(masters.end(), got[1].master.begin(), got[1].master.end());
    double diff = 0, scale = 0;
    for (size_t i = 0; i < n; ++i) {
      diff = std::max(diff, double(std::fabs(masters[i] - want.master[i])));
      scale = std::max(scale, double(std::fabs(want.master[i])));
    }
    // Step 1 sees the same parameters: its losses are the same sums; later ones differ by
    // the gradients' fp32 summation order (per block over ranks vs accumulated per rank).
    CHECK(loss[0][0] + loss[1][0] == want_loss[0]);
    for (int step = 0; step < 3; ++step) {
      CHECK(std::fabs(loss[0][step] + loss[1][step] - want_loss[step]) / want_loss[step] < 1e-4);
      CHECK(std::fabs(norm[0][step] - want_norm[step]) / want_norm[step] < 1e-4);
      CHECK(norm[0][step] == norm[1][step]);
    }
    MESSAGE(type << ": 2 ranks vs 1 rank after 3 steps, masters max diff / max " << diff / scale);
    CHECK(diff / scale < 1e-5);
  }
}
