#pragma once
// The env launcher's communicator: a star of TCP connections through rank 0. Every collective
// is "each rank sends one frame to rank 0, rank 0 answers each rank with one frame". Rank 0
// sums in rank order ((x_0 + x_1) + x_2 ...), so all ranks get the same bits (and the same
// bits as the MPI communicator). Every wait has a deadline; rank 0 watches all peers at once,
// so a dead or hung rank is named within seconds (dead) or collective_timeout (hung), and
// rank 0 forwards that error to every other rank so all of them throw the same message.
#include <functional>
#include <string>
#include <vector>

#include "dist_internal.hpp"
#include "tcp.hpp"

namespace ftune::dist {

class TcpCommunicator final : public Communicator {
 public:
  TcpCommunicator(const EnvLaunch& launch, const BootstrapOptions& opt);  // the rendezvous
  ~TcpCommunicator() override;

  const WorldInfo& world() const override { return world_; }
  void all_reduce_sum(std::span<float> data) override;
  void all_reduce_sum(std::span<double> data) override;
  void reduce_scatter_sum(std::span<const float> data, std::span<float> shard) override;
  void all_gather(std::span<const float> shard, std::span<float> full) override;
  void broadcast(std::span<std::byte> data, int root) override;
  std::vector<std::string> all_gather_strings(const std::string& mine) override;
  void barrier() override;
  [[noreturn]] void abort(int code) override;

 private:
  // Returns where the payload of a frame goes after checking its header (or calls fail_*).
  using AcceptFrom = std::function<std::span<std::byte>(int rank, const FrameHeader& h)>;
  using Accept = std::function<std::span<std::byte>(const FrameHeader& h)>;

  bool is_root() const { return world_.rank == 0; }
  std::string name(int r) const;  // "rank 2 (host:pid)"
  void check_usable() const;

  // Rank 0: one frame of `type` from every other rank, read from all of them at once.
  void gather(MsgType type, const AcceptFrom& accept);
  // Rank 0: the answer to rank r.
  void reply(int r, uint64_t arg, std::span<const std::byte> payload);
  // Other ranks: their frame to rank 0, and rank 0's answer.
  void send_to_root(MsgType type, uint64_t arg, uint64_t total, std::span<const std::byte> payload);
  void recv_from_root(const Accept& accept);
  // A control frame (error, abort, bye) or a dead connection where a result or nothing was due.
  [[noreturn]] void handle_unexpected_from_root(std::chrono::milliseconds idle);
  [[noreturn]] void handle_control_from_root(const FrameHeader& h);
  void handle_unexpected_status(const IoResult& io);  // throws unless io is ok
  [[noreturn]] void handle_abort_notice(int origin, int code);

  // Rank 0: records the failure, tells every reachable rank (so they throw the same text), throws.
  [[noreturn]] void fail(const std::string& msg);
  // Other ranks: records the failure and throws.
  [[noreturn]] void fail_here(const std::string& msg);

  template <class T>
  void reduce_sum(MsgType type, std::span<const T> in, std::span<T> out,
                  const std::function<ShardRange(int)>& want);

  void rendezvous_root(const EnvLaunch& l, std::chrono::seconds limit);
  void rendezvous_peer(const EnvLaunch& l, std::chrono::seconds limit);

  WorldInfo world_;
  std::vector<std::string> hosts_;
  std::vector<uint64_t> pids_;
  std::vector<Socket> links_;         // rank 0: links_[r] to rank r; others: links_[0]
  std::vector<bool> link_unusable_;   // rank 0: a frame to r broke off midway (or r died)
  std::chrono::milliseconds timeout_;       // rank 0's wait for any rank (collective_timeout)
  std::chrono::milliseconds peer_timeout_;  // others wait a bit longer so rank 0 reports first
  std::string op_;      // the collective in progress, for messages
  std::string broken_;  // the first failure; later calls rethrow it
};

}  // namespace ftune::dist
