// The MPI communicator, run by ctest under `mpirun -np 2`: every collective, exact sums with
// the documented rank-order reduction, the same bits on every rank, and mismatch errors.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "ftune/dist/communicator.hpp"
#include "test_util.hpp"

using namespace ftune;

namespace {

// One communicator for the whole run: MPI can be initialised only once per process.
Communicator& comm() {
  static std::unique_ptr<Communicator> c = bootstrap();
  return *c;
}

// Rank r's test vector: very different magnitudes, so the summation order shows in the bits.
template <class T>
std::vector<T> rank_values(size_t n, int r) {
  std::mt19937_64 g(1000 + r);
  std::uniform_real_distribution<double> u(-1, 1);
  std::uniform_int_distribution<int> e(-6, 6);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(std::ldexp(u(g), 3 * e(g)));
  return v;
}

// The documented result: ((x_0 + x_1) + x_2) + ... in rank order.
template <class T>
std::vector<T> rank_order_sum(size_t n, int size) {
  std::vector<T> acc = rank_values<T>(n, 0);
  for (int r = 1; r < size; ++r) {
    const std::vector<T> x = rank_values<T>(n, r);
    for (size_t i = 0; i < n; ++i) acc[i] += x[i];
  }
  return acc;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// True when every rank holds exactly these bytes.
template <class T>
bool same_on_all_ranks(const std::vector<T>& v) {
  const std::string mine(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
  for (const std::string& s : comm().all_gather_strings(mine))
    if (s != mine) return false;
  return true;
}

}  // namespace

TEST_CASE("mpi: world, local rank and size") {
  const WorldInfo& w = comm().world();
  CHECK(w.launcher == "mpi");
  CHECK(w.size >= 2);  // run by ctest with -np 2
  CHECK(w.rank >= 0);
  CHECK(w.rank < w.size);
  CHECK(w.local_size == w.size);  // one host
  CHECK(w.local_rank == w.rank);
  CHECK_FALSE(w.host.empty());
}

TEST_CASE("mpi: all_reduce_sum is the rank-order sum, bit-identical on every rank") {
  const int me = comm().rank(), n = comm().size();
  // 5M floats: more than one 16 MiB round; 0 and 1 elements are edge cases.
  for (size_t len : {size_t{0}, size_t{1}, size_t{3}, size_t{1000}, size_t{5'000'003}}) {
    CAPTURE(len);
    std::vector<float> f = rank_values<float>(len, me);
    comm().all_reduce_sum(f);
    CHECK(same_bits(f, rank_order_sum<float>(len, n)));
    CHECK(same_on_all_ranks(f));
  }
  std::vector<double> d = rank_values<double>(2'100'001, me);
  comm().all_reduce_sum(d);
  CHECK(same_bits(d, rank_order_sum<double>(d.size(), n)));
  CHECK(same_on_all_ranks(d));
  // Small integers: exact whatever the order.
  std::vector<float> ones(17, 1.f);
  comm().all_reduce_sum(ones);
  CHECK(ones[16] == static_cast<float>(n));
}

TEST_CASE("mpi: reduce_scatter_sum slices the all-reduce; all_gather restores it") {
  const int me = comm().rank(), n = comm().size();
  for (size_t len : {size_t{1}, size_t{5}, size_t{4'200'001}}) {
    CAPTURE(len);
    const std::vector<float> x = rank_values<float>(len, me);
    const ShardRange s = shard_range(len, me, n);
    std::vector<float> shard(s.size()), full(len, -1.f);
    comm().reduce_scatter_sum(x, shard);
    const std::vector<float> sum = rank_order_sum<float>(len, n);
    CHECK(same_bits(shard, std::vector<float>(sum.begin() + s.begin, sum.begin() + s.end)));
    comm().all_gather(shard, full);
    CHECK(same_bits(full, sum));
    // The shard may live inside the full vector (in-place gather).
    std::vector<float> inplace(len, 0.f);
    std::copy(shard.begin(), shard.end(), inplace.begin() + s.begin);
    comm().all_gather(std::span<const float>(inplace.data() + s.begin, s.size()), inplace);
    CHECK(same_bits(inplace, sum));
  }
  std::vector<float> wrong(3);
  CHECK_THROWS_AS(comm().reduce_scatter_sum(std::vector<float>(100), wrong), std::invalid_argument);
}

TEST_CASE("mpi: broadcast, strings, barrier") {
  const int me = comm().rank(), n = comm().size();
  for (int root = 0; root < n; ++root) {
    for (size_t len : {size_t{0}, size_t{13}, size_t{3'000'000}}) {
      std::vector<std::byte> b(len, std::byte(me));
      if (me == root)
        for (size_t i = 0; i < len; ++i) b[i] = std::byte((i * 7 + root) & 0xff);
      comm().broadcast(b, root);
      bool ok = true;
      for (size_t i = 0; i < len; ++i) ok = ok && b[i] == std::byte((i * 7 + root) & 0xff);
      CHECK(ok);
    }
  }
  std::string mine = me == 1 ? std::string("\0\n\x01", 3) : "rank " + std::to_string(me) + std::string(me * 100, 'x');
  const std::vector<std::string> all = comm().all_gather_strings(mine);
  REQUIRE(all.size() == static_cast<size_t>(n));
  CHECK(all[me] == mine);
  CHECK(all[0] == "rank 0");
  CHECK(all[1] == std::string("\0\n\x01", 3));
  CHECK(comm().all_gather_strings("")[n - 1].empty());
  comm().barrier();
}

TEST_CASE("mpi: fingerprint mismatch throws the same message on every rank") {
  const int me = comm().rank(), n = comm().size();
  CHECK_NOTHROW(require_same_on_all_ranks(comm(), "cfg v1\nseed=1", "the config"));
  std::string msg;
  try {
    require_same_on_all_ranks(comm(), me == 1 ? "cfg v1\nseed=2" : "cfg v1\nseed=1", "the config");
  } catch (const std::runtime_error& e) {
    msg = e.what();
  }
  INFO(msg);
  CHECK(msg.find("ranks disagree on the config: rank 1 of " + std::to_string(n) + " differs from rank 0") !=
        std::string::npos);
  CHECK(msg.find("line 2: 'seed=2' vs 'seed=1'") != std::string::npos);
  for (const std::string& m : comm().all_gather_strings(msg)) CHECK(m == msg);
}

TEST_CASE("mpi: different sizes on different ranks are reported on every rank") {
  std::vector<float> x(comm().rank() == 0 ? 10 : 11, 1.f);
  CHECK_THROWS_WITH(comm().all_reduce_sum(x), doctest::Contains("different sizes on different ranks (from 10 to 11"));
  comm().barrier();  // still usable: the check runs before any data moves
}
