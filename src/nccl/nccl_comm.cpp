// NcclCommunicator: GPU choice, unique-id exchange over the bootstrap Communicator, NCCL
// init and the collectives; plus the error reporting of nccl_check.hpp and gpu_info().
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <sstream>

#include "nccl_check.hpp"

namespace ftune {

// ---------------------------------------------------------------- errors
namespace nccl_detail {
namespace {
std::atomic<int> g_rank{-1}, g_device{-1};
}

void set_context(int rank, int device) {
  g_rank.store(rank);
  g_device.store(device);
}

std::string context() {
  const int r = g_rank.load(), d = g_device.load();
  if (r < 0 && d < 0) return "";
  std::string s = " [";
  if (r >= 0) s += "rank " + std::to_string(r);
  if (d >= 0) s += std::string(r >= 0 ? ", " : "") + "GPU " + std::to_string(d);
  return s + "]";
}

void fail(ncclResult_t r, const char* call, const char* file, int line) {
  throw NcclError(nccl_error_message(r, call, file, line));
}
void warn(ncclResult_t r, const char* call, const char* file, int line) {
  std::fprintf(stderr, "%s\n", nccl_error_message(r, call, file, line).c_str());
}
void cuda_fail(cudaError_t e, const char* call, const char* file, int line) {
  throw cuda::CudaError(std::string("CUDA error ") + cudaGetErrorName(e) + " (" +
                        cudaGetErrorString(e) + ") in " + call + " at " + file + ":" +
                        std::to_string(line) + context());
}
}  // namespace nccl_detail

bool nccl_available() { return true; }

std::string nccl_error_message(int result, const char* call, const char* file, int line) {
  const auto r = static_cast<ncclResult_t>(result);
  std::string m = std::string("NCCL error ") + std::to_string(result) + " (" +
                  ncclGetErrorString(r) + ") in " + call + " at " + file + ":" +
                  std::to_string(line) + nccl_detail::context();
  // NCCL keeps the detailed reason (which peer, which transport) apart from the code.
  if (const char* last = ncclGetLastError(nullptr); last && *last) m += ": " + std::string(last);
  if (r == ncclSystemError || r == ncclRemoteError)
    m += " (a peer failed or the network broke: see the other ranks' logs; NCCL_DEBUG=INFO "
         "shows the transports)";
  return m;
}

// ---------------------------------------------------------------- GPU info
GpuInfo gpu_info(int device) {
  cudaDeviceProp p{};
  FTUNE_NCCL_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  GpuInfo g;
  g.device = device;
  g.name = p.name;
  char buf[64];
  const auto* u = reinterpret_cast<const unsigned char*>(p.uuid.bytes);
  std::snprintf(buf, sizeof buf,
                "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0],
                u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13],
                u[14], u[15]);
  g.uuid = buf;
  std::snprintf(buf, sizeof buf, "%04x:%02x:%02x.0", p.pciDomainID, p.pciBusID, p.pciDeviceID);
  g.pci_bus_id = buf;
  g.total_gib = static_cast<double>(p.totalGlobalMem) / (1ull << 30);
  FTUNE_NCCL_CUDA_CHECK(cudaDriverGetVersion(&g.driver_version));
  FTUNE_NCCL_CUDA_CHECK(cudaRuntimeGetVersion(&g.runtime_version));
  FTUNE_NCCL_CHECK(ncclGetVersion(&g.nccl_version));
  return g;
}

std::string describe(const GpuInfo& g) {
  auto cuda_ver = [](int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); };
  const int n = g.nccl_version;  // NCCL >= 2.9: major*10000 + minor*100 + patch
  std::ostringstream s;
  s.precision(1);
  s << std::fixed << g.name << " (" << g.uuid << ", PCI " << g.pci_bus_id << ", " << g.total_gib
    << " GiB), CUDA driver " << cuda_ver(g.driver_version) << ", runtime "
    << cuda_ver(g.runtime_version) << ", NCCL " << n / 10000 << "." << n / 100 % 100 << "."
    << n % 100;
  return s.str();
}

