// CUDA training backend: one micro-step from tokens to LoRA gradients on one GPU, step for
// step the CPU reference (src/model/transformer_cpu.cpp), in bf16 with fp32 accumulation.
// Reading order: forward_backward_on_device() -> layer_forward() / layer_backward() / head()
// -> lora_linear.cu -> kernels in src/kernels/cuda/. Everything runs on one stream (ZeRO-3
// full fine-tuning's gathers and flushes on a second, overlapping it); the host waits once
// per micro-batch, for the loss rows (the LoRA gradients stay on the device in
// the trainer's path; the TrainBackend interface copies them out for host callers).
// Under checkpointing the backward re-runs each layer's forward in a lighter form
// (layer_forward's `recompute`); quantised weights are dequantised a layer at a time and
// offloaded or ZeRO-3-sharded ones fetched a layer ahead (weight()); FTUNE_PROFILE=1 times every region (profiler.cuh).
// Full fine-tuning reads its weights and writes their gradients through windows of the flat
// parameter vector (wp / wg): the whole vector, or under ZeRO-3 the blocks gathered into
// slots (use_embed / use_layer / use_tail; the next layer's gather overlaps this one's
// compute) whose gradients are flushed to their owners while the next layer computes.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <optional>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../kernels/cuda/common.cuh"
#include "device_weights.cuh"
#include "ftune/kernels/cuda_attention.hpp"
#include "ftune/kernels/cuda_gemm.hpp"
#include "ftune/kernels/cuda_lora.hpp"
#include "ftune/kernels/cuda_optim.hpp"
#include "ftune/kernels/cuda_quant.hpp"
#include "ftune/kernels/cuda_ops.hpp"
#include "ftune/model/transformer_cpu.hpp"  // rope_inv_freq (host code, ftune_model)
#include "ftune/model/transformer_cuda.hpp"
#include "ftune/dist/shard_range.hpp"
#include "layer_streamer.cuh"
#include "lora_linear.cuh"
#include "model_kernels.cuh"
#include "profiler.cuh"
#include "workspace.cuh"

namespace ftune {

namespace {
namespace cu = ftune::cuda;
namespace cm = ftune::cuda::model;
using cu::bf16;
using Scope = cm::ProfileScope;

// Must equal transformer_cpu.cpp's mix_seed: dropout masks are keyed by
// mix_seed(seed, layer * 7 + proj), so both backends drop the same elements.
uint64_t mix_seed(uint64_t a, uint64_t b) {
  uint64_t z = a * 0x9E3779B97F4A7C15ull + b + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Logits of one head chunk stay under this many bytes (bf16, chunk x vocab).
constexpr int64_t kLogitsBytes = int64_t(256) << 20;

int select_device(int device) {
  if (device < 0 || device >= cu::cuda_device_count())
    throw std::invalid_argument("CudaTransformer: no CUDA device " + std::to_string(device));
  cu::set_device(device);
  return device;
}

}  // namespace

struct CudaTransformer::Impl {
  int device;
  ModelConfig c;
  bool checkpointing, flash;
  bool keep_mid_residuals = false;  // selective recompute (set_selective_recompute)
  cu::Stream stream;
  cu::Gemm gemm;
  cm::DeviceWeights w;
  std::vector<double> inv_freq;
  cu::DeviceBuffer rope_cos, rope_sin;  // fp32 [positions, head_dim/2]
  int64_t rope_positions = 0;
  cu::DeviceBuffer arena, p32, p16, g32;  // activations; adapter fp32 / bf16; LoRA grads
  cm::Buffers b{};
  cm::Dims dims;
  int64_t max_seqlen = 0;
  std::vector<float> host_grads, host_loss;
  size_t peak = 0;
  std::string dev_name;
  cm::PhaseProfiler prof;

  // load_in_8bit / load_in_4bit: layer l's projections dequantised into `dequant` (bf16).
  cu::DeviceBuffer dequant;
  int dequant_layer = -1;
  std::array<size_t, kNumProj> dequant_off{};
  cm::LayerStreamer streamer;  // offload_param / ZeRO-3: layer blocks fetched a layer ahead

  // Full fine-tuning (use_peft = false): the weights are the trainer's parameter vector
  // (BaseWeights::layout order); bind_full points the views at its bf16 copy each call and
  // gfull (its fp32 gradient) receives every weight's gradient.
  bool full = false;
  std::vector<BaseWeights::Entry> entries;         // full: the layout
  std::vector<std::array<size_t, kNumProj>> w_off;  // full: offsets of projection weights
  std::vector<std::array<size_t, kNumProj>> b_off;  //        and biases (SIZE_MAX: none)
  struct NormOff { size_t input = 0, post = 0, q = 0, k = 0; };
  std::vector<NormOff> norm_off;
  size_t embed_off = 0, final_norm_off = 0, lm_head_off = 0;
  std::vector<std::array<const bf16*, kNumProj>> full_w;
  float* gfull = nullptr;  // non-null: form the weights' gradients (where: wg())
  cu::DeviceBuffer colgrad_ws, emb_uniq, emb_start, emb_order;
  int64_t emb_unique = 0;

  // Where the weights and their gradients are: windows of the flat vector. Unsharded, one
  // window holds it all (the step runner's bf16 copy and fp32 gradient). ZeRO-3
  // (shard_full_finetuning): blocks 0 = the embedding table, 2 = the tail (final norm,
  // untied lm_head), 1 and 3 = two layer slots (layer l in layer_block(l)), each a device
  // slot with its gradient scratch: the next layer is gathered into the other slot while
  // this one computes, and a layer's gradient is flushed while the next one computes.
  struct Window {
    size_t lo = 0, hi = 0;
    const bf16* p = nullptr;
    float* g = nullptr;
  };
  std::array<Window, 4> win{};
  const Window& window_of(size_t off) const {
    for (const Window& v : win)
      if (off >= v.lo && off < v.hi) return v;
    throw std::logic_error("CudaTransformer: weight offset " + std::to_string(off) +
                           " is not in a bound block");
  }
  const bf16* wp(size_t off) const { const Window& v = window_of(off); return v.p + (off - v.lo); }
  float* wg(size_t off) const { const Window& v = window_of(off); return v.g + (off - v.lo); }

