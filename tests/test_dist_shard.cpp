// shard_range, the single-rank communicator, launcher detection from the environment, and
// require_same_on_all_ranks' message (through a fake communicator).
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <stdexcept>

#include "ftune/dist/communicator.hpp"
#include "test_util.hpp"

using namespace ftune;

namespace {

// Clears every launcher variable for one test, sets the given ones, restores all at the end.
class LauncherEnv {
 public:
  explicit LauncherEnv(const std::map<std::string, std::string>& set = {}) {
    for (const char* v : kVars) {
      if (const char* old = std::getenv(v)) saved_[v] = old;
      unsetenv(v);
    }
    for (const auto& [k, v] : set) setenv(k.c_str(), v.c_str(), 1);
  }
  ~LauncherEnv() {
    for (const char* v : kVars) unsetenv(v);
    for (const auto& [k, v] : saved_) setenv(k.c_str(), v.c_str(), 1);
  }

 private:
  static constexpr const char* kVars[] = {
      "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
      "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE",
      "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "FTUNE_LAUNCHER"};
  std::map<std::string, std::string> saved_;
};

std::string bootstrap_error(const std::map<std::string, std::string>& env) {
  LauncherEnv e(env);
  try {
    bootstrap();
  } catch (const std::exception& ex) {
    return ex.what();
  }
  return "";
}

// Answers all_gather_strings with fixed strings, as if `size` ranks had sent them.
class FakeComm final : public Communicator {
 public:
  explicit FakeComm(std::vector<std::string> s) : strings_(std::move(s)) { w_.size = static_cast<int>(strings_.size()); }
  const WorldInfo& world() const override { return w_; }
  void all_reduce_sum(std::span<float>) override {}
  void all_reduce_sum(std::span<double>) override {}
  void reduce_scatter_sum(std::span<const float>, std::span<float>) override {}
  void all_gather(std::span<const float>, std::span<float>) override {}
  void broadcast(std::span<std::byte>, int) override {}
  std::vector<std::string> all_gather_strings(const std::string&) override { return strings_; }
  void barrier() override {}
  [[noreturn]] void abort(int code) override { std::exit(code); }

 private:
  WorldInfo w_;
  std::vector<std::string> strings_;
};

}  // namespace

TEST_CASE("shard_range: contiguous, balanced, covering [0, n)") {
  for (size_t n : {0, 1, 2, 3, 5, 7, 8, 100, 1001, 65537}) {
    for (int size : {1, 2, 3, 4, 7, 8, 16}) {
      CAPTURE(n);
      CAPTURE(size);
      size_t expect_begin = 0, lo = SIZE_MAX, hi = 0;
      for (int r = 0; r < size; ++r) {
        const ShardRange s = shard_range(n, r, size);
        CHECK(s.begin == expect_begin);
        CHECK(s.end >= s.begin);
        expect_begin = s.end;
        lo = std::min(lo, s.size());
        hi = std::max(hi, s.size());
        if (r > 0) CHECK(shard_range(n, r - 1, size).size() >= s.size());  // larger shards first
      }
      CHECK(expect_begin == n);
      CHECK(hi - lo <= 1);
    }
  }
  CHECK(shard_range(10, 0, 1).begin == 0);
  CHECK(shard_range(10, 0, 1).end == 10);
  CHECK(shard_range(10, 2, 3).begin == 7);
  CHECK_THROWS_AS(shard_range(10, 3, 3), std::invalid_argument);
  CHECK_THROWS_AS(shard_range(10, -1, 3), std::invalid_argument);
  CHECK_THROWS_AS(shard_range(10, 0, 0), std::invalid_argument);
}

TEST_CASE("single-rank communicator: collectives are identities") {
  auto comm = make_single_rank_communicator();
  CHECK(comm->size() == 1);
  CHECK(comm->rank() == 0);
  CHECK(comm->world().launcher == "single");
  CHECK(comm->world().local_size == 1);
  CHECK_FALSE(comm->world().host.empty());

  std::vector<float> f = {1.5f, -2.25f, 3e-8f};
  const std::vector<float> f0 = f;
  comm->all_reduce_sum(f);
  CHECK(f == f0);
  std::vector<double> d = {1e300, -0.0};
  comm->all_reduce_sum(d);
  CHECK(d[0] == 1e300);
  CHECK(std::signbit(d[1]));

  std::vector<float> shard(3);
  comm->reduce_scatter_sum(f, shard);
  CHECK(shard == f0);
  std::vector<float> full(3);
  comm->all_gather(shard, full);
  CHECK(full == f0);
  CHECK_THROWS_AS(comm->all_gather(std::span<const float>(shard).first(2), full), std::invalid_argument);

  std::vector<std::byte> bytes(4, std::byte{7});
  comm->broadcast(bytes, 0);
  CHECK(bytes[3] == std::byte{7});
  CHECK_THROWS(comm->broadcast(bytes, 1));
  CHECK(comm->all_gather_strings("abc") == std::vector<std::string>{"abc"});
  comm->barrier();
  CHECK_NOTHROW(require_same_on_all_ranks(*comm, "fp", "the config"));
}

TEST_CASE("single-rank communicator: abort exits with the code") {
  std::fflush(nullptr);  // the child flushes on exit: do not print our buffer twice
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) make_single_rank_communicator()->abort(3);
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 3);
}

