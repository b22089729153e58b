// `ftune doctor`'s GPU section: which GPU and driver each rank got, and an NCCL all-reduce
// timed the nccl-tests way, so its busbw can be compared with nccl-tests and with the CPU
// communicator's figure printed just above it.
#include <algorithm>
#include <iomanip>
#include <sstream>

#include "nccl_check.hpp"

namespace ftune {
namespace {

// Fills `n` floats with 1 (device memory has no float memset; chunks bound host memory).
void fill_ones(cuda::DeviceBuffer& buf, size_t n) {
  const size_t chunk = std::min<size_t>(n, size_t{16} << 20);
  const std::vector<float> ones(chunk, 1.0f);
  for (size_t i = 0; i < n; i += chunk) {
    const size_t k = std::min(chunk, n - i);
    buf.upload(ones.data(), k * sizeof(float), i * sizeof(float));
  }
}

NcclDoctorLine bench(NcclCommunicator& nc, Communicator& boot, size_t mib) {
  const size_t n = std::max<size_t>(1, mib * (size_t{1} << 20) / sizeof(float));
  const int warmup = 5, iters = 20;  // nccl-tests' defaults
  cuda::DeviceBuffer buf;
  std::string error;
  try {
    buf = cuda::DeviceBuffer(n * sizeof(float));
    fill_ones(buf, n);
  } catch (const std::exception& e) {
    error = e.what();  // e.g. out of memory on one GPU
  }
  // Agree before the first collective: a rank that failed alone would hang the others.
  for (const std::string& e : boot.all_gather_strings(error))
    if (!e.empty()) return {false, "nccl all-reduce of " + std::to_string(mib) + " MiB: " + e};
  cuda::Stream stream;
  // One checked all-reduce first: every element must read size().
  nc.all_reduce_sum(buf.as<float>(), n, stream.get());
  stream.synchronize();
  bool ok = true;
  for (size_t i : {size_t{0}, n / 2, n - 1}) {
    float v = 0;
    buf.download(&v, sizeof v, i * sizeof(float));
    ok = ok && v == static_cast<float>(nc.size());
  }
  if (nc.size() == 1)  // in place over one rank NCCL copies nothing: a time would mean nothing
    return {ok, "nccl all-reduce of " + std::to_string(mib) + " MiB over 1 GPU rank: correct; "
                "bandwidth needs 2 or more ranks" + (ok ? "" : " -- WRONG RESULT")};
  for (int i = 0; i < warmup; ++i) nc.all_reduce_sum(buf.as<float>(), n, stream.get());
  stream.synchronize();
  boot.barrier();  // start together, so no rank's time includes waiting for a late peer
  cuda::Event t0, t1;
  t0.record(stream.get());
  for (int i = 0; i < iters; ++i) nc.all_reduce_sum(buf.as<float>(), n, stream.get());
  t1.record(stream.get());
  t1.synchronize();
  const double s = t1.elapsed_ms_since(t0) / 1e3 / iters;
  const double algbw = static_cast<double>(n * sizeof(float)) / s / 1e9;
  const double busbw = algbw * 2.0 * (nc.size() - 1) / nc.size();
  std::ostringstream t;
  t << std::fixed << std::setprecision(2) << "nccl all-reduce of " << mib << " MiB over "
    << nc.size() << " GPU rank(s): " << s * 1e3 << " ms, algbw " << algbw << " GB/s, busbw "
    << busbw << " GB/s (fp32, mean of " << iters << " after " << warmup << " warm-ups)"
    << (ok ? "" : " -- WRONG RESULT");
  return {ok, t.str()};
}

}  // namespace

std::vector<NcclDoctorLine> nccl_doctor_checks(Communicator& boot, size_t mib) {
  // Decide together: a rank that skipped NCCL alone would leave the others waiting.
  const auto counts = boot.all_gather_strings(std::to_string(cuda::cuda_device_count()));
  std::string without;
  for (size_t r = 0; r < counts.size(); ++r)
    if (counts[r] == "0") without.append(" ").append(std::to_string(r));
  if (std::count(counts.begin(), counts.end(), "0") == static_cast<long>(counts.size()))
    return {};  // a CPU-only job: nothing to check here
  if (!without.empty())
    return {{false, "nccl: rank(s)" + without + " see no GPU while the others do"}};
  std::vector<NcclDoctorLine> out;
  try {
    auto nc = NcclCommunicator::create(boot);
    out.push_back({true, "gpu " + std::to_string(nc->device()) + ": " + describe(nc->gpu())});
    out.push_back(bench(*nc, boot, mib));
  } catch (const std::exception& e) {
    out.push_back({false, std::string("nccl: ") + e.what()});
  }
  return out;
}

}  // namespace ftune