  // ZeRO-3 full fine-tuning: this rank's range of the vector and the block slots.
  std::optional<CudaTransformer::FullSharding> z3;
  ShardRange z3_own;
  size_t n_params = 0, layer0 = 0, layer_span = 0, tail_begin = 0;
  std::array<cu::DeviceBuffer, 4> z3_slot, z3_scratch;
  std::array<int, 2> slot_layer{-1, -1};  // the layer each layer slot holds or receives
  bool embed_held = false, tail_held = false;
  // Gathers and flushes run here, each ordered after all compute-stream work issued before
  // it (side_after_compute); the compute stream waits for a block's gather (z3_ready) before
  // using it, and for the side stream (z3_done) before a call returns.
  std::optional<cu::Stream> z3_side;
  std::array<cu::Event, 4> z3_ready;
  cu::Event z3_fence, z3_done;
  const bf16* own16 = nullptr;  // the owned range's bf16 copy and gradient (the runner's)
  float* own_g = nullptr;

  // Full fine-tuning: no weights of its own (the step runner's bf16 copy is read).
  Impl(const ModelConfig& cfg, bool ckpt, bool flash_attn, int dev)
      : device(select_device(dev)),
        c(cfg),
        checkpointing(ckpt),
        flash(flash_attn && (c.head_dim == 64 || c.head_dim == 128)),
        w(cfg),
        inv_freq(rope_inv_freq(c)) {
    cudaDeviceProp prop{};
    FTUNE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    dev_name = "cuda:" + std::to_string(device) + " (" + prop.name + ", full fine-tuning)";
    full = true;
    entries = BaseWeights::layout(c);
    const size_t none = SIZE_MAX;
    w_off.assign(c.num_hidden_layers, {});
    b_off.assign(c.num_hidden_layers, {});
    for (auto& b : b_off) b.fill(none);
    norm_off.assign(c.num_hidden_layers, {});
    full_w.assign(c.num_hidden_layers, {});
    lm_head_off = none;
    using K = BaseWeights::Kind;
    for (const auto& e : entries) {
      const int pi = static_cast<int>(e.proj);
      switch (e.kind) {
        case K::embed: embed_off = e.offset; break;
        case K::final_norm: final_norm_off = e.offset; break;
        case K::lm_head: lm_head_off = e.offset; break;
        case K::input_norm: norm_off[e.layer].input = e.offset; break;
        case K::post_norm: norm_off[e.layer].post = e.offset; break;
        case K::q_norm: norm_off[e.layer].q = e.offset; break;
        case K::k_norm: norm_off[e.layer].k = e.offset; break;
        case K::proj_weight: w_off[e.layer][pi] = e.offset; break;
        case K::proj_bias: b_off[e.layer][pi] = e.offset; break;
      }
    }
    if (lm_head_off == none) lm_head_off = embed_off;  // tied: one tensor, one gradient
    n_params = BaseWeights::layout_size(entries);
    // The layers lie back to back between the embedding table and the tail (the layout
    // model/zero3_weights.hpp checks), each a span of the same size.
    layer0 = tail_begin = n_params;
    for (const auto& e : entries) {
      if (e.layer >= 0) layer0 = std::min(layer0, e.offset);
      if (e.kind == K::final_norm) tail_begin = e.offset;
    }
    layer_span = c.num_hidden_layers > 0 ? (tail_begin - layer0) / c.num_hidden_layers : 0;
    note_memory();
  }

  // Full fine-tuning: each call's parameters (bf16) and gradient accumulator (null: no
  // gradients). Unsharded they are the whole vector and every view is bound here; under
  // ZeRO-3 they are this rank's range and the views are bound block by block (use_*).
  void bind_full(const bf16* p16, float* g32) {
    gfull = g32;
    if (z3) {
      own16 = p16;
      own_g = g32;
      return;
    }
    win = {};
    win[0] = Window{0, n_params, p16, g32};
    bind_embed_views();
    bind_tail_views();
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) bind_layer_views(static_cast<int>(l));
  }
  void bind_embed_views() {
    w.embed = wp(embed_off);
    if (lm_head_off == embed_off) w.lm_head = w.embed;
  }
  void bind_tail_views() {
    w.final_norm = wp(final_norm_off);
    if (lm_head_off != embed_off) w.lm_head = wp(lm_head_off);
  }
  void bind_layer_views(int l) {
    cm::DeviceLayer& L = w.layers[l];
    L.input_norm = wp(norm_off[l].input);
    L.post_norm = wp(norm_off[l].post);
    L.q_norm = c.qk_norm ? wp(norm_off[l].q) : nullptr;
    L.k_norm = c.qk_norm ? wp(norm_off[l].k) : nullptr;
    for (Proj p : kAllProj) {
      const int pi = static_cast<int>(p);
      full_w[l][pi] = wp(w_off[l][pi]);
      L.b[pi] = b_off[l][pi] == SIZE_MAX ? nullptr : wp(b_off[l][pi]);
    }
  }

