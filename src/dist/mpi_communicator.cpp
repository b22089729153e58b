// MPI communicator (mpirun / srun with PMI). Sums use a fixed reduction order: element i is
// summed by the rank that owns it (shard_range) as ((x_0 + x_1) + x_2) + ... over ranks in
// rank order, then copied to everyone. So every rank gets the same bits, the result never
// depends on timing or on MPI's internal algorithm choice, and it equals what the TCP
// communicator computes. Big vectors go in bounded rounds (memory and int counts stay small).
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <stdexcept>

#include "dist_internal.hpp"

namespace ftune::dist {
namespace {

int g_world_rank = -1;  // for error messages only

[[noreturn]] void throw_mpi_error(const char* call, int rc, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw std::runtime_error(std::string("MPI call ") + call + " failed at " + file + ":" +
                           std::to_string(line) + " on rank " + std::to_string(g_world_rank) +
                           ": " + text);
}

// Reports the failing call, where it is, and on which rank (errors return instead of
// aborting: MPI_ERRORS_RETURN is set on our communicator).
#define FTUNE_MPI_CHECK(call)                                          \
  do {                                                                 \
    const int ftune_mpi_rc_ = (call);                                  \
    if (ftune_mpi_rc_ != MPI_SUCCESS)                                  \
      throw_mpi_error(#call, ftune_mpi_rc_, __FILE__, __LINE__);       \
  } while (0)

// Initialises MPI once per process and finalises it when the last communicator using it is
// gone (only if we initialised it: a host program may own MPI).
struct MpiRuntime {
  bool we_initialised = false;
  MpiRuntime() {
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (finalized)
      throw std::runtime_error("MPI was already finalised in this process: create one "
                               "communicator (bootstrap()) per process and keep it alive");
    if (!inited) {
      int provided = 0;
      // SERIALIZED: the engine may call collectives from a thread other than main, one at a time.
      const int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
      if (rc != MPI_SUCCESS) throw std::runtime_error("MPI_Init_thread failed (launched by mpirun/srun?)");
      we_initialised = true;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &g_world_rank);
  }
  ~MpiRuntime() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (we_initialised && !finalized) MPI_Finalize();
  }
};

std::shared_ptr<MpiRuntime> acquire_runtime() {
  static std::weak_ptr<MpiRuntime> current;
  if (auto rt = current.lock()) return rt;
  auto rt = std::make_shared<MpiRuntime>();
  current = rt;
  return rt;
}

template <class T> MPI_Datatype mpi_type();
template <> MPI_Datatype mpi_type<float>() { return MPI_FLOAT; }
template <> MPI_Datatype mpi_type<double>() { return MPI_DOUBLE; }

// Elements per rank per round: the receive buffer of a round is ~16 MiB whatever the size.
template <class T>
size_t round_elems(int size) {
  return std::max<size_t>(4096, (size_t{16} << 20) / sizeof(T) / static_cast<size_t>(size));
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(std::shared_ptr<MpiRuntime> rt, int expected_size, const std::string& from)
      : rt_(std::move(rt)) {
    // Our own communicator, so a host program's MPI traffic never mixes with ours.
    FTUNE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm_));
    FTUNE_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    FTUNE_MPI_CHECK(MPI_Comm_rank(comm_, &world_.rank));
    FTUNE_MPI_CHECK(MPI_Comm_size(comm_, &world_.size));
    if (expected_size > 1 && world_.size == 1) {
      MPI_Comm_free(&comm_);
      throw std::runtime_error(
          "the launcher started " + std::to_string(expected_size) + " ranks (" + from + "=" +
          std::to_string(expected_size) + ") but MPI sees a single rank: this MPI library cannot "
          "use the launcher's PMI. Use mpirun, srun --mpi=pmix (check `srun --mpi=list`), or "
          "set FTUNE_LAUNCHER=env with MASTER_ADDR/MASTER_PORT for the TCP rendezvous");
    }
    MPI_Comm local;
    FTUNE_MPI_CHECK(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, world_.rank, MPI_INFO_NULL, &local));
    MPI_Comm_rank(local, &world_.local_rank);
    MPI_Comm_size(local, &world_.local_size);
    MPI_Comm_free(&local);
    world_.launcher = "mpi";
    world_.host = this_host_name();
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }

  const WorldInfo& world() const override { return world_; }

  void all_reduce_sum(std::span<float> data) override { all_reduce(data, "all_reduce_sum(float)"); }
  void all_reduce_sum(std::span<double> data) override { all_reduce(data, "all_reduce_sum(double)"); }

  void reduce_scatter_sum(std::span<const float> data, std::span<float> shard) override {
    const ShardRange mine = shard_range(data.size(), rank(), size());
    if (shard.size() != mine.size())
      throw std::invalid_argument("reduce_scatter_sum: shard holds " + std::to_string(shard.size()) +
                                  " elements, rank's shard_range has " + std::to_string(mine.size()));
    check_same_size(data.size(), "reduce_scatter_sum");
    run_rounds<float>(data.size(), [&](size_t k, size_t c, Buffers<float>& b) {
      reduce_round<float>(data, k, c, b);
      std::copy(b.sum.begin(), b.sum.end(), shard.begin() + static_cast<ptrdiff_t>(k * c));
    });
  }

  void all_gather(std::span<const float> shard, std::span<float> full) override {
    const ShardRange mine = shard_range(full.size(), rank(), size());
    if (shard.size() != mine.size())
      throw std::invalid_argument("all_gather: shard holds " + std::to_string(shard.size()) +
                                  " elements, rank's shard_range has " + std::to_string(mine.size()));
    check_same_size(full.size(), "all_gather");
    const std::vector<float> own(shard.begin(), shard.end());  // shard may alias full
    run_rounds<float>(full.size(), [&](size_t k, size_t c, Buffers<float>& b) {
      const size_t lo = std::min(own.size(), k * c), hi = std::min(own.size(), (k + 1) * c);
      gather_round<float>(std::span<const float>(own.data() + lo, hi - lo), full, k, c, b);
    });
  }

  void broadcast(std::span<std::byte> data, int root) override {
    if (root < 0 || root >= size()) throw std::invalid_argument("broadcast: root " + std::to_string(root) + " out of range");
    check_same_size(data.size(), "broadcast");
    const size_t step = size_t{1} << 30;
    for (size_t off = 0; off < data.size(); off += step) {
      const int n = static_cast<int>(std::min(step, data.size() - off));
      FTUNE_MPI_CHECK(MPI_Bcast(data.data() + off, n, MPI_BYTE, root, comm_));
    }
  }

  std::vector<std::string> all_gather_strings(const std::string& mine) override {
    const int n = size();
    unsigned long long len = mine.size();
    std::vector<unsigned long long> lens(n);
    FTUNE_MPI_CHECK(MPI_Allgather(&len, 1, MPI_UNSIGNED_LONG_LONG, lens.data(), 1, MPI_UNSIGNED_LONG_LONG, comm_));
    std::vector<int> counts(n), displs(n);
    unsigned long long total = 0;
    for (int r = 0; r < n; ++r) {
      if (total + lens[r] > INT_MAX) throw std::runtime_error("all_gather_strings: more than 2 GiB in total");
      counts[r] = static_cast<int>(lens[r]);
      displs[r] = static_cast<int>(total);
      total += lens[r];
    }
    std::vector<char> all(std::max<unsigned long long>(total, 1));
    FTUNE_MPI_CHECK(MPI_Allgatherv(mine.data(), counts[rank()], MPI_CHAR, all.data(), counts.data(),
                                   displs.data(), MPI_CHAR, comm_));
    std::vector<std::string> out(n);
    for (int r = 0; r < n; ++r) out[r].assign(all.data() + displs[r], counts[r]);
    return out;
  }

  void barrier() override { FTUNE_MPI_CHECK(MPI_Barrier(comm_)); }

  [[noreturn]] void abort(int code) override {
    std::cout.flush();
    std::cerr.flush();
    std::fflush(nullptr);
    MPI_Abort(comm_, code != 0 ? code : 1);
    _Exit(code != 0 ? code : 1);  // MPI_Abort does not return; this keeps [[noreturn]] honest
  }

 private:
  // A size mismatch would otherwise deadlock or corrupt memory: every rank checks the
  // min/max of n (one tiny allreduce), so all ranks throw together.
  void check_same_size(size_t n, const char* op) {
    long long v[2] = {static_cast<long long>(n), -static_cast<long long>(n)};
    long long mx[2];
    FTUNE_MPI_CHECK(MPI_Allreduce(v, mx, 2, MPI_LONG_LONG, MPI_MAX, comm_));
    if (mx[0] != v[0] || mx[1] != v[1])
      throw std::runtime_error(std::string(op) + " called with different sizes on different ranks (from " +
                               std::to_string(-mx[1]) + " to " + std::to_string(mx[0]) +
                               " elements; " + std::to_string(n) + " on rank " + std::to_string(rank()) + ")");
  }

  template <class T>
  void all_reduce(std::span<T> data, const char* op) {
    check_same_size(data.size(), op);
    run_rounds<T>(data.size(), [&](size_t k, size_t c, Buffers<T>& b) {
      reduce_round<T>(std::span<const T>(data.data(), data.size()), k, c, b);
      gather_round<T>(b.sum, data, k, c, b);
    });
  }

  // Scratch of one collective call, reused by its rounds.
  template <class T>
  struct Buffers {
    std::vector<T> send, recv, sum;
  };

  // Calls round(k, c, buffers) for k = 0.. until every shard is covered. Each rank's shard is
  // split into pieces of c elements; round k handles piece k of every shard.
  template <class T, class F>
  void run_rounds(size_t n, F&& round) {
    const size_t largest = shard_range(n, 0, size()).size();
    if (largest == 0) return;  // n == 0 (the same on every rank: checked before)
    const size_t c = std::min(round_elems<T>(size()), largest);
    Buffers<T> buf;
    buf.send.resize(c * size());
    buf.recv.resize(c * size());
    for (size_t k = 0; k * c < largest; ++k) round(k, c, buf);
  }

  // Piece k of rank q's shard of an n-vector: [begin, end).
  ShardRange piece(size_t n, int q, size_t k, size_t c) const {
    const ShardRange s = shard_range(n, q, size());
    const size_t b = std::min(s.end, s.begin + k * c), e = std::min(s.end, s.begin + (k + 1) * c);
    return {b, e};
  }

  // Sends piece k of every rank's shard to its owner; `sum` = this rank's piece summed over
  // ranks in rank order.
  template <class T>
  void reduce_round(std::span<const T> data, size_t k, size_t c, Buffers<T>& b) {
    const int n = size();
    std::vector<T>&send = b.send, &recv = b.recv, &sum = b.sum;
    std::vector<int> scount(n), sdispl(n), rcount(n), rdispl(n);
    const ShardRange my = piece(data.size(), rank(), k, c);
    for (int q = 0; q < n; ++q) {
      const ShardRange p = piece(data.size(), q, k, c);
      std::copy(data.begin() + p.begin, data.begin() + p.end, send.begin() + q * c);
      scount[q] = static_cast<int>(p.size());
      sdispl[q] = rdispl[q] = static_cast<int>(q * c);
      rcount[q] = static_cast<int>(my.size());
    }
    FTUNE_MPI_CHECK(MPI_Alltoallv(send.data(), scount.data(), sdispl.data(), mpi_type<T>(), recv.data(),
                                  rcount.data(), rdispl.data(), mpi_type<T>(), comm_));
    sum.assign(recv.begin(), recv.begin() + my.size());
    for (int q = 1; q < n; ++q) {
      const T* x = recv.data() + q * c;
      for (size_t i = 0; i < my.size(); ++i) sum[i] += x[i];
    }
  }

  // Every rank contributes `mine` (piece k of its shard); everyone writes all pieces into full.
  template <class T>
  void gather_round(std::span<const T> mine, std::span<T> full, size_t k, size_t c, Buffers<T>& b) {
    const int n = size();
    std::vector<T>& recv = b.recv;
    std::vector<int> count(n), displ(n);
    for (int q = 0; q < n; ++q) {
      count[q] = static_cast<int>(piece(full.size(), q, k, c).size());
      displ[q] = static_cast<int>(q * c);
    }
    FTUNE_MPI_CHECK(MPI_Allgatherv(mine.data(), static_cast<int>(mine.size()), mpi_type<T>(), recv.data(),
                                   count.data(), displ.data(), mpi_type<T>(), comm_));
    for (int q = 0; q < n; ++q) {
      const ShardRange p = piece(full.size(), q, k, c);
      std::copy(recv.begin() + q * c, recv.begin() + q * c + p.size(), full.begin() + p.begin);
    }
  }

  std::shared_ptr<MpiRuntime> rt_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  WorldInfo world_;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(int expected_size, const std::string& from) {
  return std::make_unique<MpiCommunicator>(acquire_runtime(), expected_size, from);
}

}  // namespace ftune::dist
