#pragma once
// kernels module (CUDA backend): device discovery, RAII owners for streams, events and
// device memory, and the host-side bf16 type. A plain C++ header: it compiles without nvcc
// or any CUDA header (streams/events are the driver's opaque struct pointers, which are
// exactly cudaStream_t / cudaEvent_t inside the .cu files), so host code and tests can use
// the CUDA backend from g++ alone. Everything here is implemented in src/kernels/cuda/*.cu.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

struct CUstream_st;  // = cudaStream_t's pointee
struct CUevent_st;   // = cudaEvent_t's pointee

namespace ftune::cuda {

using stream_t = CUstream_st*;  // nullptr = the legacy default stream
using event_t = CUevent_st*;

// Thrown by FTUNE_CUDA_CHECK / FTUNE_CUBLAS_CHECK: "<lib> error <name> (<text>) in <call>
// at <file>:<line> [rank r]".
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Number of usable devices; 0 (never a crash or throw) when there is no GPU or driver.
int cuda_device_count();
// "NVIDIA H200, sm_90, 132 SMs, 139.8 GiB" (throws if the device does not exist).
std::string device_description(int device = 0);
void set_device(int device);
void device_synchronize();
// Rank printed in error messages (the dist module sets it once ranks are known).
void set_error_rank(int rank);

// bf16 as stored on the device: layout-identical to __nv_bfloat16.
struct bf16 {
  uint16_t bits;
};
// Round to nearest even, as __float2bfloat16_rn does (NaN stays NaN).
inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}
inline float to_float(bf16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Owns one stream (non-blocking w.r.t. the legacy stream).
class Stream {
 public:
  Stream();
  ~Stream();
  Stream(Stream&& o) noexcept : s_(o.s_) { o.s_ = nullptr; }
  Stream& operator=(Stream&& o) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  stream_t get() const { return s_; }
  void synchronize() const;

 private:
  stream_t s_ = nullptr;
};

// Owns one event (with timing).
class Event {
 public:
  Event();
  ~Event();
  Event(Event&& o) noexcept : e_(o.e_) { o.e_ = nullptr; }
  Event& operator=(Event&& o) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  event_t get() const { return e_; }
  void record(stream_t s = nullptr);
  void synchronize() const;
  // Milliseconds from `start` to this event (both recorded and completed).
  float elapsed_ms_since(const Event& start) const;

 private:
  event_t e_ = nullptr;
};

// Bytes held by the live DeviceBuffers of this process (every device), and the most held at
// once since the last reset: ftune's twins of torch.cuda.memory_allocated and
// max_memory_allocated (the CUDA context and cuBLASLt's handle state are not included).
size_t device_bytes_in_use();
size_t device_bytes_peak();
void reset_device_bytes_peak();  // peak := bytes in use now

// Owns one cudaMalloc'd allocation (256-byte aligned). upload/download/zero are for setup
// and tests: they synchronize the whole device first (every stream), then copy.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) {
    o.p_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return p_; }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  void upload(const void* src, size_t bytes, size_t offset = 0);
  void download(void* dst, size_t bytes, size_t offset = 0) const;
  void zero();

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Owns page-locked host memory (cudaHostAlloc): the source of asynchronous host-to-device
// copies that overlap kernels (offload_param). Not counted in device_bytes_*.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t bytes);
  ~PinnedBuffer();
  PinnedBuffer(PinnedBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) {
    o.p_ = nullptr;
    o.bytes_ = 0;
  }
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* get() const { return p_; }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

template <typename T>
DeviceBuffer to_device(const std::vector<T>& v) {
  DeviceBuffer b(v.size() * sizeof(T));
  if (!v.empty()) b.upload(v.data(), v.size() * sizeof(T));
  return b;
}
template <typename T>
std::vector<T> to_host(const DeviceBuffer& b, size_t n) {
  if (n * sizeof(T) > b.bytes()) throw CudaError("to_host: buffer too small");
  std::vector<T> v(n);
  if (n) b.download(v.data(), n * sizeof(T));
  return v;
}

}  // namespace ftune::cuda
