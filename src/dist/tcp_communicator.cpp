// Collectives of the TCP communicator (see tcp_communicator.hpp for the protocol).
#include "tcp_communicator.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iostream>
#include <stdexcept>

namespace ftune::dist {

namespace {

std::string secs(std::chrono::milliseconds ms) {
  const auto s = ms.count() / 1000.0;
  std::string t = std::to_string(s);
  t.erase(t.find_last_not_of('0') + 1);
  if (t.back() == '.') t.pop_back();
  return t + " s";
}

// The part of chunk `a` in range `b`; empty ranges sit at a.begin (offsets stay valid).
ShardRange intersect(ShardRange a, ShardRange b) {
  const size_t lo = std::max(a.begin, b.begin), hi = std::min(a.end, b.end);
  return lo < hi ? ShardRange{lo, hi} : ShardRange{a.begin, a.begin};
}

template <class T>
std::span<std::byte> writable_bytes(std::span<T> s) {
  return std::as_writable_bytes(s);
}

}  // namespace

std::string TcpCommunicator::name(int r) const {
  std::string s = "rank " + std::to_string(r);
  if (r >= 0 && r < static_cast<int>(hosts_.size()))
    s += " (" + hosts_[r] + ":" + std::to_string(pids_[r]) + ")";
  return s;
}

void TcpCommunicator::check_usable() const {
  if (!broken_.empty())
    throw std::runtime_error("communicator unusable after an earlier failure: " + broken_);
}

void TcpCommunicator::fail(const std::string& msg) {
  broken_ = msg;
  const std::string text = msg;
  const FrameHeader h = make_header(MsgType::error, 0, 0, text.size());
  for (int r = 1; r < size(); ++r)
    if (!link_unusable_[r])  // best effort: the error is small, a live peer takes it at once
      send_frame(links_[r].fd(), h, std::as_bytes(std::span(text)), std::chrono::seconds(2));
  throw std::runtime_error(msg);
}

void TcpCommunicator::fail_here(const std::string& msg) {
  broken_ = msg;
  throw std::runtime_error(msg);
}

void TcpCommunicator::handle_abort_notice(int origin, int code) {
  if (is_root()) {  // forward, so every rank stops
    const FrameHeader h = make_header(MsgType::abort, origin, code, 0);
    for (int r = 1; r < size(); ++r)
      if (r != origin && !link_unusable_[r]) send_frame(links_[r].fd(), h, {}, std::chrono::seconds(1));
  }
  std::cerr << "\nftune: " << name(origin) << " aborted the job (exit code " << code << "); "
            << name(rank()) << " exits too" << std::endl;
  std::fflush(nullptr);
  _exit(code != 0 ? code : 1);
}

// ---- rank 0 side ----

void TcpCommunicator::gather(MsgType type, const AcceptFrom& accept) {
  struct State {
    FrameHeader h;
    size_t got = 0;  // bytes of header, then of payload
    bool have_header = false, done = false;
    std::span<std::byte> dest;
    Clock::time_point last;
  };
  const int n = size();
  std::vector<State> st(n);
  int left = n - 1;
  for (int r = 1; r < n; ++r) st[r].last = Clock::now();
  std::vector<pollfd> fds;
  std::vector<int> who;
  while (left > 0) {
    fds.clear();
    who.clear();
    const auto now = Clock::now();
    for (int r = 1; r < n; ++r) {
      if (st[r].done) continue;
      if (now - st[r].last >= timeout_)
        fail("no data from " + name(r) + " for " + secs(timeout_) + " during " + op_ +
             " (collective_timeout): it is hung, much slower than the other ranks, or not "
             "calling this collective");
      fds.push_back({links_[r].fd(), POLLIN, 0});
      who.push_back(r);
    }
    auto next = Clock::time_point::max();
    for (int r : who) next = std::min(next, st[r].last + timeout_);
    const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next - now).count() + 1;
    const int rc = ::poll(fds.data(), fds.size(), static_cast<int>(std::min<long long>(wait, 1 << 30)));
    if (rc < 0 && errno != EINTR) fail(std::string("poll failed on rank 0: ") + std::strerror(errno));
    for (size_t i = 0; rc > 0 && i < fds.size(); ++i) {
      if (!fds[i].revents) continue;
      const int r = who[i];
      State& s = st[r];
      while (!s.done) {
        std::byte* p = s.have_header ? s.dest.data() + s.got : reinterpret_cast<std::byte*>(&s.h) + s.got;
        const size_t want = (s.have_header ? s.dest.size() : sizeof(FrameHeader)) - s.got;
        const ssize_t got = want ? ::recv(links_[r].fd(), p, want, MSG_DONTWAIT) : 0;
        if (want && got == 0) {
          link_unusable_[r] = true;
          fail(name(r) + " disconnected during " + op_ + ": it exited or was killed (see its log)");
        }
        if (got < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
          link_unusable_[r] = true;
          fail(name(r) + " disconnected during " + op_ + " (" + std::strerror(errno) +
               "): it exited or was killed (see its log)");
        }
        s.got += static_cast<size_t>(got);
        s.last = Clock::now();
        if (!s.have_header && s.got == sizeof(FrameHeader)) {
          s.have_header = true;
          s.got = 0;
          if (s.h.magic != kFrameMagic) {
            link_unusable_[r] = true;
            fail("protocol error: " + name(r) + " sent a malformed frame during " + op_);
          }
          const auto t = static_cast<MsgType>(s.h.type);
          if (t == MsgType::abort) handle_abort_notice(static_cast<int>(s.h.arg), static_cast<int>(s.h.total));
          if (t == MsgType::bye)
            fail(name(r) + " closed its communicator while rank 0 was in " + op_ +
                 ": it finished early, or the ranks called different sequences of collectives");
          if (t != type)
            fail("collective mismatch: " + name(r) + " called " + msg_type_name(t) + " while rank 0 called " +
                 op_ + ": every rank must call the same collectives in the same order");
          s.dest = accept(r, s.h);
          if (s.dest.size() != s.h.length)
            fail("collective mismatch in " + op_ + ": " + name(r) + " sent " + std::to_string(s.h.length) +
                 " bytes, rank 0 expected " + std::to_string(s.dest.size()));
        }
        if (s.have_header && s.got == s.dest.size()) {
          s.done = true;
          --left;
        }
      }
    }
  }
}

