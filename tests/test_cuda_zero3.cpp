// ZeRO-3 on the CUDA backend (CudaTransformer::LayerSharding): every rank keeps one chunk of
// each layer's projection block and gathers the layer just in time. The gathered bytes are
// the resident bytes, so results must be bit-identical to the unsharded backend.
//   - alone: one rank (the sharded path streams its single chunk through the same slots);
//   - under mpirun -np 2 (ctest's test_mpi_cuda_zero3), on one GPU or two: the gather goes
//     through the host and MPI here (two processes cannot share a GPU under NCCL; the
//     trainer's NCCL gather is ncclAllGather over the same bytes), so the sharding, the
//     prefetching streamer and the lockstep of ranks with unequal work are tested on any
//     GPU machine. bf16, int8 and NF4 blocks; resident and offloaded shards; checkpointing
//     on and off; a rank with an empty micro-batch while the other computes.
// Skips without a GPU (every rank agrees).
#include <doctest/doctest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "ftune/dist/communicator.hpp"
#include "ftune/kernels/cuda_device.hpp"
#include "ftune/kernels/cuda_optim.hpp"
#include "ftune/model/transformer_cuda.hpp"
#include "ftune/model/weight_source.hpp"
#include "model_test_util.hpp"

using namespace ftune;
using namespace ftune::mtest;
namespace cu = ftune::cuda;

namespace {

Communicator& boot() {
  static std::unique_ptr<Communicator> c = bootstrap();
  return *c;
}

bool gpu_everywhere() {
  const bool mine = cu::cuda_device_count() > 0;
  for (const std::string& s : boot().all_gather_strings(mine ? "1" : "0"))
    if (s != "1") return false;
  return true;
}

// hidden 128, 3 layers, head_dim 64 (flash), qwen2 style (biases, tied embeddings).
ModelConfig config() {
  ModelConfig c = tiny_config("qwen2");
  c.vocab_size = 256;
  c.hidden_size = 128;
  c.intermediate_size = 192;
  c.num_hidden_layers = 3;
  c.head_dim = 64;
  c.max_position_embeddings = 512;
  c.attention_bias = true;
  c.tie_word_embeddings = true;
  return c;
}

bool same(const Result& x, const Result& y) {
  return std::memcmp(&x.loss.loss_sum, &y.loss.loss_sum, sizeof(double)) == 0 &&
         x.loss.num_targets == y.loss.num_targets && x.grads == y.grads;
}

Result step(CudaTransformer& m, const MicroBatch& mb, const LoraAdapter& a) {
  Result r;
  r.grads.assign(a.params.size(), 0.0f);
  r.loss = m.forward_backward(mb, a, r.grads.data(), 1.0f, 99);
  return r;
}

// The gather over the bootstrap communicator: wait for the stream, stage through the host,
// MPI all-gather (as floats: chunks are multiples of 256 bytes), copy back.
CudaTransformer::LayerSharding host_sharding(Communicator& comm) {
  CudaTransformer::LayerSharding z;
  z.rank = comm.rank();
  z.size = comm.size();
  z.all_gather = [&comm](const void* send, void* recv, size_t bytes, cu::stream_t s) {
    REQUIRE(bytes % sizeof(float) == 0);
    std::vector<float> mine(bytes / sizeof(float)), all(comm.size() * mine.size());
    cu::copy_to_host_async(mine.data(), send, bytes, s);
    cu::synchronize(s);
    comm.all_gather(mine, all);
    cu::copy_to_device_async(recv, all.data(), all.size() * sizeof(float), s);
    cu::synchronize(s);
  };
  return z;
}

}  // namespace

TEST_CASE("CUDA ZeRO-3: sharded layers give bit-identical steps; ranks may idle in step") {
  if (!gpu_everywhere()) {
    MESSAGE("skipped: no GPU");
    return;
  }
  Communicator& comm = boot();
  const ModelConfig c = config();
  BaseWeights w;
  build_model(w, c, 41, 0.08);
  const InMemoryWeightSource src(w);
  LoraSpec spec;
  spec.rank = 8;
  spec.alpha = 16;
  spec.dropout = 0.1;
  spec.targets.fill(true);
  LoraAdapter a;
  build_adapter(a, c, spec, 42);
  const MicroBatch mb = pack(make_examples({70, 130, 45}, 256, 43));
  const MicroBatch other = pack(make_examples({33, 90}, 256, 44));
  const MicroBatch empty = pack({});
  const CudaTransformer::LayerSharding z = host_sharding(comm);
  for (int bits : {0, 8, 4})
    for (bool offload : {false, true})
      for (bool ckpt : {true, false}) {
        CAPTURE(bits);
        CAPTURE(offload);
        CAPTURE(ckpt);
        CudaTransformer ref(src, ckpt, true, 0, bits, offload);
        CudaTransformer sharded(src, ckpt, true, 0, bits, offload, &z);
        REQUIRE(sharded.sharded());
        const Result want = step(ref, mb, a), want_other = step(ref, other, a);
        const LossSum want_eval = ref.forward_loss(mb, a);
        CHECK(same(step(sharded, mb, a), want));
        // Unequal work: rank 0 computes, the others pass empty micro-batches (training and
        // evaluation); the gathers stay matched, and the next real steps are still exact.
        const bool idle = comm.rank() != 0;
        const Result r = step(sharded, idle ? empty : other, a);
        if (!idle) CHECK(same(r, want_other));
        if (idle) CHECK(r.loss.num_targets == 0);
        const LossSum e = sharded.forward_loss(idle ? empty : mb, a);
        if (!idle) CHECK(e.loss_sum == want_eval.loss_sum);
        CHECK(same(step(sharded, mb, a), want));
        CHECK(sharded.forward_loss(mb, a).loss_sum == want_eval.loss_sum);
        // Per-rank memory: the projection blocks fall to 1/size (plus padding).
        if (!offload && comm.size() > 1) {
          MESSAGE("rank " << comm.rank() << " of " << comm.size() << ", bits " << bits
                          << ": weight bytes " << sharded.weight_bytes() << " sharded vs "
                          << ref.weight_bytes() << " whole");
          CHECK(sharded.weight_bytes() < ref.weight_bytes());
        }
        if (offload) CHECK(sharded.weight_bytes() == ref.weight_bytes());  // blocks on the host
      }
}