// ---------------------------------------------------------------- create
namespace {

const char* env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

// One rank's GPU choice as exchanged before NCCL starts; a leading '!' carries an error.
struct Choice {
  std::string host, uuid, visible_env, error;
  int local_rank = 0, local_size = 1, device = -1, visible = 0;
};

std::string encode(const Choice& c) {
  if (!c.error.empty()) return "!" + c.error;
  return c.host + '\t' + std::to_string(c.local_rank) + '\t' + std::to_string(c.local_size) +
         '\t' + std::to_string(c.device) + '\t' + std::to_string(c.visible) + '\t' + c.uuid +
         '\t' + c.visible_env;
}

Choice decode(const std::string& s) {
  Choice c;
  if (!s.empty() && s[0] == '!') {
    c.error = s.substr(1);
    return c;
  }
  std::istringstream in(s);
  std::string f[7];
  for (auto& x : f) std::getline(in, x, '\t');
  c.host = f[0], c.uuid = f[5], c.visible_env = f[6];
  c.local_rank = std::atoi(f[1].c_str()), c.local_size = std::atoi(f[2].c_str());
  c.device = std::atoi(f[3].c_str()), c.visible = std::atoi(f[4].c_str());
  return c;
}

// Empty when every rank has a GPU of its own; otherwise one message (the same on every rank)
// naming the ranks that failed or collide and what to change.
std::string assignment_problem(const std::vector<Choice>& all) {
  std::ostringstream s;
  std::map<std::string, std::vector<int>> by_uuid;
  for (size_t r = 0; r < all.size(); ++r) {
    if (!all[r].error.empty())
      s << "\n  rank " << r << ": " << all[r].error;
    else
      by_uuid[all[r].uuid].push_back(static_cast<int>(r));
  }
  for (const auto& [uuid, ranks] : by_uuid) {
    if (ranks.size() < 2) continue;
    const Choice& c = all[ranks[0]];
    s << "\n  ranks";
    for (int r : ranks) s << ' ' << r;
    s << " on host " << c.host << " all chose " << uuid << " (device " << c.device << "): the host"
      << " runs " << c.local_size << " ranks but shows " << c.visible << " GPU(s) to each"
      << " (CUDA_VISIBLE_DEVICES=" << c.visible_env << "); start at most " << c.visible
      << " rank(s) per host (mpirun -npernode, srun --ntasks-per-node) or give each task its"
      << " own GPU (srun --gpus-per-task=1)";
  }
  const std::string body = s.str();
  return body.empty() ? "" : "NCCL setup: every rank needs a GPU of its own, but" + body;
}

// Rank 0's unique id (or why it has none), as broadcast through the bootstrap Communicator.
struct IdMessage {
  char ok = 0;
  char error[511] = {};
  ncclUniqueId id{};
};

}  // namespace