void TcpCommunicator::reply(int r, uint64_t arg, std::span<const std::byte> payload) {
  const IoResult io = send_frame(links_[r].fd(), make_header(MsgType::result, arg, 0, payload.size()),
                                 payload, timeout_);
  if (io.status == Io::ok) return;
  link_unusable_[r] = true;
  if (io.status == Io::timeout)
    fail(name(r) + " took no data from rank 0 for " + secs(timeout_) + " during " + op_ +
         " (collective_timeout): it is hung");
  fail(name(r) + " disconnected during " + op_ + " (" + io.describe() + "): it exited or was killed (see its log)");
}

// ---- other ranks ----

void TcpCommunicator::send_to_root(MsgType type, uint64_t arg, uint64_t total,
                                   std::span<const std::byte> payload) {
  const IoResult io = send_frame(links_[0].fd(), make_header(type, arg, total, payload.size()), payload,
                                 peer_timeout_, /*stop_on_incoming=*/true);
  if (io.status == Io::ok) return;
  if (io.status == Io::timeout)
    fail_here(name(0) + " took no data for " + secs(peer_timeout_) + " during " + op_ +
              " (collective_timeout): rank 0 is hung or waits on a hung rank");
  // Rank 0 wrote to us (an error or abort notice) or went away: read what it left.
  handle_unexpected_from_root(io.status == Io::incoming ? peer_timeout_ : std::chrono::milliseconds(1000));
}

void TcpCommunicator::handle_unexpected_from_root(std::chrono::milliseconds idle) {
  FrameHeader h;
  const IoResult io = recv_all(links_[0].fd(), std::as_writable_bytes(std::span(&h, 1)), idle);
  if (io.status == Io::timeout && idle >= peer_timeout_)
    fail_here("no answer from " + name(0) + " for " + secs(peer_timeout_) + " during " + op_ +
              " (collective_timeout): rank 0 is hung or waits on a hung rank");
  if (io.status != Io::ok)
    fail_here(name(0) + " disconnected during " + op_ + ": it exited or was killed (see its log)");
  handle_control_from_root(h);
}

void TcpCommunicator::handle_control_from_root(const FrameHeader& h) {
  if (h.magic != kFrameMagic) fail_here("protocol error: malformed frame from rank 0 during " + op_);
  switch (static_cast<MsgType>(h.type)) {
    case MsgType::abort:
      handle_abort_notice(static_cast<int>(h.arg), static_cast<int>(h.total));
    case MsgType::error: {
      std::string text(std::min<uint64_t>(h.length, 1 << 20), '\0');
      if (h.length > text.size() ||
          recv_all(links_[0].fd(), std::as_writable_bytes(std::span(text)), std::chrono::seconds(5)).status != Io::ok)
        fail_here(name(0) + " reported an error during " + op_ + " but the message was lost");
      fail_here(text);
    }
    case MsgType::bye:
      fail_here(name(0) + " closed its communicator while this rank was in " + op_ +
                ": it finished early, or the ranks called different sequences of collectives");
    default:
      fail_here(std::string("protocol error: unexpected ") + msg_type_name(static_cast<MsgType>(h.type)) +
                " frame from rank 0 during " + op_);
  }
}

