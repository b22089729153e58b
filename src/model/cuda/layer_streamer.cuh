#pragma once
// Brings layer blocks (DeviceWeights) to the GPU just in time, for offload_param = "cpu"
// (blocks in pinned host memory) and for ZeRO-3 (each rank holds one chunk of every block,
// on the device or in pinned memory; the others' chunks arrive by an all-gather). Two device
// slots: the layer in use, and the one expected next, fetched on a side stream while the
// current layer computes (forward walks up, backward down; at the last and first layer the
// walk turns round). Events order everything: a slot is overwritten only after the compute
// stream has passed every kernel that read its previous layer, and a layer is read only
// after its fetch.
// ZeRO-3's gathers are collectives: ranks fetch the same layers in the same order because
// they acquire the same layers in the same order (the trainer keeps them in step).
#include <functional>

#include "ftune/kernels/cuda_device.hpp"

namespace ftune::cuda::model {

// Collective, enqueued on `stream`: every rank sends `bytes` from `send`; recv (size * bytes)
// receives rank r's at r * bytes. In place when send == recv + rank * bytes.
using DeviceAllGather =
    std::function<void(const void* send, void* recv, size_t bytes, stream_t stream)>;

class LayerStreamer {
 public:
  LayerStreamer() = default;
  // chunks: layer l's part held here at chunks + l * chunk_bytes (pinned host memory when
  // chunks_on_host, else device). rank/size: which part of the block that is (size 1: the
  // whole block; then no gather is needed).
  LayerStreamer(const char* chunks, bool chunks_on_host, size_t chunk_bytes, int rank, int size,
                int num_layers, stream_t compute, DeviceAllGather gather = {});
  bool active() const { return layers_ > 0; }
  // Device address of layer l's block, valid for work enqueued on the compute stream from
  // now until the next acquire of another layer.
  const char* acquire(int l);
  size_t bytes() const { return slots_.bytes(); }
  int64_t copies() const { return copies_; }   // layers fetched
  int64_t misses() const { return misses_; }   // of which not prefetched (the stream waited)

 private:
  void copy_in(int l, int slot);
  char* slot_ptr(int s) const { return slots_.as<char>() + static_cast<size_t>(s) * slot_bytes_; }
  int slot_of(int l) const { return slot_layer_[0] == l ? 0 : slot_layer_[1] == l ? 1 : -1; }
  const char* chunks_ = nullptr;
  bool on_host_ = true;
  size_t chunk_bytes_ = 0, slot_bytes_ = 0;
  int rank_ = 0, size_ = 1;
  int layers_ = 0;
  stream_t compute_ = nullptr;
  DeviceAllGather gather_;
  Stream copy_;
  DeviceBuffer slots_;
  Event ready_[2], free_[2];
  int slot_layer_[2] = {-1, -1};
  int last_ = -1, dir_ = 1;
  int64_t copies_ = 0, misses_ = 0;
};

}  // namespace ftune::cuda::model
