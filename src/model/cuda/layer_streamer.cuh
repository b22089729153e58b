#pragma once
// offload_param = "cpu": the layers' projection blocks (DeviceWeights) live in pinned host
// memory and are copied to the GPU as the layers are used. Two device slots: the layer in
// use, and the one expected next, copied on a side stream while the current layer computes
// (forward walks up, backward down; at the last and first layer the walk turns round).
// Events order everything: a slot is overwritten only after the compute stream has passed
// every kernel that read its previous layer, and a layer is read only after its copy.
#include "ftune/kernels/cuda_device.hpp"

namespace ftune::cuda::model {

class LayerStreamer {
 public:
  LayerStreamer() = default;
  LayerStreamer(const char* host_blocks, size_t layer_bytes, int num_layers, stream_t compute);
  bool active() const { return layers_ > 0; }
  // Device address of layer l's block, valid for work enqueued on the compute stream from
  // now until the next acquire of another layer.
  const char* acquire(int l);
  size_t bytes() const { return slots_.bytes(); }
  int64_t copies() const { return copies_; }   // layers copied in
  int64_t misses() const { return misses_; }   // of which not prefetched (the stream waited)

 private:
  void copy_in(int l, int slot);
  int slot_of(int l) const { return slot_layer_[0] == l ? 0 : slot_layer_[1] == l ? 1 : -1; }
  const char* host_ = nullptr;
  size_t layer_bytes_ = 0;
  int layers_ = 0;
  stream_t compute_ = nullptr;
  Stream copy_;
  DeviceBuffer slots_;
  Event ready_[2], free_[2];
  int slot_layer_[2] = {-1, -1};
  int last_ = -1, dir_ = 1;
  int64_t copies_ = 0, misses_ = 0;
};

}  // namespace ftune::cuda::model
