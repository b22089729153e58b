#pragma once
// Private to the dist module: the launcher description bootstrap() derives from the
// environment, and the factories of the concrete communicators.
#include <memory>
#include <optional>
#include <string>

#include "ftune/dist/communicator.hpp"

namespace ftune::dist {

// A torchrun-style (or Slurm-without-PMI) launch: ranks meet over TCP at rank 0.
struct EnvLaunch {
  int rank = 0, size = 1;
  // From LOCAL_RANK/LOCAL_WORLD_SIZE (or SLURM_LOCALID/SLURM_NTASKS_PER_NODE) when set;
  // otherwise derived from the host names exchanged at the rendezvous.
  std::optional<int> local_rank, local_size;
  std::string master_addr;
  int master_port = 0;
  std::string source;  // which variables described the launch, for messages
};

std::string this_host_name();

// Ranks that share this rank's host (in rank order) give local_rank/local_size.
void derive_local_from_hosts(WorldInfo& w, const std::vector<std::string>& hosts);

std::unique_ptr<Communicator> make_single_rank_communicator(WorldInfo world);
// `expected_size`: the rank count the launcher advertised (0 = unknown); a mismatch with
// MPI's view means this MPI library cannot talk to the launcher.
std::unique_ptr<Communicator> make_mpi_communicator(int expected_size, const std::string& expected_from);
std::unique_ptr<Communicator> make_tcp_communicator(const EnvLaunch& launch, const BootstrapOptions& opt);

}  // namespace ftune::dist