void TcpCommunicator::recv_from_root(const Accept& accept) {
  const int fd = links_[0].fd();
  FrameHeader h;
  // Only the header's wait is long (rank 0 may be waiting on other ranks); once rank 0 answers,
  // the payload streams.
  handle_unexpected_status(recv_all(fd, std::as_writable_bytes(std::span(&h, 1)), peer_timeout_));
  if (h.magic != kFrameMagic || static_cast<MsgType>(h.type) != MsgType::result) handle_control_from_root(h);
  const std::span<std::byte> dest = accept(h);
  if (dest.size() != h.length)
    fail_here("protocol error in " + op_ + ": rank 0 sent " + std::to_string(h.length) + " bytes, expected " +
              std::to_string(dest.size()));
  handle_unexpected_status(recv_all(fd, dest, peer_timeout_));
}

void TcpCommunicator::handle_unexpected_status(const IoResult& io) {
  if (io.status == Io::ok) return;
  if (io.status == Io::timeout)
    fail_here("no answer from " + name(0) + " for " + secs(peer_timeout_) + " during " + op_ +
              " (collective_timeout): rank 0 is hung or waits on a hung rank");
  fail_here(name(0) + " disconnected during " + op_ + " (" + io.describe() +
            "): it exited or was killed (see its log)");
}

// ---- collectives ----

template <class T>
void TcpCommunicator::reduce_sum(MsgType type, std::span<const T> in, std::span<T> out,
                                 const std::function<ShardRange(int)>& want) {
  check_usable();
  op_ = msg_type_name(type);
  const size_t n = in.size();
  // Chunks bound rank 0's memory to (size - 1) chunks; at least one chunk so sizes are checked.
  const size_t chunk_bytes = std::clamp<size_t>((size_t{64} << 20) / size(), 256 << 10, 4 << 20);
  const size_t c = chunk_bytes / sizeof(T);
  const size_t chunks = std::max<size_t>(1, (n + c - 1) / c);
  const ShardRange mine = want(rank());
  std::vector<std::vector<T>> bufs(is_root() ? size() : 0);
  std::vector<T> acc;
  for (size_t k = 0; k < chunks; ++k) {
    const ShardRange ch{std::min(n, k * c), std::min(n, (k + 1) * c)};
    const auto chunk_in = in.subspan(ch.begin, ch.size());
    const ShardRange my_part = intersect(ch, mine);
    const auto my_out = my_part.size() ? out.subspan(my_part.begin - mine.begin, my_part.size()) : std::span<T>();
    if (!is_root()) {
      send_to_root(type, k, n, std::as_bytes(chunk_in));
      recv_from_root([&](const FrameHeader&) { return writable_bytes(my_out); });
      continue;
    }
    gather(type, [&](int r, const FrameHeader& h) {
      if (h.total != n)
        fail("collective mismatch: " + name(r) + " called " + op_ + " with " + std::to_string(h.total) +
             " elements, rank 0 with " + std::to_string(n));
      if (h.arg != k) fail("protocol error: " + name(r) + " sent chunk " + std::to_string(h.arg) + " of " + op_);
      bufs[r].resize(ch.size());
      return writable_bytes(std::span<T>(bufs[r]));
    });
    // The fixed order: rank 0's values, plus rank 1's, plus rank 2's ...
    acc.assign(chunk_in.begin(), chunk_in.end());
    for (int r = 1; r < size(); ++r)
      for (size_t i = 0; i < acc.size(); ++i) acc[i] += bufs[r][i];
    for (int r = 1; r < size(); ++r) {
      const ShardRange part = intersect(ch, want(r));
      reply(r, k, std::as_bytes(std::span<const T>(acc.data() + (part.begin - ch.begin), part.size())));
    }
    std::copy(acc.begin() + (my_part.begin - ch.begin), acc.begin() + (my_part.end - ch.begin), my_out.begin());
  }
}

void TcpCommunicator::all_reduce_sum(std::span<float> data) {
  const ShardRange all{0, data.size()};
  reduce_sum<float>(MsgType::all_reduce_f32, data, data, [&](int) { return all; });
}

void TcpCommunicator::all_reduce_sum(std::span<double> data) {
  const ShardRange all{0, data.size()};
  reduce_sum<double>(MsgType::all_reduce_f64, data, data, [&](int) { return all; });
}