TEST_CASE("bootstrap: no launcher variables -> one rank, no MPI") {
  LauncherEnv e;
  auto comm = bootstrap();
  CHECK(comm->size() == 1);
  CHECK(comm->world().launcher == "single");
}

TEST_CASE("bootstrap: env launcher with one rank needs no rendezvous") {
  {
    LauncherEnv e({{"RANK", "0"}, {"WORLD_SIZE", "1"}});
    auto comm = bootstrap();
    CHECK(comm->size() == 1);
    CHECK(comm->world().launcher == "env");
  }
  {
    LauncherEnv e({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}, {"SLURM_LOCALID", "0"}});
    CHECK(bootstrap()->size() == 1);
  }
  {  // FTUNE_LAUNCHER=single wins over an incomplete multi-rank description
    LauncherEnv e({{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "4"}, {"FTUNE_LAUNCHER", "single"}});
    CHECK(bootstrap()->size() == 1);
  }
}

TEST_CASE("bootstrap: incomplete or invalid launcher variables are explained") {
  std::string m = bootstrap_error({{"RANK", "1"}, {"WORLD_SIZE", "2"}});
  CHECK(m.find("MASTER_ADDR and MASTER_PORT are not set") != std::string::npos);
  m = bootstrap_error({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}});
  CHECK(m.find("MASTER_PORT is not set") != std::string::npos);
  m = bootstrap_error({{"RANK", "1"}});
  CHECK(m.find("WORLD_SIZE is not set") != std::string::npos);
  m = bootstrap_error({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "x"}, {"MASTER_PORT", "1"}});
  CHECK(m.find("RANK='2'") != std::string::npos);
  m = bootstrap_error({{"RANK", "0"}, {"WORLD_SIZE", "two"}});
  CHECK(m.find("WORLD_SIZE='two'") != std::string::npos);
  m = bootstrap_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "x"}, {"MASTER_PORT", "70000"}});
  CHECK(m.find("MASTER_PORT='70000'") != std::string::npos);
  m = bootstrap_error({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}});
  CHECK(m.find("SLURM_PROCID/SLURM_NTASKS") != std::string::npos);
  CHECK(m.find("MASTER_ADDR") != std::string::npos);
  m = bootstrap_error({{"FTUNE_LAUNCHER", "pmi"}});
  CHECK(m.find("FTUNE_LAUNCHER='pmi'") != std::string::npos);
  m = bootstrap_error({{"FTUNE_LAUNCHER", "env"}});
  CHECK(m.find("RANK/WORLD_SIZE") != std::string::npos);
}

TEST_CASE("require_same_on_all_ranks: lists the ranks that differ and the first differing line") {
  FakeComm same({"a\nb", "a\nb", "a\nb"});
  CHECK_NOTHROW(require_same_on_all_ranks(same, "a\nb", "the config"));

  FakeComm differ({"v=1\nlr=0.1\nseed=3", "v=1\nlr=0.2\nseed=3", "v=1\nlr=0.1\nseed=3", "v=1\nlr=0.1"});
  std::string msg;
  try {
    require_same_on_all_ranks(differ, "", "the config");
  } catch (const std::runtime_error& e) {
    msg = e.what();
  }
  INFO(msg);
  CHECK(msg.find("ranks disagree on the config") != std::string::npos);
  CHECK(msg.find("ranks 1, 3 of 4 differ from rank 0") != std::string::npos);
  CHECK(msg.find("line 2: 'lr=0.2' vs 'lr=0.1'") != std::string::npos);

  FakeComm shorter({"x\ny", "x"});
  try {
    require_same_on_all_ranks(shorter, "", "data");
  } catch (const std::runtime_error& e) {
    msg = e.what();
  }
  CHECK(msg.find("rank 1 of 2 differs") != std::string::npos);
  CHECK(msg.find("line 2: '<end>' vs 'y'") != std::string::npos);
}
