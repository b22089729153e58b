// Rendezvous, shutdown and abort of the TCP communicator. Rank 0 listens at
// MASTER_ADDR:MASTER_PORT; each other rank connects (retrying until rendezvous_timeout) and
// introduces itself (rank, world size, host, pid); rank 0 checks the set (sizes agree, ranks
// unique, nobody missing) and sends everyone the table of hosts and pids.
#include <poll.h>
#include <unistd.h>

#include <iostream>
#include <stdexcept>
#include <thread>

#include "tcp_communicator.hpp"

namespace ftune::dist {

namespace {

constexpr uint64_t kMaxControlBytes = 1 << 20;

std::string where(const EnvLaunch& l) { return l.master_addr + ":" + std::to_string(l.master_port); }

std::string rank_list(const std::vector<int>& ranks) {
  std::string s;
  const size_t shown = std::min<size_t>(ranks.size(), 16);
  for (size_t i = 0; i < shown; ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  if (shown < ranks.size()) s += ", ... (" + std::to_string(ranks.size()) + " in all)";
  return s;
}

// Reads one whole control frame of `type` within `idle`; false if it is something else.
bool read_control(int fd, MsgType type, std::chrono::milliseconds idle, FrameHeader* h,
                  std::vector<std::byte>* payload) {
  if (recv_all(fd, std::as_writable_bytes(std::span(h, 1)), idle).status != Io::ok) return false;
  if (h->magic != kFrameMagic || h->type != static_cast<uint32_t>(type) || h->length > kMaxControlBytes)
    return false;
  payload->resize(h->length);
  return recv_all(fd, *payload, idle).status == Io::ok;
}

}  // namespace

TcpCommunicator::TcpCommunicator(const EnvLaunch& l, const BootstrapOptions& opt)
    : timeout_(std::chrono::duration_cast<std::chrono::milliseconds>(opt.collective_timeout)),
      peer_timeout_(timeout_ + std::min<std::chrono::milliseconds>(timeout_, std::chrono::seconds(10))) {
  world_.rank = l.rank;
  world_.size = l.size;
  world_.launcher = "env";
  world_.host = this_host_name();
  hosts_.assign(l.size, "");
  pids_.assign(l.size, 0);
  hosts_[l.rank] = world_.host;
  pids_[l.rank] = static_cast<uint64_t>(::getpid());
  links_.resize(is_root() ? l.size : 1);
  link_unusable_.assign(links_.size(), false);
  op_ = "the rendezvous";
  if (is_root()) rendezvous_root(l, opt.rendezvous_timeout);
  else rendezvous_peer(l, opt.rendezvous_timeout);
  op_.clear();
  derive_local_from_hosts(world_, hosts_);
  if (l.local_size) world_.local_size = *l.local_size;
  if (l.local_rank) world_.local_rank = *l.local_rank;
}

TcpCommunicator::~TcpCommunicator() {
  if (!broken_.empty()) return;
  // Tell the others we are gone on purpose: one still waiting in a collective then reports a
  // mismatch in the collective sequence instead of a crash.
  const FrameHeader h = make_header(MsgType::bye, rank(), 0, 0);
  for (size_t i = 0; i < links_.size(); ++i)
    if (links_[i].valid() && !link_unusable_[i]) send_frame(links_[i].fd(), h, {}, std::chrono::milliseconds(200));
}

void TcpCommunicator::abort(int code) {
  if (code == 0) code = 1;
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
  // Best effort: rank 0 tells everyone; the others tell rank 0, which forwards it.
  const FrameHeader h = make_header(MsgType::abort, rank(), code, 0);
  for (size_t i = 0; i < links_.size(); ++i)
    if (links_[i].valid() && !link_unusable_[i]) send_frame(links_[i].fd(), h, {}, std::chrono::seconds(1));
  _exit(code);
}

void TcpCommunicator::rendezvous_root(const EnvLaunch& l, std::chrono::seconds limit) {
  Socket listener = listen_on(l.master_addr, l.master_port);
  const auto deadline = Clock::now() + limit;
  // Fails the rendezvous: every rank connected so far (and `extra`) gets the same message.
  auto fail_all = [&](const std::string& msg, Socket* extra) {
    const FrameHeader h = make_header(MsgType::error, 0, 0, msg.size());
    for (int r = 1; r < size(); ++r)
      if (links_[r].valid()) send_frame(links_[r].fd(), h, std::as_bytes(std::span(msg)), std::chrono::seconds(2));
    if (extra) send_frame(extra->fd(), h, std::as_bytes(std::span(msg)), std::chrono::seconds(2));
    broken_ = msg;
    throw std::runtime_error(msg);
  };
  int joined = 1;
  while (joined < size()) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      std::vector<int> missing;
      for (int r = 1; r < size(); ++r)
        if (!links_[r].valid()) missing.push_back(r);
      fail_all("rendezvous at " + where(l) + " timed out after " + std::to_string(limit.count()) + " s: " +
                   std::to_string(joined) + " of " + std::to_string(size()) + " ranks joined (missing rank" +
                   (missing.size() > 1 ? "s " : " ") + rank_list(missing) +
                   "): check that every rank was started and reaches this host with the same "
                   "MASTER_ADDR/MASTER_PORT, and that WORLD_SIZE is right",
               nullptr);
    }
    pollfd p{listener.fd(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(std::min<long long>(left.count(), 1000))) <= 0) continue;
    std::string from;
    Socket s = accept_one(listener.fd(), &from);
    if (!s.valid()) continue;
    FrameHeader h;
    std::vector<std::byte> payload;
    if (!read_control(s.fd(), MsgType::hello, std::chrono::seconds(5), &h, &payload)) {
      std::cerr << "ftune: rank 0 ignores a connection from " << from
                << " that did not introduce itself as an ftune rank" << std::endl;
      continue;
    }
    int r = -1, their_size = 0;
    uint64_t pid = 0;
    std::string host;
    try {
      ByteReader rd(payload);
      r = static_cast<int>(rd.u64());
      their_size = static_cast<int>(rd.u64());
      pid = rd.u64();
      host = rd.str();
    } catch (const std::exception&) {
      std::cerr << "ftune: rank 0 ignores a malformed introduction from " << from << std::endl;
      continue;
    }
    const std::string who = "rank " + std::to_string(r) + " (" + host + ":" + std::to_string(pid) + ")";
    if (their_size != size())
      fail_all(who + " was started with a world size of " + std::to_string(their_size) + " but rank 0 (" +
                   hosts_[0] + ":" + std::to_string(pids_[0]) + ") with " + std::to_string(size()) + " (" +
                   l.source + "): start every rank with the same WORLD_SIZE",
               &s);
    if (r <= 0 || r >= size() || links_[r].valid()) {
      const std::string other = (r <= 0 || r >= size()) ? name(0) : name(r);
      fail_all("two processes claim rank " + std::to_string(r) + ": " + other + " and " + host + ":" +
                   std::to_string(pid) + " (" + l.source + "): every rank needs a unique RANK in [0, " +
                   std::to_string(size()) + ")",
               &s);
    }
    hosts_[r] = host;
    pids_[r] = pid;
    links_[r] = std::move(s);
    ++joined;
  }
  ByteWriter w;
  w.u64(size());
  for (int r = 0; r < size(); ++r) {
    w.u64(pids_[r]);
    w.str(hosts_[r]);
  }
  const FrameHeader h = make_header(MsgType::welcome, 0, size(), w.bytes().size());
  for (int r = 1; r < size(); ++r)
    if (send_frame(links_[r].fd(), h, w.bytes(), timeout_).status != Io::ok) {
      link_unusable_[r] = true;
      fail(name(r) + " disconnected during the rendezvous");
    }
}