  // ---- ZeRO-3 full fine-tuning: gathers and flushes, all collectives (issued in the same
  // order on every rank: residency depends only on the calls made). Each use_* is a no-op
  // when the block is held, and unsharded.
  static int layer_block(int l) { return l % 2 ? 3 : 1; }
  cu::stream_t side_after_compute() {
    z3_fence.record(stream.get());
    FTUNE_CUDA_CHECK(cudaStreamWaitEvent(z3_side->get(), z3_fence.get(), 0));
    return z3_side->get();
  }
  void compute_waits(const cu::Event& e) {
    FTUNE_CUDA_CHECK(cudaStreamWaitEvent(stream.get(), e.get(), 0));
  }
  // The compute stream continues after everything issued to the side stream so far (the
  // owners' gradients are complete; nothing of this call is left running).
  void z3_join() {
    if (!z3) return;
    z3_done.record(z3_side->get());
    compute_waits(z3_done);
  }
  void z3_gather(size_t lo, size_t hi, bf16* slot, cu::stream_t s) {
    for (int r = 0; r < z3->size; ++r) {
      const ShardRange o = shard_range(n_params, r, z3->size);
      const size_t b0 = std::max(lo, o.begin), e0 = std::min(hi, o.end);
      if (b0 >= e0) continue;
      bf16* dst = slot + (b0 - lo);
      if (r == z3->rank)
        FTUNE_CUDA_CHECK(cudaMemcpyAsync(dst, own16 + (b0 - z3_own.begin),
                                         (e0 - b0) * sizeof(bf16), cudaMemcpyDeviceToDevice, s));
      if (z3->size > 1) z3->broadcast(dst, (e0 - b0) * sizeof(bf16), r, s);
    }
  }
  // Starts gathering [lo, hi) into block k on the side stream (z3_ready[k] marks the end).
  void gather_block(int k, size_t lo, size_t hi) {
    const cu::stream_t s = side_after_compute();
    z3_gather(lo, hi, z3_slot[k].as<bf16>(), s);
    z3_ready[k].record(s);
    win[k] = Window{lo, hi, z3_slot[k].as<bf16>(), z3_scratch[k].as<float>()};
  }
  // Block k's gradient (formed on the compute stream) summed over ranks and added to the
  // owners' range, its scratch zeroed for the block's next layer, on the side stream.
  void z3_flush(int k) {
    const Window& v = win[k];
    const cu::stream_t s = side_after_compute();
    const size_t n = v.hi - v.lo;
    if (z3->size > 1) z3->all_reduce_sum(v.g, n, s);
    const size_t b0 = std::max(v.lo, z3_own.begin), e0 = std::min(v.hi, z3_own.end);
    if (b0 < e0)
      cu::add_into(own_g + (b0 - z3_own.begin), v.g + (b0 - v.lo),
                   static_cast<int64_t>(e0 - b0), s);
    cm::memset0(v.g, n * sizeof(float), s);
  }
  void use_embed() {
    if (!z3) return;
    if (!embed_held) gather_block(0, 0, layer0);
    embed_held = true;
    compute_waits(z3_ready[0]);
    bind_embed_views();
  }
  void start_tail() {  // the tail's gather, ahead of use_tail
    if (!z3 || tail_held) return;
    gather_block(2, tail_begin, n_params);
    tail_held = true;
  }
  void use_tail() {
    if (!z3) return;
    if (lm_head_off == embed_off) use_embed();
    start_tail();
    compute_waits(z3_ready[2]);
    bind_tail_views();
  }
  void start_layer(int l) {
    if (slot_layer[l % 2] == l) return;
    const size_t lo = layer0 + static_cast<size_t>(l) * layer_span;
    gather_block(layer_block(l), lo, lo + layer_span);
    slot_layer[l % 2] = l;
  }
  // Layer l for the compute stream, and `next`'s gather started (if in range): it goes to
  // the other slot, whose previous layer's work is all issued by now.
  void use_layer(int l, int next) {
    if (!z3) return;
    start_layer(l);
    compute_waits(z3_ready[layer_block(l)]);
    bind_layer_views(l);
    if (next >= 0 && next < c.num_hidden_layers) start_layer(next);
  }
  void drop_gathered() {
    slot_layer = {-1, -1};
    embed_held = tail_held = false;
  }
  void flush_embed() { if (z3) z3_flush(0); }
  void flush_layer(int l) { if (z3) z3_flush(layer_block(l)); }
  void flush_tail() { if (z3) z3_flush(2); }
  // An empty micro-batch: the gathers and flushes of a real one, in its order.
  void z3_walk(bool backward) {
    const int L = static_cast<int>(c.num_hidden_layers);
    use_embed();
    for (int l = 0; l < L; ++l) {
      use_layer(l, l + 1);
      if (l == L - 1) start_tail();
    }
    use_tail();
    if (backward) {
      flush_tail();
      for (int l = L - 1; l >= 0; --l) {
        use_layer(l, l - 1);
        flush_layer(l);
      }
      flush_embed();
    }
    z3_join();
  }

  // Full fine-tuning: dW [out, in] += dy^T x and db += column sums of dy, before the input
  // gradient (which may overwrite x).
  void full_weight_grad(int l, Proj p, const bf16* dy, const bf16* x) {
    const int pi = static_cast<int>(p);
    Scope ps(&prof, cm::Phase::full_grads, stream.get());
    gemm.matmul(cu::GemmOp::TN, wg(w_off[l][pi]), dy, x, proj_out_features(c, p),
                proj_in_features(c, p), dims.N, 1.f, 1.f, stream.get());
    if (b_off[l][pi] != SIZE_MAX)
      cu::bias_backward(wg(b_off[l][pi]), dy, dims.N, proj_out_features(c, p),
                        colgrad_ws.as<float>(), stream.get());
  }
  void norm_weight_grad(size_t off, const bf16* dy, const bf16* x, const float* rstd,
                        int64_t rows, int64_t cols) {
    Scope ps(&prof, cm::Phase::full_grads, stream.get());
    cu::rms_norm_weight_backward(wg(off), dy, x, rstd, rows, cols, colgrad_ws.as<float>(),
                                 stream.get());
  }

  static cm::BlockSharding block_sharding(const CudaTransformer::LayerSharding* z) {
    return z ? cm::BlockSharding{true, z->rank, z->size} : cm::BlockSharding{};
  }

  Impl(const WeightSource& weights, bool ckpt, bool flash_attn, int dev, int quant_bits,
       bool offload, const CudaTransformer::LayerSharding* zero3)
      : device(select_device(dev)),
        c(weights.config()),
        checkpointing(ckpt),
        flash(flash_attn && (c.head_dim == 64 || c.head_dim == 128)),
        w(weights, stream.get(), quant_bits, offload, block_sharding(zero3)),
        inv_freq(rope_inv_freq(c)) {
    cudaDeviceProp prop{};
    FTUNE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    dev_name = "cuda:" + std::to_string(device) + " (" + prop.name + ")";
    if (quant_bits) {
      size_t off = 0;
      for (Proj p : kAllProj) {
        dequant_off[static_cast<int>(p)] = off;
        off += (proj_in_features(c, p) * proj_out_features(c, p) * sizeof(bf16) + 255) / 256 * 256;
      }
      dequant = cu::DeviceBuffer(off);
    }
    if (w.streamed())
      streamer = cm::LayerStreamer(w.chunk(0), w.offload, w.chunk_bytes, w.sharding.rank,
                                   w.sharding.size, static_cast<int>(c.num_hidden_layers),
                                   stream.get(), zero3 ? zero3->all_gather : cm::DeviceAllGather{});
    note_memory();
  }

  // Layer l's projection block as the stream will see it: resident, or streamed in.
  const char* block(int l) { return w.streamed() ? streamer.acquire(l) : w.block(l); }

  // ZeRO-3, for a micro-batch with no tokens: take part in the layer gathers the other ranks
  // run, in the order a real step asks for the layers (forward up; backward down). Through
  // weight(), so that the quantised path's one-layer cache moves exactly as in a real step
  // (a gather happens when a layer is asked for that the streamer does not hold last).
  void walk_layers(bool backward) {
    if (!w.sharding.on) return;
    const int L = static_cast<int>(c.num_hidden_layers);
    for (int l = 0; l < L; ++l) weight(l, Proj::q);
    if (backward)
      for (int l = L - 2; l >= 0; --l) weight(l, Proj::q);
  }

