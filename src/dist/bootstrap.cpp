// bootstrap(): reads the environment to find out who launched this process and builds the
// matching communicator. MPI is initialised only when an MPI launcher started us, so
// single-process and torchrun/Slurm-env runs never need mpirun.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "dist_internal.hpp"

namespace ftune {
namespace dist {
namespace {

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return (v && *v) ? v : nullptr;
}

int env_int(const char* name, int lo, int hi, const std::string& context) {
  const char* v = env(name);
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (end == v || *end != '\0' || x < lo || x > hi)
    throw std::runtime_error(std::string(name) + "='" + v + "' is not an integer in [" +
                             std::to_string(lo) + ", " + std::to_string(hi) + "] (" + context + ")");
  return static_cast<int>(x);
}

// The rank count an MPI-style launcher advertises (0 if none), and the variable naming it.
int mpi_launcher_size(std::string* from) {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"}) {
    if (env(v)) {
      *from = v;
      return std::atoi(env(v));
    }
  }
  return 0;
}

bool launched_by_mpi() {
  // mpirun (Open MPI) and PMIx (srun --mpi=pmix, prterun) always mean MPI.
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK"})
    if (env(v)) return true;
  // PMI-1/2 alone: MPICH's hydra, or srun --mpi=pmi2. Under Slurm with MASTER_ADDR exported
  // (our sbatch scripts) the TCP launcher is used instead: Open MPI 4 cannot start from
  // Slurm's PMI-2 and aborts inside MPI_Init.
  if (env("PMI_SIZE") || env("PMI_RANK"))
    return !(env("SLURM_PROCID") && env("MASTER_ADDR"));
  return false;
}

// torchrun's variables, or Slurm's (srun without PMI) with MASTER_ADDR/MASTER_PORT exported by
// the sbatch script. Returns nullopt when neither describes the launch.
std::optional<EnvLaunch> env_launch() {
  const char *rank_var, *size_var, *local_rank_var, *local_size_var;
  if (env("RANK") || env("WORLD_SIZE")) {
    rank_var = "RANK", size_var = "WORLD_SIZE";
    local_rank_var = "LOCAL_RANK", local_size_var = "LOCAL_WORLD_SIZE";
  } else if (env("SLURM_PROCID") && env("SLURM_NTASKS")) {
    rank_var = "SLURM_PROCID", size_var = "SLURM_NTASKS";
    local_rank_var = "SLURM_LOCALID", local_size_var = "SLURM_NTASKS_PER_NODE";
  } else {
    return std::nullopt;
  }
  EnvLaunch l;
  l.source = std::string(rank_var) + "/" + size_var;
  const std::string ctx = "env launcher, " + l.source;
  if (!env(rank_var) || !env(size_var))
    throw std::runtime_error(std::string(env(rank_var) ? size_var : rank_var) + " is not set but " +
                             (env(rank_var) ? rank_var : size_var) +
                             " is: a torchrun-style launch needs RANK, WORLD_SIZE, MASTER_ADDR "
                             "and MASTER_PORT on every rank");
  l.size = env_int(size_var, 1, 1 << 20, ctx);
  l.rank = env_int(rank_var, 0, l.size - 1, ctx + ", " + size_var + "=" + std::to_string(l.size));
  if (env(local_size_var)) {
    // SLURM_NTASKS_PER_NODE may read "4(x2)" on uneven layouts: then derive from host names.
    const std::string v = env(local_size_var);
    if (v.find_first_not_of("0123456789") == std::string::npos)
      l.local_size = env_int(local_size_var, 1, l.size, ctx);
  }
  if (env(local_rank_var)) {
    l.local_rank = env_int(local_rank_var, 0, l.size - 1, ctx);
  } else if (l.local_size) {
    l.local_rank = l.rank % *l.local_size;
  }
  if (l.size == 1) return l;  // nobody to meet
  const char* addr = env("MASTER_ADDR");
  const char* port = env("MASTER_PORT");
  if (!addr || !port)
    throw std::runtime_error(
        l.source + " say this is rank " + std::to_string(l.rank) + " of " + std::to_string(l.size) +
        " but " + (!addr && !port ? "MASTER_ADDR and MASTER_PORT are" : !addr ? "MASTER_ADDR is" : "MASTER_PORT is") +
        " not set: export MASTER_ADDR (the host of rank 0) and MASTER_PORT (a free TCP port "
        "there) to every rank (the slurm/*.sbatch scripts do), launch with mpirun / srun "
        "--mpi=pmix, or set FTUNE_LAUNCHER=single to run this process alone");
  l.master_addr = addr;
  l.master_port = env_int("MASTER_PORT", 1, 65535, ctx);
  return l;
}

std::unique_ptr<Communicator> from_env(const EnvLaunch& l, const BootstrapOptions& opt) {
  if (l.size > 1) return make_tcp_communicator(l, opt);
  WorldInfo w;
  w.launcher = "env";
  w.host = this_host_name();
  return make_single_rank_communicator(std::move(w));
}

}  // namespace
}  // namespace dist

std::unique_ptr<Communicator> bootstrap(const BootstrapOptions& defaults) {
  using namespace dist;
  // FTUNE_RENDEZVOUS_TIMEOUT / FTUNE_COLLECTIVE_TIMEOUT (seconds) adjust the deadlines, e.g.
  // a longer rendezvous when nodes boot unevenly, or short ones in tests.
  BootstrapOptions opt = defaults;
  if (env("FTUNE_RENDEZVOUS_TIMEOUT"))
    opt.rendezvous_timeout = std::chrono::seconds(
        env_int("FTUNE_RENDEZVOUS_TIMEOUT", 1, 86400, "seconds"));
  if (env("FTUNE_COLLECTIVE_TIMEOUT"))
    opt.collective_timeout = std::chrono::seconds(
        env_int("FTUNE_COLLECTIVE_TIMEOUT", 1, 86400, "seconds"));
  // FTUNE_LAUNCHER=mpi|env|single overrides the detection (e.g. when srun sets PMI variables
  // but this MPI library cannot use them, or to run one process inside an allocation).
  const std::string forced = env("FTUNE_LAUNCHER") ? env("FTUNE_LAUNCHER") : "auto";
  if (forced != "auto" && forced != "mpi" && forced != "env" && forced != "single")
    throw std::runtime_error("FTUNE_LAUNCHER='" + forced + "': expected auto, mpi, env or single");
  if (forced == "single") return make_single_rank_communicator();
  if (forced == "mpi" || (forced == "auto" && launched_by_mpi())) {
    std::string from;
    const int expected = mpi_launcher_size(&from);
    return make_mpi_communicator(expected, from);
  }
  if (std::optional<EnvLaunch> l = env_launch()) return from_env(*l, opt);
  if (forced == "env")
    throw std::runtime_error("FTUNE_LAUNCHER=env but neither RANK/WORLD_SIZE nor "
                             "SLURM_PROCID/SLURM_NTASKS are set");
  return make_single_rank_communicator();
}

}  // namespace ftune