std::unique_ptr<NcclCommunicator> NcclCommunicator::create(Communicator& boot) {
  const WorldInfo& w = boot.world();
  nccl_detail::set_context(w.rank, -1);
  Choice mine;
  mine.host = w.host, mine.local_rank = w.local_rank, mine.local_size = w.local_size;
  mine.visible_env = env_or("CUDA_VISIBLE_DEVICES", "<unset>");
  GpuInfo gpu;
  try {
    mine.visible = cuda::cuda_device_count();
    mine.device = nccl_device_for(w.local_rank, mine.visible);
    if (mine.visible == 0)
      throw NcclError("no GPU visible on host " + w.host + " (CUDA_VISIBLE_DEVICES=" +
                      mine.visible_env + "; is the driver loaded, did the scheduler grant GPUs?)");
    FTUNE_NCCL_CUDA_CHECK(cudaSetDevice(mine.device));
    gpu = gpu_info(mine.device);
    mine.uuid = gpu.uuid;
  } catch (const std::exception& e) {
    mine.error = e.what();
  }
  // Agree before NCCL starts: a rank that threw alone would leave the others waiting in init.
  std::vector<Choice> all;
  for (const std::string& s : boot.all_gather_strings(encode(mine))) all.push_back(decode(s));
  if (const std::string p = assignment_problem(all); !p.empty()) throw NcclError(p);
  nccl_detail::set_context(w.rank, mine.device);
  cuda::set_error_rank(w.rank);

  IdMessage msg;
  if (w.rank == 0) {
    const ncclResult_t r = ncclGetUniqueId(&msg.id);
    msg.ok = r == ncclSuccess;
    if (!msg.ok)  // every rank must hear about it, not only rank 0
      std::snprintf(msg.error, sizeof msg.error, "%s",
                    nccl_error_message(r, "ncclGetUniqueId(&id)", __FILE__, __LINE__).c_str());
  }
  boot.broadcast(std::span<std::byte>(reinterpret_cast<std::byte*>(&msg), sizeof msg), 0);
  if (!msg.ok) throw NcclError(std::string("rank 0 could not create NCCL's unique id: ") + msg.error);

  ncclComm_t comm = nullptr;
  FTUNE_NCCL_CHECK(ncclCommInitRank(&comm, w.size, msg.id, w.rank));
  return std::unique_ptr<NcclCommunicator>(
      new NcclCommunicator(comm, w.rank, w.size, mine.device, std::move(gpu)));
}

NcclCommunicator::NcclCommunicator(ncclComm* comm, int rank, int size, int device, GpuInfo gpu)
    : comm_(comm), rank_(rank), size_(size), device_(device), gpu_(std::move(gpu)),
      uncaught_at_create_(std::uncaught_exceptions()) {}

NcclCommunicator::~NcclCommunicator() {
  if (!comm_) return;
  // While an exception unwinds, peers may never reach their matching collective: abort
  // (local, cancels pending work) instead of destroy (which may wait for them).
  if (std::uncaught_exceptions() > uncaught_at_create_)
    FTUNE_NCCL_WARN(ncclCommAbort(comm_));
  else
    FTUNE_NCCL_WARN(ncclCommDestroy(comm_));
}

// ---------------------------------------------------------------- collectives
void NcclCommunicator::all_reduce_sum(float* data, size_t n, stream_t stream) {
  if (n == 0) return;
  FTUNE_NCCL_CHECK(ncclAllReduce(data, data, n, ncclFloat32, ncclSum, comm_, stream));
}

void NcclCommunicator::all_reduce_sum_bf16(cuda::bf16* data, size_t n, stream_t stream) {
  if (n == 0) return;
  FTUNE_NCCL_CHECK(ncclAllReduce(data, data, n, ncclBfloat16, ncclSum, comm_, stream));
}

void NcclCommunicator::reduce_scatter_sum(const float* send, float* recv, size_t count,
                                          stream_t stream) {
  if (count == 0) return;
  FTUNE_NCCL_CHECK(ncclReduceScatter(send, recv, count, ncclFloat32, ncclSum, comm_, stream));
}

void NcclCommunicator::all_gather(const float* send, float* recv, size_t count, stream_t stream) {
  if (count == 0) return;
  FTUNE_NCCL_CHECK(ncclAllGather(send, recv, count, ncclFloat32, comm_, stream));
}

void NcclCommunicator::all_gather_bytes(const void* send, void* recv, size_t bytes,
                                        stream_t stream) {
  if (bytes == 0) return;
  FTUNE_NCCL_CHECK(ncclAllGather(send, recv, bytes, ncclUint8, comm_, stream));
}

void NcclCommunicator::broadcast_bytes(void* data, size_t bytes, int root, stream_t stream) {
  if (bytes == 0) return;
  FTUNE_NCCL_CHECK(ncclBroadcast(data, data, bytes, ncclUint8, root, comm_, stream));
}

}  // namespace ftune