  // Projection p's bf16 weight for layer l. Quantised, the whole layer is dequantised into
  // one scratch on first use; the stream orders this after the previous layer's readers.
  const bf16* weight(int l, Proj p) {
    const int pi = static_cast<int>(p);
    if (full) return full_w[l][pi];
    if (!w.quant_bits) return reinterpret_cast<const bf16*>(block(l) + w.parts[pi].w);
    if (dequant_layer != l) {
      const char* blk = block(l);
      Scope ps(&prof, cm::Phase::dequant, stream.get());
      for (Proj q : kAllProj) {
        const int qi = static_cast<int>(q);
        const cm::ProjParts& P = w.parts[qi];
        bf16* dst = reinterpret_cast<bf16*>(dequant.as<char>() + dequant_off[qi]);
        const int64_t rows = proj_out_features(c, q), cols = proj_in_features(c, q);
        const float* scale = reinterpret_cast<const float*>(blk + P.scale);
        if (w.quant_bits == 8)
          cu::dequantize_int8_rows(dst, reinterpret_cast<const int8_t*>(blk + P.q), scale, rows,
                                   cols, stream.get());
        else
          cu::dequantize_nf4(dst, reinterpret_cast<const uint8_t*>(blk + P.q),
                             reinterpret_cast<const uint8_t*>(blk + P.abs), scale, rows * cols,
                             stream.get());
      }
      dequant_layer = l;
    }
    return reinterpret_cast<const bf16*>(dequant.as<char>() + dequant_off[pi]);
  }

  // Bytes this backend holds now; cuBLASLt's workspace counted at its fixed size.
  void note_memory() {
    const size_t now = w.bytes() + dequant.bytes() + streamer.bytes() + colgrad_ws.bytes() +
                       emb_uniq.bytes() + emb_start.bytes() + emb_order.bytes() + rope_cos.bytes() + rope_sin.bytes() + arena.bytes() +
                       p32.bytes() + p16.bytes() + g32.bytes() + cu::Gemm::kDefaultWorkspace;
    peak = std::max(peak, now);
  }

  static void grow(cu::DeviceBuffer& buf, size_t bytes) {
    if (buf.bytes() >= bytes) return;
    buf = cu::DeviceBuffer();  // free first: never hold old and new at once
    buf = cu::DeviceBuffer(bytes);
  }

