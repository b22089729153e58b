// Device discovery, error reporting and the RAII owners of cuda_device.hpp.
#include <atomic>
#include <cstdio>
#include <mutex>
#include <string>
#include <utility>

#include "common.cuh"
#include "ftune/kernels/cuda_device.hpp"

namespace ftune::cuda {

namespace {
std::atomic<int> g_rank{-1};

std::string message(const char* lib, const char* name, const char* text, const char* call,
                    const char* file, int line) {
  std::string m = std::string(lib) + " error " + name + " (" + text + ") in " + call + " at " +
                  file + ":" + std::to_string(line);
  if (const int r = g_rank.load(); r >= 0) m += " [rank " + std::to_string(r) + "]";
  return m;
}
}  // namespace

namespace detail {
void fail(const char* lib, const char* name, const char* text, const char* call,
          const char* file, int line) {
  throw CudaError(message(lib, name, text, call, file, line));
}
void warn(const char* lib, const char* name, const char* text, const char* call,
          const char* file, int line) {
  std::fprintf(stderr, "%s\n", message(lib, name, text, call, file, line).c_str());
}
DeviceFacts device_facts() {
  // Under a lock: ranks may drive their GPUs from more than one host thread.
  static std::mutex mu;
  static DeviceFacts known[64];
  int dev = 0;
  FTUNE_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  DeviceFacts scratch;
  DeviceFacts& f = dev >= 0 && dev < 64 ? known[dev] : scratch;
  if (f.sms == 0) {
    FTUNE_CUDA_CHECK(cudaDeviceGetAttribute(&f.major, cudaDevAttrComputeCapabilityMajor, dev));
    FTUNE_CUDA_CHECK(cudaDeviceGetAttribute(&f.minor, cudaDevAttrComputeCapabilityMinor, dev));
    FTUNE_CUDA_CHECK(cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, dev));
  }
  return f;
}
}  // namespace detail

void set_error_rank(int rank) { g_rank.store(rank); }

int cuda_device_count() {
  int n = 0;
  // No driver / no device is an answer here, not an error: report 0 and clear the error
  // so it does not surface at the next check.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

std::string device_description(int device) {
  cudaDeviceProp p{};
  FTUNE_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s, sm_%d%d, %d SMs, %.1f GiB", p.name, p.major, p.minor,
                p.multiProcessorCount, static_cast<double>(p.totalGlobalMem) / (1 << 30));
  return buf;
}

void set_device(int device) { FTUNE_CUDA_CHECK(cudaSetDevice(device)); }
void device_synchronize() { FTUNE_CUDA_CHECK(cudaDeviceSynchronize()); }

// ---------------------------------------------------------------- Stream
Stream::Stream() { FTUNE_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
Stream::~Stream() {
  if (s_) FTUNE_CUDA_WARN(cudaStreamDestroy(s_));
}
Stream& Stream::operator=(Stream&& o) noexcept {
  if (this != &o) {
    if (s_) FTUNE_CUDA_WARN(cudaStreamDestroy(s_));
    s_ = std::exchange(o.s_, nullptr);
  }
  return *this;
}
void Stream::synchronize() const { FTUNE_CUDA_CHECK(cudaStreamSynchronize(s_)); }

// ---------------------------------------------------------------- Event
Event::Event() { FTUNE_CUDA_CHECK(cudaEventCreate(&e_)); }
Event::~Event() {
  if (e_) FTUNE_CUDA_WARN(cudaEventDestroy(e_));
}
Event& Event::operator=(Event&& o) noexcept {
  if (this != &o) {
    if (e_) FTUNE_CUDA_WARN(cudaEventDestroy(e_));
    e_ = std::exchange(o.e_, nullptr);
  }
  return *this;
}
void Event::record(stream_t s) { FTUNE_CUDA_CHECK(cudaEventRecord(e_, s)); }
void Event::synchronize() const { FTUNE_CUDA_CHECK(cudaEventSynchronize(e_)); }
float Event::elapsed_ms_since(const Event& start) const {
  float ms = 0;
  FTUNE_CUDA_CHECK(cudaEventElapsedTime(&ms, start.e_, e_));
  return ms;
}

// ---------------------------------------------------------------- DeviceBuffer
namespace {
std::atomic<size_t> g_in_use{0}, g_peak{0};
void count_alloc(size_t bytes) {
  const size_t now = g_in_use.fetch_add(bytes) + bytes;
  size_t peak = g_peak.load();
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
}
void count_free(size_t bytes) { g_in_use.fetch_sub(bytes); }
}  // namespace

size_t device_bytes_in_use() { return g_in_use.load(); }
size_t device_bytes_peak() { return g_peak.load(); }
void reset_device_bytes_peak() { g_peak.store(g_in_use.load()); }

DeviceBuffer::DeviceBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes) {
    FTUNE_CUDA_CHECK(cudaMalloc(&p_, bytes));
    count_alloc(bytes);
  }
}
DeviceBuffer::~DeviceBuffer() {
  if (p_) {
    FTUNE_CUDA_WARN(cudaFree(p_));
    count_free(bytes_);
  }
}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (p_) {
      FTUNE_CUDA_WARN(cudaFree(p_));
      count_free(bytes_);
    }
    p_ = std::exchange(o.p_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}
PinnedBuffer::PinnedBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes) FTUNE_CUDA_CHECK(cudaHostAlloc(&p_, bytes, cudaHostAllocPortable));
}
PinnedBuffer::~PinnedBuffer() {
  if (p_) FTUNE_CUDA_WARN(cudaFreeHost(p_));
}
PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
  if (this != &o) {
    if (p_) FTUNE_CUDA_WARN(cudaFreeHost(p_));
    p_ = std::exchange(o.p_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void DeviceBuffer::upload(const void* src, size_t bytes, size_t offset) {
  if (offset + bytes > bytes_) throw CudaError("DeviceBuffer::upload out of range");
  FTUNE_CUDA_CHECK(cudaDeviceSynchronize());  // no kernel on any stream still uses it
  FTUNE_CUDA_CHECK(
      cudaMemcpy(static_cast<char*>(p_) + offset, src, bytes, cudaMemcpyHostToDevice));
}
void DeviceBuffer::download(void* dst, size_t bytes, size_t offset) const {
  if (offset + bytes > bytes_) throw CudaError("DeviceBuffer::download out of range");
  FTUNE_CUDA_CHECK(cudaDeviceSynchronize());  // see the writes of every stream
  FTUNE_CUDA_CHECK(
      cudaMemcpy(dst, static_cast<const char*>(p_) + offset, bytes, cudaMemcpyDeviceToHost));
}
void DeviceBuffer::zero() {
  if (!bytes_) return;
  FTUNE_CUDA_CHECK(cudaDeviceSynchronize());
  FTUNE_CUDA_CHECK(cudaMemset(p_, 0, bytes_));
  FTUNE_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace ftune::cuda
