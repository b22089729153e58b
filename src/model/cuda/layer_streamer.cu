// LayerStreamer: double-buffered host-to-device copies of layer blocks (offload_param).
#include <cuda_runtime.h>

#include "../../kernels/cuda/common.cuh"
#include "layer_streamer.cuh"

namespace ftune::cuda::model {

LayerStreamer::LayerStreamer(const char* host_blocks, size_t layer_bytes, int num_layers,
                             stream_t compute)
    : host_(host_blocks), layer_bytes_(layer_bytes), layers_(num_layers), compute_(compute),
      slots_(2 * layer_bytes) {
  // Both slots start free: their "free" events mark the compute stream as it is now.
  free_[0].record(compute_);
  free_[1].record(compute_);
}

void LayerStreamer::copy_in(int l, int slot) {
  FTUNE_CUDA_CHECK(cudaStreamWaitEvent(copy_.get(), free_[slot].get(), 0));
  FTUNE_CUDA_CHECK(cudaMemcpyAsync(slots_.as<char>() + slot * layer_bytes_,
                                   host_ + static_cast<size_t>(l) * layer_bytes_, layer_bytes_,
                                   cudaMemcpyHostToDevice, copy_.get()));
  ready_[slot].record(copy_.get());
  slot_layer_[slot] = l;
  ++copies_;
}

const char* LayerStreamer::acquire(int l) {
  if (l == last_) return slots_.as<char>() + slot_of(l) * layer_bytes_;
  int s = slot_of(l);
  if (s < 0) {  // not prefetched: copy now into the slot the previous layer does not hold
    s = slot_of(last_) == 0 ? 1 : 0;
    free_[s].record(compute_);
    copy_in(l, s);
    ++misses_;
  }
  FTUNE_CUDA_CHECK(cudaStreamWaitEvent(compute_, ready_[s].get(), 0));
  if (last_ >= 0) dir_ = l > last_ ? 1 : -1;
  int next = l + dir_;
  if (next < 0 || next >= layers_) next = l - dir_;  // the walk turns round at either end
  if (next >= 0 && next < layers_ && slot_of(next) < 0) {
    const int o = 1 - s;
    // Everything that read slot o (the previous layer) is already enqueued on compute.
    free_[o].record(compute_);
    copy_in(next, o);
  }
  last_ = l;
  return slots_.as<char>() + s * layer_bytes_;
}

}  // namespace ftune::cuda::model
