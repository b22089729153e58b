// NcclCommunicator, run alone (a 1-rank NCCL communicator: the sums are identities, but the
// unique-id path, GPU choice and every call still run) and under `mpirun -np N` (ctest's
// test_mpi_cuda_nccl): exact sums of per-rank data in fp32 and bf16, reduce_scatter ->
// all_gather round trip (also in place), GPU = local rank with no GPU shared, a second
// communicator, the doctor's NCCL lines with their bandwidth, and error messages.
// When ranks of one host would share a GPU (more ranks than GPUs), only the test of that
// error runs. Every skip is agreed over all ranks, so no rank waits in a collective alone.
#include <doctest/doctest.h>

#include <algorithm>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "ftune/dist/communicator.hpp"
#include "ftune/dist/nccl.hpp"
#include "ftune/kernels/cuda_device.hpp"

namespace cu = ftune::cuda;
using namespace ftune;

namespace {

// One bootstrap per process: MPI can be initialised only once.
Communicator& boot() {
  static std::unique_ptr<Communicator> c = bootstrap();
  return *c;
}

enum class Setup { no_gpu, no_nccl, shared_gpu, ok };

// Agreed over all ranks (the worst case wins).
Setup setup() {
  static const Setup s = [] {
    Setup mine = Setup::ok;
    const int n = cu::cuda_device_count();
    if (n == 0) {
      mine = Setup::no_gpu;
    } else if (!nccl_available()) {
      mine = Setup::no_nccl;
    }
    std::string uuid;
    if (mine == Setup::ok) uuid = gpu_info(nccl_device_for(boot().world().local_rank, n)).uuid;
    const auto all = boot().all_gather_strings(std::to_string(static_cast<int>(mine)) + uuid);
    Setup worst = Setup::ok;
    std::set<std::string> uuids;
    for (const std::string& a : all) {
      worst = std::min(worst, static_cast<Setup>(a[0] - '0'));
      if (!uuids.insert(a.substr(1)).second) worst = std::min(worst, Setup::shared_gpu);
    }
    return worst;
  }();
  return s;
}

#define REQUIRE_NCCL()                                                       \
  if (setup() == Setup::no_gpu) {                                            \
    MESSAGE("skipped: no GPU");                                              \
    return;                                                                  \
  } else if (setup() == Setup::no_nccl) {                                    \
    MESSAGE("skipped: this build has no NCCL");                              \
    return;                                                                  \
  } else if (setup() == Setup::shared_gpu) {                                 \
    MESSAGE("skipped: ranks of one host would share a GPU (see the test of that error)"); \
    return;                                                                  \
  }

// Shared by the cases (creating a communicator costs ~0.1-1 s); made after boot(), so it
// is destroyed first.
NcclCommunicator& nccl() {
  static std::unique_ptr<NcclCommunicator> c = NcclCommunicator::create(boot());
  return *c;
}

// Rank r's data: multiples of `step` in [-range, range]*step, so sums over ranks are exact
// in any order (whatever NCCL's ring/tree picks) and the expected value is unambiguous.
std::vector<float> rank_data(size_t n, int r, int range, float step) {
  std::mt19937 g(1234 + 77 * r);
  std::uniform_int_distribution<int> u(-range, range);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(u(g)) * step;
  return v;
}

std::vector<float> sum_over_ranks(size_t n, int size, int range, float step) {
  std::vector<float> acc(n, 0.f);
  for (int r = 0; r < size; ++r) {
    const auto x = rank_data(n, r, range, step);
    for (size_t i = 0; i < n; ++i) acc[i] += x[i];
  }
  return acc;
}

size_t mismatches(const std::vector<float>& a, const std::vector<float>& b) {
  size_t bad = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) bad += a[i] != b[i];
  return bad;
}

}  // namespace

TEST_CASE("nccl: device choice is local_rank modulo the visible devices") {
  CHECK(nccl_device_for(0, 1) == 0);
  CHECK(nccl_device_for(3, 1) == 0);  // Slurm --gpus-per-task=1: one visible device per task
  CHECK(nccl_device_for(3, 4) == 3);
  CHECK(nccl_device_for(5, 4) == 1);
  CHECK(nccl_device_for(0, 0) == -1);
}

TEST_CASE("nccl: GPU = local rank, one GPU per rank, ranks as bootstrapped") {
  REQUIRE_NCCL();
  const WorldInfo& w = boot().world();
  NcclCommunicator& nc = nccl();
  CHECK(nc.rank() == w.rank);
  CHECK(nc.size() == w.size);
  CHECK(nc.device() == w.local_rank % cu::cuda_device_count());
  CHECK(nc.gpu().device == nc.device());
  const auto uuids = boot().all_gather_strings(nc.gpu().uuid);
  CHECK(std::set<std::string>(uuids.begin(), uuids.end()).size() == uuids.size());
  MESSAGE("rank " << w.rank << "/" << w.size << " (local " << w.local_rank << "/"
                  << w.local_size << "): GPU " << nc.device() << " = " << describe(nc.gpu()));
}

TEST_CASE("nccl: all_reduce_sum gives the exact sum of every rank's data") {
  REQUIRE_NCCL();
  NcclCommunicator& nc = nccl();
  cu::Stream stream;
  for (size_t n : {size_t{1}, size_t{1000}, (size_t{1} << 20) + 3}) {
    CAPTURE(n);
    cu::DeviceBuffer d = cu::to_device(rank_data(n, nc.rank(), 1000, 0.125f));
    nc.all_reduce_sum(d.as<float>(), n, stream.get());
    stream.synchronize();
    CHECK(mismatches(cu::to_host<float>(d, n), sum_over_ranks(n, nc.size(), 1000, 0.125f)) == 0);
  }
}

