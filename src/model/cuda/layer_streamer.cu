// LayerStreamer: double-buffered fetches of layer blocks (offload_param, ZeRO-3).
#include <cuda_runtime.h>

#include <string>

#include "../../kernels/cuda/common.cuh"
#include "layer_streamer.cuh"

namespace ftune::cuda::model {

LayerStreamer::LayerStreamer(const char* chunks, bool chunks_on_host, size_t chunk_bytes,
                             int rank, int size, int num_layers, stream_t compute,
                             DeviceAllGather gather)
    : chunks_(chunks), on_host_(chunks_on_host), chunk_bytes_(chunk_bytes),
      slot_bytes_(chunk_bytes * static_cast<size_t>(size)), rank_(rank), size_(size),
      layers_(num_layers), compute_(compute), gather_(std::move(gather)),
      slots_(2 * chunk_bytes * static_cast<size_t>(size)) {
  if (size > 1 && !gather_) throw CudaError("LayerStreamer: no all-gather for " +
                                            std::to_string(size) + " ranks");
  // Both slots start free: their "free" events mark the compute stream as it is now.
  free_[0].record(compute_);
  free_[1].record(compute_);
}

void LayerStreamer::copy_in(int l, int slot) {
  FTUNE_CUDA_CHECK(cudaStreamWaitEvent(copy_.get(), free_[slot].get(), 0));
  const char* mine = chunks_ + static_cast<size_t>(l) * chunk_bytes_;
  char* dst = slot_ptr(slot);
  char* own = dst + static_cast<size_t>(rank_) * chunk_bytes_;  // this rank's place
  if (on_host_ || size_ == 1)
    FTUNE_CUDA_CHECK(cudaMemcpyAsync(own, mine, chunk_bytes_,
                                     on_host_ ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToDevice,
                                     copy_.get()));
  if (size_ > 1) gather_(on_host_ ? own : mine, dst, chunk_bytes_, copy_.get());
  ready_[slot].record(copy_.get());
  slot_layer_[slot] = l;
  ++copies_;
}

const char* LayerStreamer::acquire(int l) {
  if (l == last_) return slot_ptr(slot_of(l));
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
  return slot_ptr(s);
}

}  // namespace ftune::cuda::model