void TcpCommunicator::reduce_scatter_sum(std::span<const float> data, std::span<float> shard) {
  const size_t n = data.size();
  if (shard.size() != shard_range(n, rank(), size()).size())
    throw std::invalid_argument("reduce_scatter_sum: shard holds " + std::to_string(shard.size()) +
                                " elements, rank's shard_range has " +
                                std::to_string(shard_range(n, rank(), size()).size()));
  reduce_sum<float>(MsgType::reduce_scatter, data, shard, [&](int r) { return shard_range(n, r, size()); });
}

void TcpCommunicator::all_gather(std::span<const float> shard, std::span<float> full) {
  const size_t n = full.size();
  const ShardRange mine = shard_range(n, rank(), size());
  if (shard.size() != mine.size())
    throw std::invalid_argument("all_gather: shard holds " + std::to_string(shard.size()) +
                                " elements, rank's shard_range has " + std::to_string(mine.size()));
  check_usable();
  op_ = "all_gather";
  if (!is_root()) {
    send_to_root(MsgType::all_gather, 0, n, std::as_bytes(shard));
    recv_from_root([&](const FrameHeader&) { return writable_bytes(full); });
    return;
  }
  if (shard.data() != full.data() + mine.begin)  // own shard first: peers write elsewhere
    std::memmove(full.data() + mine.begin, shard.data(), shard.size_bytes());
  gather(MsgType::all_gather, [&](int r, const FrameHeader& h) {
    if (h.total != n)
      fail("collective mismatch: " + name(r) + " called all_gather for " + std::to_string(h.total) +
           " elements, rank 0 for " + std::to_string(n));
    const ShardRange s = shard_range(n, r, size());
    return writable_bytes(full.subspan(s.begin, s.size()));
  });
  for (int r = 1; r < size(); ++r) reply(r, 0, std::as_bytes(std::span<const float>(full)));
}

void TcpCommunicator::broadcast(std::span<std::byte> data, int root) {
  if (root < 0 || root >= size())
    throw std::invalid_argument("broadcast: root " + std::to_string(root) + " out of range");
  check_usable();
  op_ = "broadcast";
  const size_t n = data.size();
  if (!is_root()) {
    send_to_root(MsgType::broadcast, root, n, rank() == root ? std::span<const std::byte>(data) : std::span<const std::byte>());
    recv_from_root([&](const FrameHeader&) { return rank() == root ? std::span<std::byte>() : data; });
    return;
  }
  gather(MsgType::broadcast, [&](int r, const FrameHeader& h) {
    if (h.arg != static_cast<uint64_t>(root) || h.total != n)
      fail("collective mismatch: " + name(r) + " called broadcast of " + std::to_string(h.total) +
           " bytes from rank " + std::to_string(h.arg) + ", rank 0 of " + std::to_string(n) +
           " bytes from rank " + std::to_string(root));
    return r == root ? data : std::span<std::byte>();
  });
  for (int r = 1; r < size(); ++r) reply(r, 0, r == root ? std::span<const std::byte>() : std::span<const std::byte>(data));
}

std::vector<std::string> TcpCommunicator::all_gather_strings(const std::string& mine) {
  check_usable();
  op_ = "all_gather_strings";
  if (!is_root()) {
    send_to_root(MsgType::strings, 0, 0, std::as_bytes(std::span(mine)));
    std::vector<std::byte> packed;
    recv_from_root([&](const FrameHeader& h) {
      packed.resize(h.length);
      return std::span<std::byte>(packed);
    });
    ByteReader rd(packed);
    std::vector<std::string> all(rd.u64());
    for (auto& s : all) s = rd.str();
    return all;
  }
  std::vector<std::string> all(size());
  all[0] = mine;
  gather(MsgType::strings, [&](int r, const FrameHeader& h) {
    all[r].resize(h.length);
    return std::as_writable_bytes(std::span(all[r]));
  });
  ByteWriter w;
  w.u64(all.size());
  for (const auto& s : all) w.str(s);
  for (int r = 1; r < size(); ++r) reply(r, 0, w.bytes());
  return all;
}

void TcpCommunicator::barrier() {
  check_usable();
  op_ = "barrier";
  if (!is_root()) {
    send_to_root(MsgType::barrier, 0, 0, {});
    recv_from_root([](const FrameHeader&) { return std::span<std::byte>(); });
    return;
  }
  gather(MsgType::barrier, [](int, const FrameHeader&) { return std::span<std::byte>(); });
  for (int r = 1; r < size(); ++r) reply(r, 0, {});
}

}  // namespace ftune::dist
