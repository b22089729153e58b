#pragma once
// dist module, GPU path: an NCCL communicator over the ranks that bootstrap() connected.
// The bootstrap Communicator (MPI, env/TCP or single) is used only to agree on each rank's
// GPU and to broadcast NCCL's unique id; every collective after that runs through NCCL.
// A plain C++ header (no CUDA or NCCL include): device pointers are raw pointers, streams
// are ftune::cuda::stream_t. Implemented in src/nccl/ (library ftune_nccl, compiled with
// FTUNE_HAVE_NCCL=1 when CUDA and NCCL are found); without it the inline stubs at the end
// keep callers compiling, and nccl_available() is false.
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "ftune/dist/communicator.hpp"
#include "ftune/kernels/cuda_device.hpp"

struct ncclComm;  // = ncclComm_t's pointee

namespace ftune {

// Thrown by FTUNE_NCCL_CHECK and by NcclCommunicator::create: "NCCL error <name> (<text>)
// in <call> at <file>:<line> [rank r, GPU d]".
struct NcclError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// True when this build includes NCCL (says nothing about GPUs: see cuda_device_count()).
bool nccl_available();

// The GPU a rank uses: local_rank % visible devices. With one process per GPU this is the
// local rank; under Slurm's --gpus-per-task=1 every task sees one device and picks 0.
inline int nccl_device_for(int local_rank, int visible_devices) {
  return visible_devices > 0 ? local_rank % visible_devices : -1;
}

// What a rank reports about its GPU (doctor, tests, error messages).
struct GpuInfo {
  int device = -1;             // CUDA ordinal, after CUDA_VISIBLE_DEVICES
  std::string name;            // "NVIDIA H200"
  std::string uuid;            // "GPU-xxxxxxxx-...", as nvidia-smi -L prints it
  std::string pci_bus_id;      // "0000:1b:00.0"
  double total_gib = 0;
  int driver_version = 0;      // cudaDriverGetVersion: 13000 = CUDA 13.0
  int runtime_version = 0;     // cudaRuntimeGetVersion
  int nccl_version = 0;        // ncclGetVersion: 22809 = 2.28.9
};
GpuInfo gpu_info(int device);
// "NVIDIA H200 (GPU-..., PCI 0000:1b:00.0, 139.8 GiB), CUDA driver 13.0, runtime 13.0, NCCL 2.28.9"
std::string describe(const GpuInfo& g);

// The text FTUNE_NCCL_CHECK throws for `result` (an ncclResult_t); exposed for tests.
std::string nccl_error_message(int result, const char* call, const char* file, int line);

class NcclCommunicator {
 public:
  using stream_t = cuda::stream_t;

  // Collective over `boot`'s ranks. Picks this rank's GPU (nccl_device_for) and makes it
  // current for the calling thread; checks on every rank that no two ranks of a host share
  // a GPU (else every rank throws the same message naming them); rank 0 creates the unique
  // id, boot.broadcast carries it; ncclCommInitRank. Any failure before NCCL's init is
  // agreed on by all ranks, so no rank is left waiting.
  static std::unique_ptr<NcclCommunicator> create(Communicator& boot);
  ~NcclCommunicator();  // ncclCommDestroy (ncclCommAbort while an exception unwinds)
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  const GpuInfo& gpu() const { return gpu_; }

  // All enqueue on `stream` (on this communicator's GPU) and return before completion.
  // In place: every rank ends with the element-wise sum over ranks.
  void all_reduce_sum(float* data, size_t n, stream_t stream);
  void all_reduce_sum_bf16(cuda::bf16* data, size_t n, stream_t stream);
  // send holds size()*count elements; rank r gets the sum of chunk r in recv[0, count).
  // Chunks are equal (NCCL's rule): pad the vector to a multiple of size(). In place when
  // recv == send + rank()*count.
  void reduce_scatter_sum(const float* send, float* recv, size_t count, stream_t stream);
  // Each rank sends `count` elements; recv (size()*count) holds rank r's at r*count. In place
  // when send == recv + rank()*count.
  void all_gather(const float* send, float* recv, size_t count, stream_t stream);
  // The same over raw bytes (ZeRO-3's layer blocks, whatever their element types).
  void all_gather_bytes(const void* send, void* recv, size_t bytes, stream_t stream);
  // In place: `bytes` at data on rank `root` reach every rank's data (ZeRO-3 full
  // fine-tuning's block gathers, one broadcast per owner).
  void broadcast_bytes(void* data, size_t bytes, int root, stream_t stream);

 private:
  NcclCommunicator(ncclComm* comm, int rank, int size, int device, GpuInfo gpu);
  ncclComm* comm_ = nullptr;
  int rank_ = 0, size_ = 1, device_ = -1;
  GpuInfo gpu_;
  int uncaught_at_create_ = 0;
};

// `ftune doctor`'s GPU lines for this rank (collective over `boot`): this rank's GPU and
// driver, then an NCCL all-reduce of `mib` MiB with time, algbw and busbw (nccl-tests:
// busbw = algbw * 2(n-1)/n). Empty when no rank sees a GPU.
struct NcclDoctorLine {
  bool ok;
  std::string text;
};
std::vector<NcclDoctorLine> nccl_doctor_checks(Communicator& boot, size_t mib);

#if !defined(FTUNE_HAVE_NCCL) || !FTUNE_HAVE_NCCL
// ---- Stubs for builds without NCCL: create() throws, nothing else is reachable.
inline bool nccl_available() { return false; }
inline GpuInfo gpu_info(int) { throw NcclError("gpu_info: this build has no NCCL/CUDA"); }
inline std::string describe(const GpuInfo& g) { return g.name; }
inline std::string nccl_error_message(int result, const char* call, const char* file, int line) {
  return "NCCL error " + std::to_string(result) + " in " + call + " at " + file + ":" +
         std::to_string(line);
}
inline std::unique_ptr<NcclCommunicator> NcclCommunicator::create(Communicator&) {
  throw NcclError("this ftune was built without NCCL: rebuild with CUDA and NCCL (NCCL_HOME) "
                  "for multi-GPU runs");
}
inline NcclCommunicator::~NcclCommunicator() = default;
inline void NcclCommunicator::all_reduce_sum(float*, size_t, stream_t) {}
inline void NcclCommunicator::all_reduce_sum_bf16(cuda::bf16*, size_t, stream_t) {}
inline void NcclCommunicator::reduce_scatter_sum(const float*, float*, size_t, stream_t) {}
inline void NcclCommunicator::all_gather(const float*, float*, size_t, stream_t) {}
inline void NcclCommunicator::all_gather_bytes(const void*, void*, size_t, stream_t) {}
inline void NcclCommunicator::broadcast_bytes(void*, size_t, int, stream_t) {}
inline std::vector<NcclDoctorLine> nccl_doctor_checks(Communicator&, size_t) { return {}; }
#endif

}  // namespace ftune