TEST_CASE("nccl: bf16 all_reduce_sum is exact on small integers") {
  REQUIRE_NCCL();
  NcclCommunicator& nc = nccl();
  cu::Stream stream;
  const size_t n = 100003;
  const auto x = rank_data(n, nc.rank(), 8, 1.f);  // |sum| <= 8 * ranks: exact in bf16
  std::vector<cu::bf16> xb(n);
  for (size_t i = 0; i < n; ++i) xb[i] = cu::to_bf16(x[i]);
  cu::DeviceBuffer d = cu::to_device(xb);
  nc.all_reduce_sum_bf16(d.as<cu::bf16>(), n, stream.get());
  stream.synchronize();
  const auto got = cu::to_host<cu::bf16>(d, n);
  std::vector<float> gotf(n);
  for (size_t i = 0; i < n; ++i) gotf[i] = cu::to_float(got[i]);
  CHECK(mismatches(gotf, sum_over_ranks(n, nc.size(), 8, 1.f)) == 0);
}

TEST_CASE("nccl: reduce_scatter_sum then all_gather gives the all-reduce") {
  REQUIRE_NCCL();
  NcclCommunicator& nc = nccl();
  cu::Stream stream;
  const int p = nc.size(), r = nc.rank();
  const size_t count = 4097;  // per rank; odd, so no chunk is 16-byte aligned but the first
  const size_t n = count * p;
  const auto want = sum_over_ranks(n, p, 1000, 0.25f);
  cu::DeviceBuffer send = cu::to_device(rank_data(n, r, 1000, 0.25f));
  cu::DeviceBuffer shard(count * sizeof(float)), full(n * sizeof(float));
  nc.reduce_scatter_sum(send.as<float>(), shard.as<float>(), count, stream.get());
  stream.synchronize();
  const std::vector<float> mine(want.begin() + r * count, want.begin() + (r + 1) * count);
  CHECK(mismatches(cu::to_host<float>(shard, count), mine) == 0);

  nc.all_gather(shard.as<float>(), full.as<float>(), count, stream.get());
  stream.synchronize();
  CHECK(mismatches(cu::to_host<float>(full, n), want) == 0);

  // In place, as ZeRO uses them: the shard lives inside the full vector.
  SUBCASE("in place") {
    cu::DeviceBuffer v = cu::to_device(rank_data(n, r, 1000, 0.25f));
    float* own = v.as<float>() + r * count;
    nc.reduce_scatter_sum(v.as<float>(), own, count, stream.get());
    nc.all_gather(own, v.as<float>(), count, stream.get());
    stream.synchronize();
    CHECK(mismatches(cu::to_host<float>(v, n), want) == 0);
  }
}

TEST_CASE("nccl: a second communicator gets a fresh unique id and works beside the first") {
  REQUIRE_NCCL();
  NcclCommunicator& first = nccl();
  cu::Stream stream;
  {
    auto second = NcclCommunicator::create(boot());
    CHECK(second->device() == first.device());
    cu::DeviceBuffer d = cu::to_device(std::vector<float>(33, 1.f));
    second->all_reduce_sum(d.as<float>(), 33, stream.get());
    stream.synchronize();
    CHECK(cu::to_host<float>(d, 33) == std::vector<float>(33, static_cast<float>(second->size())));
  }  // destroyed here; the first must still work
  cu::DeviceBuffer d = cu::to_device(std::vector<float>(5, 2.f));
  first.all_reduce_sum(d.as<float>(), 5, stream.get());
  stream.synchronize();
  CHECK(cu::to_host<float>(d, 5) == std::vector<float>(5, 2.f * first.size()));
}

TEST_CASE("nccl: doctor lines, with the all-reduce bandwidth") {
  REQUIRE_NCCL();
  const size_t mib = 1024;  // what `ftune doctor` uses by default
  const auto lines = nccl_doctor_checks(boot(), mib);
  REQUIRE(lines.size() == 2);
  for (const auto& l : lines) {
    CHECK_MESSAGE(l.ok, l.text);
    MESSAGE("rank " << boot().rank() << ": " << l.text);
  }
  CHECK(lines[1].text.find(boot().size() > 1 ? "busbw" : "bandwidth needs") != std::string::npos);
}

TEST_CASE("nccl: ranks that would share a GPU all get one clear error") {
  if (setup() != Setup::shared_gpu) {
    MESSAGE("not applicable: every rank has a GPU of its own (or there is none)");
    return;
  }
  std::string what;
  try {
    NcclCommunicator::create(boot());
  } catch (const NcclError& e) {
    what = e.what();
  }
  MESSAGE(what);
  CHECK(what.find("every rank needs a GPU of its own") != std::string::npos);
  CHECK(what.find("--gpus-per-task=1") != std::string::npos);
  CHECK(what.find("CUDA_VISIBLE_DEVICES=") != std::string::npos);
}

TEST_CASE("nccl: error messages name the call, file, line and rank") {
  REQUIRE_NCCL();
  (void)nccl();  // rank and GPU are known from here on
  const std::string m = nccl_error_message(4 /*ncclInvalidArgument*/, "ncclAllReduce(x)", "f.cpp", 12);
  CHECK(m.find("ncclAllReduce(x)") != std::string::npos);
  CHECK(m.find("f.cpp:12") != std::string::npos);
  CHECK(m.find("invalid argument") != std::string::npos);
  CHECK(m.find("[rank " + std::to_string(boot().rank()) + ", GPU ") != std::string::npos);
}