  void ensure_rope(int64_t positions) {
    if (positions <= rope_positions) return;
    const int64_t half = c.head_dim / 2;
    std::vector<float> cs(positions * half), sn(positions * half);
    for (int64_t p = 0; p < positions; ++p)
      for (int64_t i = 0; i < half; ++i) {
        // As the CPU backend (and HF): the angle is formed in fp32, cos/sin in double.
        const float angle = static_cast<float>(inv_freq[i]) * static_cast<float>(p);
        cs[p * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
        sn[p * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
    rope_cos = cu::to_device(cs);
    rope_sin = cu::to_device(sn);
    rope_positions = positions;
  }

  cu::AttentionShape attn_shape() const {
    return cu::AttentionShape{dims.N, dims.S, max_seqlen, static_cast<int>(c.num_attention_heads),
                              static_cast<int>(c.num_key_value_heads),
                              static_cast<int>(c.head_dim)};
  }

  // Validates ids, sizes the arena and uploads the batch.
  // Whether some projection may take lora_linear's unfused path (the one that needs b.xd):
  // the fused kernels take r <= 16, widths that are multiples of 8 and 16-byte aligned A
  // (activations are carved 256-byte aligned).
  static bool may_take_unfused_lora(const LoraAdapter& a) {
    if (a.slots.empty()) return false;
    if (a.spec.rank > 16) return true;
    for (const LoraSlot& s : a.slots)
      if (s.in % 8 != 0 || s.out % 8 != 0 || s.a_offset % 8 != 0) return true;
    return false;
  }

  void prepare(const MicroBatch& mb, const LoraAdapter& a) {
    const int64_t N = mb.num_tokens(), V = c.vocab_size;
    std::vector<int32_t> rows, targets;
    for (int64_t n = 0; n < N; ++n) {
      const int32_t t = mb.tokens[n];
      if (t < 0 || t >= V)
        throw std::runtime_error("token id " + std::to_string(t) +
                                 " is outside the vocabulary (" + std::to_string(V) + ")");
      if (mb.targets[n] < 0) continue;
      if (mb.targets[n] >= V)
        throw std::runtime_error("label id " + std::to_string(mb.targets[n]) +
                                 " is outside the vocabulary (" + std::to_string(V) + ")");
      rows.push_back(static_cast<int32_t>(n));
      targets.push_back(mb.targets[n]);
    }
    dims.N = N;
    dims.S = mb.num_seqs();
    dims.R = static_cast<int64_t>(rows.size());
    dims.chunk = std::clamp<int64_t>(kLogitsBytes / (2 * V), 1, std::max<int64_t>(dims.R, 1));
    dims.rank = a.spec.rank;
    max_seqlen = 0;
    for (int64_t s = 0; s < dims.S; ++s)
      max_seqlen = std::max(max_seqlen, mb.seq_start[s + 1] - mb.seq_start[s]);
    dims.attn_ws = flash ? cu::flash_attention_backward_workspace(attn_shape()) : 0;
    dims.keep_mid = checkpointing && keep_mid_residuals;
    dims.unfused_lora = may_take_unfused_lora(a);
    ensure_rope(mb.max_position() + 1);

    cm::Carver measure(nullptr);
    cm::carve(measure, b, c, dims, checkpointing);
    grow(arena, measure.used());
    cm::Carver real(arena.as<char>());
    cm::carve(real, b, c, dims, checkpointing);

    if (full) prepare_full(mb);
    note_memory();

    const cu::stream_t s = stream.get();
    cm::h2d(b.tokens, mb.tokens.data(), N * sizeof(int32_t), s);
    cm::h2d(b.positions, mb.positions.data(), N * sizeof(int32_t), s);
    cm::h2d(b.seq_start, mb.seq_start.data(), (dims.S + 1) * sizeof(int64_t), s);
    cm::h2d(b.rows, rows.data(), dims.R * sizeof(int32_t), s);
    cm::h2d(b.row_targets, targets.data(), dims.R * sizeof(int32_t), s);
  }

  // Full fine-tuning: the embedding gradient's rows grouped by token (uniq, start, order),
  // and the column-gradient workspace for this batch's largest row count.
  void prepare_full(const MicroBatch& mb) {
    const int64_t N = mb.num_tokens();
    std::vector<int32_t> order(N);
    for (int64_t n = 0; n < N; ++n) order[n] = static_cast<int32_t>(n);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return mb.tokens[a] < mb.tokens[b]; });
    std::vector<int32_t> uniq, start;
    for (int64_t j = 0; j < N; ++j)
      if (j == 0 || mb.tokens[order[j]] != mb.tokens[order[j - 1]]) {
        uniq.push_back(mb.tokens[order[j]]);
        start.push_back(static_cast<int32_t>(j));
      }
    start.push_back(static_cast<int32_t>(N));
    emb_unique = static_cast<int64_t>(uniq.size());
    grow(emb_uniq, uniq.size() * sizeof(int32_t));
    grow(emb_start, start.size() * sizeof(int32_t));
    grow(emb_order, order.size() * sizeof(int32_t));
    const int64_t ws = std::max({cu::column_grad_workspace_floats(N, c.hidden_size),
                                 cu::column_grad_workspace_floats(N * c.num_attention_heads, c.head_dim),
                                 cu::column_grad_workspace_floats(N, c.num_attention_heads * c.head_dim)});
    grow(colgrad_ws, static_cast<size_t>(ws) * sizeof(float));
    const cu::stream_t s = stream.get();
    cm::h2d(emb_uniq.get(), uniq.data(), uniq.size() * sizeof(int32_t), s);
    cm::h2d(emb_start.get(), start.data(), start.size() * sizeof(int32_t), s);
    cm::h2d(emb_order.get(), order.data(), order.size() * sizeof(int32_t), s);
  }

  // The host-API path: the fp32 adapter crosses PCIe each micro-batch (the trainer's
  // device-resident path, forward_backward_on_device, avoids this).
  void upload_adapter(const LoraAdapter& a, bool want_grads) {
    const size_t np = a.params.size();
    grow(p32, np * sizeof(float));
    grow(p16, np * sizeof(bf16));
    if (want_grads) grow(g32, np * sizeof(float));
    note_memory();
    const cu::stream_t s = stream.get();
    cm::h2d(p32.get(), a.params.data(), np * sizeof(float), s);
    cu::to_bf16(p16.as<bf16>(), p32.as<float>(), static_cast<int64_t>(np), s);
  }

  cm::LinearOp op(int layer, Proj p, const cm::LoraCtx& lc) {
    const int pi = static_cast<int>(p);
    const uint64_t seed = mix_seed(lc.seed, static_cast<uint64_t>(layer) * kNumProj + pi);
    return cm::LinearOp{gemm, stream.get(), dims.N, proj_in_features(c, p),
                        proj_out_features(c, p), weight(layer, p), w.layers[layer].b[pi],
                        lc.adapter->slot(layer, p), seed, b.xd, b.du[0], &prof, b.lora_ws,
                        b.lora_ws_floats};
  }
  // u_ready: the projection's u is there already (kept from the forward for a recompute).
  void lin_fwd(int l, Proj p, const cm::LoraCtx& lc, bf16* y, const bf16* x, bool u_ready) {
    cm::linear_forward(op(l, p, lc), lc, y, x, acts_for(l).u[static_cast<int>(p)], u_ready);
  }
  void lin_bwd(int l, Proj p, const cm::LoraCtx& lc, bf16* dx, bool acc, const bf16* dy,
               const bf16* x) {
    if (gfull) full_weight_grad(l, p, dy, x);
    cm::linear_backward(op(l, p, lc), lc, dx, acc, dy, x, acts_for(l).u[static_cast<int>(p)]);
  }

  // Projections that read the same input (q/k/v; gate/up): with LoRA on each, their LoRA
  // backward products with A run as one pass over x and over dx (lora_linear's groups).
  // dx = the input gradient of every projection in ps (dys in the same order).
  void lin_bwd_group(int l, std::initializer_list<Proj> ps, const cm::LoraCtx& lc, bf16* dx,
                     std::initializer_list<const bf16*> dys, const bf16* x) {
    std::vector<cm::LinearOp> ops;
    std::vector<const bf16*> u, dy(dys);
    for (Proj p : ps) {
      if (gfull) full_weight_grad(l, p, dy[ops.size()], x);
      ops.push_back(op(l, p, lc));
      u.push_back(acts_for(l).u[static_cast<int>(p)]);
    }
    cm::linear_backward_group(ops.data(), static_cast<int>(ops.size()), lc, dx, dy.data(), x,
                              u.data(), b.du.data());
  }

  // gate = gate(xn2), up = up(xn2), h = silu(gate) up. With LoRA on both (rank <= 8) their
  // LoRA terms are added inside the SwiGLU pass (lora_swiglu_forward, same roundings); a
  // checkpointed layer's first forward writes h alone (its backward recomputes gate, up).
  void mlp_gate_up(int l, const cm::LoraCtx& lc, cm::LayerActs& A, bool recompute) {
    const int64_t N = dims.N, I = c.intermediate_size;
    const cu::stream_t s = stream.get();
    const int gi = static_cast<int>(Proj::gate), ui = static_cast<int>(Proj::up);
    const LoraSlot *sg = lc.adapter->slot(l, Proj::gate), *su = lc.adapter->slot(l, Proj::up);
    if (sg && su && cu::lora_swiglu_supported(lc.adapter->spec.rank, I, A.gate, A.up, A.h,
                                              A.u[gi], A.u[ui])) {
      cm::linear_forward_base(op(l, Proj::gate, lc), lc, A.gate, A.xn2, A.u[gi], recompute);
      cm::linear_forward_base(op(l, Proj::up, lc), lc, A.up, A.xn2, A.u[ui], recompute);
      Scope ps(&prof, cm::Phase::lora_fwd, s);
      const bool recomputed_later = checkpointing && !recompute && l != c.num_hidden_layers - 1;
      cu::lora_swiglu_forward(A.h, A.gate, A.up, A.u[gi], A.u[ui], lc.params + sg->b_offset,
                              lc.params + su->b_offset, N, I, lc.adapter->spec.rank,
                              lc.adapter->spec.scale(), s, !recomputed_later);
      return;
    }
    lin_fwd(l, Proj::gate, lc, A.gate, A.xn2, recompute);
    lin_fwd(l, Proj::up, lc, A.up, A.xn2, recompute);
    Scope ps(&prof, cm::Phase::elementwise, s);
    cu::swiglu_forward(A.h, A.gate, A.up, N * I, s);
  }

  cm::LayerActs& acts_for(int layer) {
    if (!checkpointing) return b.acts[layer];
    cm::LayerActs& A = b.acts[0];
    A.att = b.att_saved[layer];
    A.lse = b.lse_saved[layer];
    A.u = b.u_saved[layer];
    if (dims.keep_mid) A.x_mid = b.mid_saved[layer];
    return A;
  }

  // recompute: the checkpointed re-run of layer l during backward. It rebuilds what the
  // backward reads and nothing else: attention output, lse and the LoRA input products u
  // were kept (skip attention and every LoRA down product), and the layer's output is
  // already stored (skip the down projection and the last residual add). With keep_mid
  // (selective recompute) x_mid was kept too: the o projection and its add are skipped.
  void layer_forward(int l, const cm::LoraCtx& lc, bool recompute = false) {
    const cm::DeviceLayer& L = w.layers[l];
    cm::LayerActs& A = acts_for(l);
    const cu::stream_t s = stream.get();
    const bf16* x = b.resid[l];
    const int64_t N = dims.N, H = c.hidden_size, d = c.head_dim;
    const int64_t Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;
    const float eps = static_cast<float>(c.rms_norm_eps);

    using cm::Phase;
    { Scope ps(&prof, Phase::norm, s); cu::rms_norm_forward(A.xn1, A.rstd1, x, L.input_norm, N, H, eps, s); }
    const float* cs = rope_cos.as<float>();
    const float* sn = rope_sin.as<float>();
    // With q/k norm the projections land in q_pre/k_pre and the norm writes q/k; without,
    // q and k's LoRA terms are added inside RoPE's pass (linear_forward_rope).
    if (c.qk_norm) {
      lin_fwd(l, Proj::q, lc, A.q_pre, A.xn1, recompute);
      lin_fwd(l, Proj::k, lc, A.k_pre, A.xn1, recompute);
      {
        Scope ps(&prof, Phase::norm, s);
        cu::rms_norm_forward(A.q, A.rstd_q, A.q_pre, L.q_norm, N * Hq, d, eps, s);
        cu::rms_norm_forward(A.k, A.rstd_k, A.k_pre, L.k_norm, N * Hkv, d, eps, s);
      }
      Scope ps(&prof, Phase::rope, s);
      cu::rope_forward(A.q, cs, sn, b.positions, N, Hq, d, s);
      cu::rope_forward(A.k, cs, sn, b.positions, N, Hkv, d, s);
    } else {
      cm::linear_forward_rope(op(l, Proj::q, lc), lc, A.q, A.xn1,
                              A.u[static_cast<int>(Proj::q)], recompute, {cs, sn, b.positions, Hq, d});
      cm::linear_forward_rope(op(l, Proj::k, lc), lc, A.k, A.xn1,
                              A.u[static_cast<int>(Proj::k)], recompute, {cs, sn, b.positions, Hkv, d});
    }
    lin_fwd(l, Proj::v, lc, A.v, A.xn1, recompute);
    const cu::AttentionShape sh = attn_shape();
    if (!recompute) {
      Scope ps(&prof, Phase::attention_fwd, s);
      if (flash)
        cu::flash_attention_forward(A.att, A.lse, A.q, A.k, A.v, b.seq_start, sh, s);
      else
        cu::naive_attention_forward(A.att, A.lse, A.q, A.k, A.v, b.seq_start, sh, s);
    }
    if (!(recompute && dims.keep_mid))  // x_mid = x + o(att)
      cm::linear_forward_residual(op(l, Proj::o, lc), lc, A.x_mid, x, b.tmp_h, A.att,
                                  A.u[static_cast<int>(Proj::o)], recompute);

    { Scope ps(&prof, Phase::norm, s); cu::rms_norm_forward(A.xn2, A.rstd2, A.x_mid, L.post_norm, N, H, eps, s); }
    mlp_gate_up(l, lc, A, recompute);
    if (recompute) return;  // down's u was kept from the forward
    cm::linear_forward_residual(op(l, Proj::down, lc), lc, b.resid[l + 1], A.x_mid, b.tmp_h, A.h,
                                A.u[static_cast<int>(Proj::down)], recompute);
  }

  // On entry b.dx = dLoss/d(layer output); on exit dLoss/d(layer input). The residual
  // gradient is accumulated in b.dx in place (the CPU's dmid copy is not needed).
  void layer_backward(int l, const cm::LoraCtx& lc) {
    const cm::DeviceLayer& L = w.layers[l];
    cm::LayerActs& A = acts_for(l);
    const cu::stream_t s = stream.get();
    const int64_t N = dims.N, H = c.hidden_size, I = c.intermediate_size, d = c.head_dim;
    const int64_t Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;

    using cm::Phase;
    // MLP: x_out = x_mid + down(swiglu(gate(xn2), up(xn2))). The [N, I] gradients are
    // written over the activations they replace (h, then gate and up in place), which are
    // dead by then: three [N, I] buffers fewer (705 MB at the 8B shape, batch 4).
    bf16 *dh = A.h, *dgate = A.gate, *dup = A.up;
    lin_bwd(l, Proj::down, lc, dh, false, b.dx, A.h);
    { Scope ps(&prof, Phase::elementwise, s); cu::swiglu_backward(dgate, dup, dh, A.gate, A.up, N * I, s); }
    lin_bwd_group(l, {Proj::gate, Proj::up}, lc, b.dxn, {dgate, dup}, A.xn2);
    { Scope ps(&prof, Phase::norm, s); cu::rms_norm_backward(b.dx, b.dxn, A.x_mid, L.post_norm, A.rstd2, N, H, true, s); }
    if (gfull) norm_weight_grad(norm_off[l].post, b.dxn, A.x_mid, A.rstd2, N, H);

    // Attention: x_mid = x + o(attn(rope(q), rope(k), v))
    lin_bwd(l, Proj::o, lc, b.datt, false, b.dx, A.att);
    const cu::AttentionShape sh = attn_shape();
    {
      Scope ps(&prof, Phase::attention_bwd, s);
      if (flash)
        cu::flash_attention_backward(b.dq, b.dk, b.dv, b.datt, A.att, A.lse, A.q, A.k, A.v,
                                     b.seq_start, sh, b.attn_ws, s);
      else
        cu::naive_attention_backward(b.dq, b.dk, b.dv, b.datt, A.att, A.lse, A.q, A.k, A.v,
                                     b.seq_start, sh, s);
    }
    const float* cs = rope_cos.as<float>();
    const float* sn = rope_sin.as<float>();
    {
      Scope ps(&prof, Phase::rope, s);
      cu::rope_backward(b.dq, cs, sn, b.positions, N, Hq, d, s);
      cu::rope_backward(b.dk, cs, sn, b.positions, N, Hkv, d, s);
    }
    const bf16 *dq = b.dq, *dk = b.dk;
    if (c.qk_norm) {
      Scope ps(&prof, Phase::norm, s);
      cu::rms_norm_backward(b.dq_pre, b.dq, A.q_pre, L.q_norm, A.rstd_q, N * Hq, d, false, s);
      cu::rms_norm_backward(b.dk_pre, b.dk, A.k_pre, L.k_norm, A.rstd_k, N * Hkv, d, false, s);
      if (gfull) {
        norm_weight_grad(norm_off[l].q, b.dq, A.q_pre, A.rstd_q, N * Hq, d);
        norm_weight_grad(norm_off[l].k, b.dk, A.k_pre, A.rstd_k, N * Hkv, d);
      }
      dq = b.dq_pre;
      dk = b.dk_pre;
    }
    lin_bwd_group(l, {Proj::q, Proj::k, Proj::v}, lc, b.dxn, {dq, dk, b.dv}, A.xn1);
    {
      Scope ps(&prof, Phase::norm, s);
      cu::rms_norm_backward(b.dx, b.dxn, b.resid[l], L.input_norm, A.rstd1, N, H, true, s);
    }
    if (gfull) norm_weight_grad(norm_off[l].input, b.dxn, b.resid[l], A.rstd1, N, H);
  }

  // Final norm, lm_head and cross-entropy over the rows that carry a label, in chunks
  // (gathered into a dense [chunk, H] block, so full logits [N, V] never exist). Row
  // losses land in b.row_loss; with want_grad, b.dx = dLoss/d(last residual).
  void head(bool want_grad, float loss_scale) {
    const cu::stream_t s = stream.get();
    const int64_t N = dims.N, H = c.hidden_size, V = c.vocab_size, R = dims.R;
    const bf16* xl = b.resid[c.num_hidden_layers];
    Scope ps(&prof, cm::Phase::head, s);
    cu::rms_norm_forward(b.xf, b.rstd_f, xl, w.final_norm, N, H,
                         static_cast<float>(c.rms_norm_eps), s);
    if (want_grad) cm::memset0(b.dxf, N * H * sizeof(bf16), s);
    for (int64_t r0 = 0; r0 < R; r0 += dims.chunk) {
      const int64_t m = std::min(dims.chunk, R - r0);
      // Gather: embedding lookup with the normed rows as the table and row ids as tokens.
      cu::embedding_forward(b.xc, b.xf, b.rows + r0, m, H, N, s);
      gemm.matmul(cu::GemmOp::NT, b.logits, b.xc, w.lm_head, m, V, H, 1.f, 0.f, s);
      cu::cross_entropy_forward_backward(b.logits, b.row_loss + r0, b.logits,
                                         b.row_targets + r0, m, V, loss_scale, s);
      if (!want_grad) continue;
      // Full fine-tuning: d lm_head [V, H] += dlogits^T xc (tied: the embedding's gradient).
      if (gfull) gemm.matmul(cu::GemmOp::TN, wg(lm_head_off), b.logits, b.xc, V, H, m, 1.f, 1.f, s);
      gemm.matmul(cu::GemmOp::NN, b.dxc, b.logits, w.lm_head, m, H, V, 1.f, 0.f, s);
      cm::scatter_rows(b.dxf, b.dxc, b.rows + r0, m, H, s);
    }
    if (want_grad)
      cu::rms_norm_backward(b.dx, b.dxf, xl, w.final_norm, b.rstd_f, N, H, false, s);
    if (want_grad && gfull)
      cu::rms_norm_weight_backward(wg(final_norm_off), b.dxf, xl, b.rstd_f, N, H,
                                   colgrad_ws.as<float>(), s);
  }

  // Waits for the stream; returns the loss (summed in double on the host, in row order).
  LossSum finish_loss() {
    host_loss.resize(dims.R);
    cm::d2h(host_loss.data(), b.row_loss, dims.R * sizeof(float), stream.get());
    cm::stream_sync(stream.get());
    prof.collect();
    LossSum out;
    out.num_targets = dims.R;
    for (float v : host_loss) out.loss_sum += v;
    return out;
  }

  void embed() {
    Scope ps(&prof, cm::Phase::embed, stream.get());
    cu::embedding_forward(b.resid[0], w.embed, b.tokens, dims.N, c.hidden_size, c.vocab_size,
                          stream.get());
  }
};

CudaTransformer::CudaTransformer(const WeightSource& weights, bool gradient_checkpointing,
                                 bool flash_attn, int device, int quant_bits, bool offload_param,
                                 const LayerSharding* zero3)
    : impl_(std::make_unique<Impl>(weights, gradient_checkpointing, flash_attn, device,
                                   quant_bits, offload_param, zero3)) {}
CudaTransformer::CudaTransformer(const BaseWeights& weights, bool gradient_checkpointing,
                                 bool flash_attn, int device, int quant_bits, bool offload_param)
    : CudaTransformer(InMemoryWeightSource(weights), gradient_checkpointing, flash_attn, device,
                      quant_bits, offload_param) {}
CudaTransformer::CudaTransformer(const ModelConfig& config, bool gradient_checkpointing,
                                 bool flash_attn, int device, FullFineTuning)
    : impl_(std::make_unique<Impl>(config, gradient_checkpointing, flash_attn, device)) {}
CudaTransformer::~CudaTransformer() = default;

std::string CudaTransformer::name() const { return impl_->dev_name; }
bool CudaTransformer::uses_flash() const { return impl_->flash; }
void CudaTransformer::set_selective_recompute(bool on) { impl_->keep_mid_residuals = on; }
size_t CudaTransformer::peak_bytes() const { return impl_->peak; }
size_t CudaTransformer::weight_bytes() const { return impl_->w.bytes(); }
bool CudaTransformer::sharded() const { return impl_->w.sharding.on; }
int CudaTransformer::device() const { return impl_->device; }
cuda::stream_t CudaTransformer::stream() const { return impl_->stream.get(); }

LossSum CudaTransformer::forward_backward_on_device(const MicroBatch& mb,
                                                    const LoraAdapter& layout,
                                                    const cuda::bf16* params16, float* grads32,
                                                    float loss_scale, uint64_t dropout_seed) {
  Impl& m = *impl_;
  cm::use_device(m.device);
  if (m.z3) m.bind_full(params16, grads32);
  if (mb.num_tokens() == 0) {
    if (m.z3) {
      m.z3_walk(true);
      cm::stream_sync(m.stream.get());
    }
    m.walk_layers(true);
    return {};
  }
  m.prepare(mb, layout);
  if (m.full) m.bind_full(params16, grads32);
  const cm::LoraCtx lc{&layout, params16, grads32, layout.spec.dropout, dropout_seed};
  const int L = static_cast<int>(m.c.num_hidden_layers);
  m.use_embed();
  m.embed();
  for (int l = 0; l < L; ++l) {
    m.use_layer(l, l + 1);
    if (l == L - 1) m.start_tail();
    m.layer_forward(l, lc);
  }
  m.use_tail();
  m.head(true, loss_scale);
  m.flush_tail();
  for (int l = L - 1; l >= 0; --l) {
    m.use_layer(l, l - 1);
    // Under checkpointing the shared activations hold the last layer run: recompute.
    if (m.checkpointing && l != L - 1) {
      Scope ps(&m.prof, cm::Phase::recompute_total, m.stream.get());
      m.layer_forward(l, lc, true);
    }
    m.layer_backward(l, lc);
    m.flush_layer(l);
  }
  if (m.full) {  // b.dx = dLoss/d(embedding output): the rows go back to their tokens
    Scope ps(&m.prof, cm::Phase::full_grads, m.stream.get());
    cu::embedding_backward(m.wg(m.embed_off), m.b.dx, m.emb_uniq.as<int32_t>(),
                           m.emb_start.as<int32_t>(), m.emb_order.as<int32_t>(), m.emb_unique,
                           m.c.hidden_size, m.stream.get());
  }
  m.flush_embed();
  m.z3_join();
  m.prof.count_micro_step();
  return m.finish_loss();  // synchronizes the stream
}

LossSum CudaTransformer::forward_loss_on_device(const MicroBatch& mb, const LoraAdapter& layout,
                                                const cuda::bf16* params16) {
  Impl& m = *impl_;
  cm::use_device(m.device);
  if (m.z3) m.bind_full(params16, nullptr);
  if (mb.num_tokens() == 0) {
    if (m.z3) {
      m.z3_walk(false);
      cm::stream_sync(m.stream.get());
    }
    m.walk_layers(false);
    return {};
  }
  m.prepare(mb, layout);
  if (m.full) m.bind_full(params16, nullptr);
  const cm::LoraCtx lc{&layout, params16, nullptr, 0.0, 0};
  m.use_embed();
  m.embed();
  const int L = static_cast<int>(m.c.num_hidden_layers);
  for (int l = 0; l < L; ++l) {
    m.use_layer(l, l + 1);
    if (l == L - 1) m.start_tail();
    m.layer_forward(l, lc);
  }
  m.use_tail();
  m.head(false, 1.f);
  m.z3_join();
  return m.finish_loss();
}

LossSum CudaTransformer::forward_backward(const MicroBatch& mb, const LoraAdapter& adapter,
                                          float* grads, float loss_scale,
                                          uint64_t dropout_seed) {
  Impl& m = *impl_;
  if (mb.num_tokens() == 0)  // (ZeRO-3 still gathers)
    return forward_backward_on_device(mb, adapter, nullptr, nullptr, loss_scale, dropout_seed);
  cm::use_device(m.device);
  m.upload_adapter(adapter, true);
  const size_t np = adapter.params.size();
  cm::memset0(m.g32.get(), np * sizeof(float), m.stream.get());
  const LossSum out = forward_backward_on_device(mb, adapter, m.p16.as<bf16>(),
                                                 m.g32.as<float>(), loss_scale, dropout_seed);
  m.host_grads.resize(np);
  cm::d2h(m.host_grads.data(), m.g32.get(), np * sizeof(float), m.stream.get());
  cm::stream_sync(m.stream.get());
  for (size_t i = 0; i < np; ++i) grads[i] += m.host_grads[i];
  return out;
}

LossSum CudaTransformer::forward_loss(const MicroBatch& mb, const LoraAdapter& adapter) {
  Impl& m = *impl_;
  if (mb.num_tokens() == 0) return forward_loss_on_device(mb, adapter, nullptr);
  cm::use_device(m.device);
  m.upload_adapter(adapter, false);
  return forward_loss_on_device(mb, adapter, m.p16.as<bf16>());
}

bool CudaTransformer::full_finetuning() const { return impl_->full; }

void CudaTransformer::shard_full_finetuning(FullSharding sharding) {
  Impl& m = *impl_;
  if (!m.full) throw std::logic_error("shard_full_finetuning: not a full fine-tuning backend");
  if (sharding.size > 1 && (!sharding.broadcast || !sharding.all_reduce_sum))
    throw std::logic_error("shard_full_finetuning: several ranks need collectives");
  cm::use_device(m.device);
  m.z3_own = shard_range(m.n_params, sharding.rank, sharding.size);
  const size_t sizes[4] = {m.layer0, m.layer_span, m.n_params - m.tail_begin, m.layer_span};
  for (int k = 0; k < 4; ++k) {
    m.z3_slot[k] = cu::DeviceBuffer(std::max<size_t>(sizes[k], 1) * sizeof(bf16));
    m.z3_scratch[k] = cu::DeviceBuffer(std::max<size_t>(sizes[k], 1) * sizeof(float));
    m.z3_scratch[k].zero();
  }
  if (!m.z3_side) m.z3_side.emplace();
  m.z3 = std::move(sharding);
  m.win = {};
  m.drop_gathered();
  m.note_memory();
}

void CudaTransformer::drop_gathered() { impl_->drop_gathered(); }

size_t CudaTransformer::full_sharding_bytes() const {
  size_t n = 0;
  for (int k = 0; k < 4; ++k) n += impl_->z3_slot[k].bytes() + impl_->z3_scratch[k].bytes();
  return n;
}

}  // namespace ftune
