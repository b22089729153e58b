// The env (torchrun / Slurm) launcher's TCP communicator. bootstrap() reads the process
// environment, so ranks are child processes: this binary re-runs itself with one of the
// "rank:" test cases (skipped in a normal run) and RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set.
// Everything listens on 127.0.0.1 only.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <thread>

#include "ftune/dist/communicator.hpp"
#include "test_util.hpp"

extern char** environ;
using namespace ftune;
using Clock = std::chrono::steady_clock;
using Env = std::map<std::string, std::string>;

namespace {

const char* const kLauncherVars[] = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "FTUNE_LAUNCHER"};

bool is_launcher_var(const std::string& kv) {
  for (const char* v : kLauncherVars)
    if (kv.rfind(std::string(v) + "=", 0) == 0) return true;
  return kv.rfind("FTUNE_TEST_", 0) == 0;
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}

int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

struct RankResult {
  int exit_code = -1;  // -N: killed by signal N
  std::string log;
};

// Runs `test_case` in one child process per entry of `ranks` (each child's extra variables),
// waits for all (at most 60 s, then kills them) and returns exit codes and output.
std::vector<RankResult> run_ranks(const std::string& test_case, const std::vector<Env>& ranks) {
  static int run_id = 0;
  const std::string dir = test::scratch("dist_tcp_" + std::to_string(++run_id));
  char exe[4096] = {};
  REQUIRE(readlink("/proc/self/exe", exe, sizeof exe - 1) > 0);
  std::vector<pid_t> pids;
  std::vector<std::string> logs;
  for (size_t i = 0; i < ranks.size(); ++i) {
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e)
      if (!is_launcher_var(*e)) env.push_back(*e);
    for (const auto& [k, v] : ranks[i]) env.push_back(k + "=" + v);
    std::vector<char*> envp, argv;
    for (auto& s : env) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::string a0 = exe, a1 = "--test-case=" + test_case, a2 = "--no-skip", a3 = "--no-version";
    argv = {a0.data(), a1.data(), a2.data(), a3.data(), nullptr};
    logs.push_back(dir + "/rank" + std::to_string(i) + ".log");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, logs.back().c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    pid_t pid = -1;
    const int rc = posix_spawn(&pid, exe, &fa, nullptr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&fa);
    REQUIRE(rc == 0);
    pids.push_back(pid);
  }
  std::vector<RankResult> out(ranks.size());
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  size_t left = pids.size();
  while (left > 0) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (pids[i] < 0) continue;
      int status = 0;
      if (waitpid(pids[i], &status, WNOHANG) != pids[i]) continue;
      out[i].exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
      pids[i] = -1;
      --left;
    }
    if (left && Clock::now() > deadline) {
      for (pid_t p : pids)
        if (p > 0) kill(p, SIGKILL), waitpid(p, nullptr, 0);
      FAIL("ranks of '" << test_case << "' still running after 60 s");
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (size_t i = 0; i < logs.size(); ++i) {
    std::ifstream f(logs[i]);
    std::stringstream ss;
    ss << f.rdbuf();
    out[i].log = ss.str();
  }
  return out;
}

// torchrun-style variables for `size` ranks meeting at 127.0.0.1:port.
std::vector<Env> torchrun_env(int size, int port, const Env& extra = {}) {
  std::vector<Env> v;
  for (int r = 0; r < size; ++r) {
    Env e = extra;
    e["RANK"] = std::to_string(r);
    e["WORLD_SIZE"] = std::to_string(size);
    e["MASTER_ADDR"] = "127.0.0.1";
    e["MASTER_PORT"] = std::to_string(port);
    v.push_back(e);
  }
  return v;
}

void check_all_passed(const std::vector<RankResult>& res) {
  for (size_t r = 0; r < res.size(); ++r) {
    INFO("rank " << r << " output:\n" << res[r].log);
    CHECK(res[r].exit_code == 0);
  }
}

// Rank r's test vector: values of very different magnitudes, so the summation order shows in
// the bits.
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

