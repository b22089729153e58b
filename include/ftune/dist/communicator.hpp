#pragma once
// dist module: who the ranks are and how they talk. Bootstrap picks the launcher:
//   mpirun / srun with PMI  -> MPI (rank, size; local rank from a shared-memory split)
//   torchrun-style env      -> RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
//                              MASTER_PORT; rank 0 serves a TCP rendezvous
//   nothing                 -> a single rank
// On the CPU backend the Communicator carries the gradients (MPI collectives, or TCP for the
// env launcher); on the GPU path it only broadcasts the NCCL unique id.
// Every collective returns the same bits on every rank (fixed reduction order), so ranks
// never drift apart.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "ftune/dist/shard_range.hpp"

namespace ftune {

struct WorldInfo {
  int rank = 0, size = 1;
  int local_rank = 0, local_size = 1;  // within this host (GPU = local_rank)
  std::string launcher = "single";     // single | mpi | env
  std::string host;                    // this host's name
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual const WorldInfo& world() const = 0;
  int rank() const { return world().rank; }
  int size() const { return world().size; }

  // In place: every rank ends with the element-wise sum over ranks.
  virtual void all_reduce_sum(std::span<float> data) = 0;
  virtual void all_reduce_sum(std::span<double> data) = 0;
  // data holds the full vector on every rank; rank r ends with the sum of its
  // shard_range(data.size(), r, size) in `shard` (ZeRO-2 gradient reduction).
  virtual void reduce_scatter_sum(std::span<const float> data, std::span<float> shard) = 0;
  // Each rank contributes its shard_range(full.size(), rank, size) from `shard`; every rank
  // ends with the full vector (ZeRO-1/2 parameter gather). `shard` may be its own place in
  // `full` (an in-place gather).
  virtual void all_gather(std::span<const float> shard, std::span<float> full) = 0;
  virtual void broadcast(std::span<std::byte> data, int root) = 0;
  // Every rank's string, in rank order (fingerprints, reachability reports).
  virtual std::vector<std::string> all_gather_strings(const std::string& mine) = 0;
  virtual void barrier() = 0;
  // Ends every rank of the job with a non-zero exit (after a fatal error on one rank).
  [[noreturn]] virtual void abort(int code) = 0;
};

struct BootstrapOptions {
  // How long non-zero ranks keep retrying the rendezvous, and the longest any collective
  // may wait for a peer before failing with a message naming it.
  std::chrono::seconds rendezvous_timeout{120};
  std::chrono::seconds collective_timeout{300};
};

// Detects the launcher from the environment and connects the ranks. Throws with a message
// that says what to check (address, port, firewall, variables) when it cannot.
std::unique_ptr<Communicator> bootstrap(const BootstrapOptions& opt = {});

// A communicator of one rank (no launcher): collectives are identities.
std::unique_ptr<Communicator> make_single_rank_communicator();

// All ranks compare `fingerprint`; if any differ, every rank throws the same error listing
// which ranks disagree on `what`.
void require_same_on_all_ranks(Communicator& comm, const std::string& fingerprint,
                               const std::string& what);

}  // namespace ftune