void TcpCommunicator::rendezvous_peer(const EnvLaunch& l, std::chrono::seconds limit) {
  const auto start = Clock::now(), deadline = start + limit;
  std::string why = "no connection attempt finished";
  Socket s;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0)
      throw std::runtime_error("rank " + std::to_string(rank()) + ": could not reach rank 0 at " + where(l) +
                               " within " + std::to_string(limit.count()) +
                               " s: check MASTER_ADDR/MASTER_PORT, that rank 0 started, firewalls "
                               "(last error: " + why + ")");
    s = try_connect(l.master_addr, l.master_port, std::min<std::chrono::milliseconds>(left, std::chrono::seconds(5)), &why);
    if (s.valid()) break;
    std::this_thread::sleep_for(std::min<std::chrono::milliseconds>(left, std::chrono::milliseconds(250)));
  }
  ByteWriter w;
  w.u64(rank());
  w.u64(size());
  w.u64(pids_[rank()]);
  w.str(hosts_[rank()]);
  if (send_frame(s.fd(), make_header(MsgType::hello, 0, 0, w.bytes().size()), w.bytes(), timeout_).status != Io::ok)
    throw std::runtime_error("rank " + std::to_string(rank()) + ": rank 0 at " + where(l) +
                             " closed the connection during the rendezvous");
  // Rank 0 answers once everybody joined: wait as long as it may wait for the last rank.
  FrameHeader h;
  std::vector<std::byte> payload;
  const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(limit) + std::chrono::seconds(10);
  const IoResult io = recv_all(s.fd(), std::as_writable_bytes(std::span(&h, 1)), wait);
  if (io.status == Io::timeout)
    throw std::runtime_error("rank " + std::to_string(rank()) + ": rank 0 at " + where(l) +
                             " accepted the connection but did not complete the rendezvous within " +
                             std::to_string(wait.count() / 1000) + " s (is MASTER_PORT used by another program?)");
  if (io.status != Io::ok)
    throw std::runtime_error("rank " + std::to_string(rank()) + ": rank 0 at " + where(l) +
                             " closed the connection during the rendezvous (" + io.describe() + ")");
  if (h.magic != kFrameMagic || h.length > kMaxControlBytes)
    throw std::runtime_error("rank " + std::to_string(rank()) + ": the program at " + where(l) +
                             " is not an ftune rank 0 (check MASTER_ADDR/MASTER_PORT)");
  payload.resize(h.length);
  if (recv_all(s.fd(), payload, std::chrono::seconds(10)).status != Io::ok)
    throw std::runtime_error("rank " + std::to_string(rank()) + ": rank 0 at " + where(l) +
                             " closed the connection during the rendezvous");
  if (h.type == static_cast<uint32_t>(MsgType::error))
    throw std::runtime_error(std::string(reinterpret_cast<const char*>(payload.data()), payload.size()));
  if (h.type != static_cast<uint32_t>(MsgType::welcome))
    throw std::runtime_error("protocol error: unexpected frame from rank 0 during the rendezvous");
  ByteReader rd(payload);
  if (static_cast<int>(rd.u64()) != size())
    throw std::runtime_error("rank 0 reports a different world size (protocol error)");
  for (int r = 0; r < size(); ++r) {
    pids_[r] = rd.u64();
    hosts_[r] = rd.str();
  }
  links_[0] = std::move(s);
}

std::unique_ptr<Communicator> make_tcp_communicator(const EnvLaunch& launch, const BootstrapOptions& opt) {
  return std::make_unique<TcpCommunicator>(launch, opt);
}

}  // namespace ftune::dist
