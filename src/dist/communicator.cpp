// Launcher-independent pieces: the single-rank communicator, fingerprint checks.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <sstream>
#include <stdexcept>

#include "dist_internal.hpp"

namespace ftune {

namespace dist {

std::string this_host_name() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0) return "unknown-host";
  return buf;
}

void derive_local_from_hosts(WorldInfo& w, const std::vector<std::string>& hosts) {
  w.local_rank = 0;
  w.local_size = 0;
  for (int r = 0; r < static_cast<int>(hosts.size()); ++r) {
    if (hosts[r] != hosts[w.rank]) continue;
    if (r < w.rank) ++w.local_rank;
    ++w.local_size;
  }
}

namespace {

// One rank: every collective is an identity (or a copy between the caller's buffers).
class SingleRankCommunicator final : public Communicator {
 public:
  explicit SingleRankCommunicator(WorldInfo w) : world_(std::move(w)) {}
  const WorldInfo& world() const override { return world_; }
  void all_reduce_sum(std::span<float>) override {}
  void all_reduce_sum(std::span<double>) override {}
  void reduce_scatter_sum(std::span<const float> data, std::span<float> shard) override {
    if (shard.size() != data.size())
      throw std::invalid_argument("reduce_scatter_sum: shard size " + std::to_string(shard.size()) +
                                  " != " + std::to_string(data.size()) + " on a single rank");
    if (shard.data() != data.data()) std::copy(data.begin(), data.end(), shard.begin());
  }
  void all_gather(std::span<const float> shard, std::span<float> full) override {
    if (shard.size() != full.size())
      throw std::invalid_argument("all_gather: shard size " + std::to_string(shard.size()) +
                                  " != " + std::to_string(full.size()) + " on a single rank");
    if (shard.data() != full.data()) std::copy(shard.begin(), shard.end(), full.begin());
  }
  void broadcast(std::span<std::byte>, int root) override {
    if (root != 0) throw std::invalid_argument("broadcast: root " + std::to_string(root) + " on a single rank");
  }
  std::vector<std::string> all_gather_strings(const std::string& mine) override { return {mine}; }
  void barrier() override {}
  [[noreturn]] void abort(int code) override {
    std::cout.flush();
    std::cerr.flush();
    std::fflush(nullptr);
    _exit(code != 0 ? code : 1);
  }

 private:
  WorldInfo world_;
};

// First line where a and b differ, as "line N: 'a...' vs 'b...'" (lines cut to 100 chars).
std::string first_difference(const std::string& a, const std::string& b) {
  std::istringstream sa(a), sb(b);
  std::string la, lb;
  for (int line = 1;; ++line) {
    const bool ha = static_cast<bool>(std::getline(sa, la));
    const bool hb = static_cast<bool>(std::getline(sb, lb));
    if (!ha && !hb) return "identical lines (differ in line endings only)";
    if (!ha) la = "<end>";
    if (!hb) lb = "<end>";
    if (la != lb || !ha || !hb) {
      auto cut = [](const std::string& s) { return s.size() > 100 ? s.substr(0, 100) + "..." : s; };
      return "line " + std::to_string(line) + ": '" + cut(lb) + "' vs '" + cut(la) + "'";
    }
  }
}

}  // namespace

std::unique_ptr<Communicator> make_single_rank_communicator(WorldInfo world) {
  return std::make_unique<SingleRankCommunicator>(std::move(world));
}

}  // namespace dist

std::unique_ptr<Communicator> make_single_rank_communicator() {
  WorldInfo w;
  w.host = dist::this_host_name();
  return dist::make_single_rank_communicator(std::move(w));
}

void require_same_on_all_ranks(Communicator& comm, const std::string& fingerprint,
                               const std::string& what) {
  const std::vector<std::string> all = comm.all_gather_strings(fingerprint);
  std::vector<int> differ;
  for (int r = 1; r < static_cast<int>(all.size()); ++r)
    if (all[r] != all[0]) differ.push_back(r);
  if (differ.empty()) return;
  // Built from the gathered strings only, so every rank throws the same text.
  std::ostringstream msg;
  msg << "ranks disagree on " << what << ": rank" << (differ.size() > 1 ? "s " : " ");
  for (size_t i = 0; i < differ.size(); ++i) msg << (i ? ", " : "") << differ[i];
  msg << " of " << all.size() << (differ.size() > 1 ? " differ" : " differs")
      << " from rank 0 (rank " << differ[0] << " vs rank 0, first difference at "
      << dist::first_difference(all[0], all[differ[0]])
      << "); every rank must run the same ftune build with the same configuration and inputs";
  throw std::runtime_error(msg.str());
}

}  // namespace ftune