BootstrapOptions short_timeouts(int rendezvous_s, int collective_s) {
  BootstrapOptions o;
  o.rendezvous_timeout = std::chrono::seconds(rendezvous_s);
  o.collective_timeout = std::chrono::seconds(collective_s);
  return o;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

// ---------------------------------------------------------------- ranks (child processes)

TEST_CASE("rank: collectives" * doctest::skip()) {
  auto comm = bootstrap(short_timeouts(30, 30));
  const int me = comm->rank(), n = comm->size();
  CHECK(comm->world().launcher == "env");
  CHECK(n == env_int("FTUNE_TEST_SIZE", -1));
  CHECK(comm->world().local_rank == me);  // all on one host
  CHECK(comm->world().local_size == n);

  // Sums: exactly the rank-order sum, and the same bits on every rank. 2.5M floats span
  // several chunks; 0 and 1 elements are edge cases.
  for (size_t len : {size_t{0}, size_t{1}, size_t{1000}, size_t{2'500'000}}) {
    std::vector<float> f = rank_values<float>(len, me);
    comm->all_reduce_sum(f);
    CHECK(same_bits(f, rank_order_sum<float>(len, n)));
    const std::string mine(reinterpret_cast<const char*>(f.data()), f.size() * sizeof(float));
    for (const std::string& other : comm->all_gather_strings(mine)) CHECK(other == mine);
  }
  std::vector<double> d = rank_values<double>(777, me);
  comm->all_reduce_sum(d);
  CHECK(same_bits(d, rank_order_sum<double>(777, n)));

  // reduce_scatter gives this rank's slice of the all-reduce (same bits); all_gather puts the
  // slices back together.
  for (size_t len : {size_t{5}, size_t{1'000'003}}) {
    const std::vector<float> x = rank_values<float>(len, me);
    const ShardRange s = shard_range(len, me, n);
    std::vector<float> shard(s.size()), full(len, -1.f);
    comm->reduce_scatter_sum(x, shard);
    const std::vector<float> sum = rank_order_sum<float>(len, n);
    CHECK(same_bits(shard, std::vector<float>(sum.begin() + s.begin, sum.begin() + s.end)));
    comm->all_gather(shard, full);
    CHECK(same_bits(full, sum));
  }

  std::string mine = "rank " + std::to_string(me) + std::string(me * 1000, 'x');
  if (me == 1) mine = std::string("\0\n\x01", 3);  // binary-safe
  if (me == 2) mine.clear();
  const std::vector<std::string> all = comm->all_gather_strings(mine);
  REQUIRE(all.size() == static_cast<size_t>(n));
  CHECK(all[me] == mine);
  CHECK(all[0].size() == 6);

  for (int root = 0; root < n; ++root) {
    for (size_t len : {size_t{0}, size_t{13}, size_t{3'000'000}}) {
      std::vector<std::byte> b(len, std::byte(me));
      if (me == root)
        for (size_t i = 0; i < len; ++i) b[i] = std::byte((i * 7 + root) & 0xff);
      comm->broadcast(b, root);
      bool ok = true;
      for (size_t i = 0; i < len; ++i) ok = ok && b[i] == std::byte((i * 7 + root) & 0xff);
      CHECK(ok);
    }
  }
  comm->barrier();

  CHECK_NOTHROW(require_same_on_all_ranks(*comm, "same", "the config"));
  std::string msg;
  try {
    require_same_on_all_ranks(*comm, me == 1 ? "lr=2" : "lr=1", "the config");
  } catch (const std::runtime_error& e) {
    msg = e.what();
  }
  CHECK(msg.find("rank 1 of " + std::to_string(n) + " differs from rank 0") != std::string::npos);
  for (const std::string& m : comm->all_gather_strings(msg)) CHECK(m == msg);  // same text everywhere
}

TEST_CASE("rank: peer dies" * doctest::skip()) {
  const int victim = env_int("FTUNE_TEST_VICTIM", -1), slow = env_int("FTUNE_TEST_SLOW", -1);
  auto comm = bootstrap(short_timeouts(30, 30));
  std::vector<float> x(1 << 20, 1.f);
  comm->all_reduce_sum(x);
  if (comm->rank() == victim) raise(SIGKILL);
  if (comm->rank() == slow) std::this_thread::sleep_for(std::chrono::seconds(3));
  const auto t0 = Clock::now();
  std::string msg;
  try {
    comm->all_reduce_sum(x);
  } catch (const std::runtime_error& e) {
    msg = e.what();
  }
  const double s = seconds_since(t0);
  MESSAGE("rank " << comm->rank() << " failed after " << s << " s: " << msg);
  CHECK(msg.find("rank " + std::to_string(victim) + " (") != std::string::npos);
  CHECK(msg.find("disconnected during all_reduce_sum(float)") != std::string::npos);
  CHECK(s < 20);
  // Rank 0 notices the dead rank while it still waits for the slow one.
  if (comm->rank() == 0 && slow >= 0) CHECK(s < 2.5);
  CHECK_THROWS_WITH(comm->barrier(), doctest::Contains("unusable after an earlier failure"));
}

TEST_CASE("rank: hung peer" * doctest::skip()) {
  auto comm = bootstrap(short_timeouts(30, 2));
  if (comm->rank() == 1) std::this_thread::sleep_for(std::chrono::seconds(3));
  const auto t0 = Clock::now();
  std::string msg;
  try {
    comm->barrier();
  } catch (const std::runtime_error& e) {
    msg = e.what();
  }
  MESSAGE("rank " << comm->rank() << " failed after " << seconds_since(t0) << " s: " << msg);
  CHECK(msg.find("no data from rank 1 (") != std::string::npos);
  CHECK(msg.find("for 2 s during barrier (collective_timeout)") != std::string::npos);
  if (comm->rank() == 0) CHECK(seconds_since(t0) < 10);
}

TEST_CASE("rank: collective mismatch" * doctest::skip()) {
  auto comm = bootstrap(short_timeouts(30, 30));
  std::vector<float> x(comm->rank() == 0 ? 10 : 20, 1.f);
  CHECK_THROWS_WITH(comm->all_reduce_sum(x),
                    doctest::Contains("called all_reduce_sum(float) with 20 elements, rank 0 with 10"));
}

TEST_CASE("rank: abort" * doctest::skip()) {
  auto comm = bootstrap(short_timeouts(30, 30));
  comm->barrier();
  if (comm->rank() == env_int("FTUNE_TEST_ABORTER", -1)) comm->abort(7);
  std::vector<float> x(100, 1.f);
  comm->all_reduce_sum(x);  // the abort notice ends this process with code 7
  FAIL("all_reduce_sum returned after another rank aborted");
}

TEST_CASE("rank: rendezvous fails" * doctest::skip()) {
  CHECK_THROWS_WITH(bootstrap(short_timeouts(20, 20)),
                    doctest::Contains(std::getenv("FTUNE_TEST_EXPECT")));
}

// ---------------------------------------------------------------- the tests

TEST_CASE("tcp: collectives with 2 and 3 ranks (torchrun and Slurm variables)") {
  // 2 ranks with LOCAL_RANK/LOCAL_WORLD_SIZE; 3 ranks derive them from the host names.
  std::vector<Env> two = torchrun_env(2, free_port(), {{"FTUNE_TEST_SIZE", "2"}, {"LOCAL_WORLD_SIZE", "2"}});
  for (int r = 0; r < 2; ++r) two[r]["LOCAL_RANK"] = std::to_string(r);
  check_all_passed(run_ranks("rank: collectives", two));
  check_all_passed(run_ranks("rank: collectives", torchrun_env(3, free_port(), {{"FTUNE_TEST_SIZE", "3"}})));
  std::vector<Env> slurm;
  const std::string port = std::to_string(free_port());
  for (int r = 0; r < 2; ++r)
    slurm.push_back({{"SLURM_PROCID", std::to_string(r)}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", std::to_string(r)},
                     {"SLURM_NTASKS_PER_NODE", "2"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", port},
                     {"FTUNE_TEST_SIZE", "2"}});
  check_all_passed(run_ranks("rank: collectives", slurm));
}

TEST_CASE("tcp: a killed rank makes the others fail naming it, within seconds") {
  SUBCASE("rank 1 of 3 dies while rank 2 is still computing") {
    const auto res = run_ranks("rank: peer dies",
                               torchrun_env(3, free_port(), {{"FTUNE_TEST_VICTIM", "1"}, {"FTUNE_TEST_SLOW", "2"}}));
    CHECK(res[1].exit_code == -SIGKILL);
    for (int r : {0, 2}) {
      INFO("rank " << r << " output:\n" << res[r].log);
      CHECK(res[r].exit_code == 0);
    }
  }
  SUBCASE("rank 0 of 2 dies") {
    const auto res = run_ranks("rank: peer dies", torchrun_env(2, free_port(), {{"FTUNE_TEST_VICTIM", "0"}}));
    CHECK(res[0].exit_code == -SIGKILL);
    INFO(res[1].log);
    CHECK(res[1].exit_code == 0);
  }
}

TEST_CASE("tcp: a hung rank fails the collective after collective_timeout") {
  check_all_passed(run_ranks("rank: hung peer", torchrun_env(2, free_port())));
}

TEST_CASE("tcp: different collective sizes are reported on every rank") {
  check_all_passed(run_ranks("rank: collective mismatch", torchrun_env(2, free_port())));
}

TEST_CASE("tcp: abort ends every rank with its code, naming the rank") {
  for (int aborter : {1, 0}) {
    CAPTURE(aborter);
    const auto res = run_ranks("rank: abort", torchrun_env(3, free_port(), {{"FTUNE_TEST_ABORTER", std::to_string(aborter)}}));
    for (int r = 0; r < 3; ++r) {
      INFO("rank " << r << " output:\n" << res[r].log);
      CHECK(res[r].exit_code == 7);
      if (r != aborter) CHECK(res[r].log.find("rank " + std::to_string(aborter) + " (") != std::string::npos);
      if (r != aborter) CHECK(res[r].log.find("aborted the job (exit code 7)") != std::string::npos);
    }
  }
}

TEST_CASE("tcp: duplicate ranks and world size disagreements are explained") {
  const int port = free_port();
  std::vector<Env> dup = torchrun_env(3, port, {{"FTUNE_TEST_EXPECT", "two processes claim rank 1"}});
  dup[2]["RANK"] = "1";
  check_all_passed(run_ranks("rank: rendezvous fails", dup));
  std::vector<Env> sizes = torchrun_env(2, free_port(), {{"FTUNE_TEST_EXPECT", "rank 0 ("}});
  sizes[1]["WORLD_SIZE"] = "3";
  sizes[0]["FTUNE_TEST_EXPECT"] = sizes[1]["FTUNE_TEST_EXPECT"] = "with a world size of 3 but rank 0";
  check_all_passed(run_ranks("rank: rendezvous fails", sizes));
}

namespace {
std::string bootstrap_error(const Env& env, BootstrapOptions opt, double* seconds) {
  std::map<std::string, std::string> saved;
  for (const char* v : kLauncherVars)
    if (const char* old = std::getenv(v)) saved[v] = old, unsetenv(v);
  for (const auto& [k, v] : env) setenv(k.c_str(), v.c_str(), 1);
  std::string msg;
  const auto t0 = Clock::now();
  try {
    bootstrap(opt);
  } catch (const std::exception& e) {
    msg = e.what();
  }
  *seconds = seconds_since(t0);
  for (const auto& [k, v] : env) unsetenv(k.c_str());
  for (const auto& [k, v] : saved) setenv(k.c_str(), v.c_str(), 1);
  return msg;
}
}  // namespace

TEST_CASE("tcp: nobody at MASTER_ADDR:MASTER_PORT fails within rendezvous_timeout") {
  const std::string port = std::to_string(free_port());
  double s = 0;
  const std::string msg = bootstrap_error(
      {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", port}},
      short_timeouts(3, 3), &s);
  INFO(msg);
  CHECK(msg.find("could not reach rank 0 at 127.0.0.1:" + port + " within 3 s") != std::string::npos);
  CHECK(msg.find("check MASTER_ADDR/MASTER_PORT") != std::string::npos);
  CHECK(s >= 2.5);
  CHECK(s < 10);
}

TEST_CASE("tcp: rank 0 alone reports the missing ranks") {
  double s = 0;
  const std::string msg = bootstrap_error(
      {{"RANK", "0"}, {"WORLD_SIZE", "3"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", std::to_string(free_port())}},
      short_timeouts(2, 2), &s);
  INFO(msg);
  CHECK(msg.find("1 of 3 ranks joined (missing ranks 1, 2)") != std::string::npos);
  CHECK(s < 10);
}

TEST_CASE("tcp: MASTER_PORT already in use on rank 0") {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  REQUIRE(listen(fd, 1) == 0);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  double s = 0;
  const std::string msg = bootstrap_error(
      {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", std::to_string(ntohs(a.sin_port))}},
      short_timeouts(2, 2), &s);
  close(fd);
  CHECK(msg.find("is already in use") != std::string::npos);
}
