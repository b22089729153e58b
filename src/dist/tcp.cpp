#include "tcp.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace ftune::dist {

void Socket::reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

const char* msg_type_name(MsgType t) {
  switch (t) {
    case MsgType::hello: return "hello";
    case MsgType::welcome: return "welcome";
    case MsgType::error: return "error";
    case MsgType::abort: return "abort";
    case MsgType::bye: return "bye";
    case MsgType::all_reduce_f32: return "all_reduce_sum(float)";
    case MsgType::all_reduce_f64: return "all_reduce_sum(double)";
    case MsgType::reduce_scatter: return "reduce_scatter_sum";
    case MsgType::all_gather: return "all_gather";
    case MsgType::broadcast: return "broadcast";
    case MsgType::strings: return "all_gather_strings";
    case MsgType::barrier: return "barrier";
    case MsgType::result: return "result";
  }
  return "unknown message";
}

FrameHeader make_header(MsgType t, uint64_t arg, uint64_t total, uint64_t length) {
  FrameHeader h;
  h.magic = kFrameMagic;
  h.type = static_cast<uint32_t>(t);
  h.arg = arg;
  h.total = total;
  h.length = length;
  return h;
}

std::string IoResult::describe() const {
  switch (status) {
    case Io::ok: return "ok";
    case Io::closed: return "connection closed";
    case Io::timeout: return "timed out";
    case Io::incoming: return "unexpected incoming data";
    case Io::error: return std::strerror(err);
  }
  return "?";
}

namespace {

// Waits for `events` on fd until `last_progress + idle`; returns revents, 0 on timeout.
short wait_for(int fd, short events, Clock::time_point last_progress, std::chrono::milliseconds idle) {
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(last_progress + idle - Clock::now());
    if (left.count() <= 0) return 0;
    pollfd p{fd, events, 0};
    const int rc = ::poll(&p, 1, static_cast<int>(std::min<long long>(left.count(), 1 << 30)));
    if (rc > 0) return p.revents ? p.revents : events;
    if (rc < 0 && errno != EINTR) return POLLERR;
  }
}

bool is_disconnect(int e) { return e == EPIPE || e == ECONNRESET || e == ENOTCONN || e == ECONNABORTED; }

}  // namespace

IoResult send_all(int fd, std::span<const std::byte> bytes, std::chrono::milliseconds idle,
                  bool stop_on_incoming) {
  size_t done = 0;
  auto last = Clock::now();
  while (done < bytes.size()) {
    const short ev = wait_for(fd, static_cast<short>(POLLOUT | (stop_on_incoming ? POLLIN : 0)), last, idle);
    if (ev == 0) return {Io::timeout};
    if (stop_on_incoming && (ev & POLLIN)) return {Io::incoming};
    const ssize_t n = ::send(fd, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      done += static_cast<size_t>(n);
      last = Clock::now();
    } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      return is_disconnect(errno) ? IoResult{Io::closed} : IoResult{Io::error, errno};
    }
  }
  return {};
}

IoResult recv_all(int fd, std::span<std::byte> buf, std::chrono::milliseconds idle) {
  size_t done = 0;
  auto last = Clock::now();
  while (done < buf.size()) {
    if (wait_for(fd, POLLIN, last, idle) == 0) return {Io::timeout};
    const ssize_t n = ::recv(fd, buf.data() + done, buf.size() - done, MSG_DONTWAIT);
    if (n > 0) {
      done += static_cast<size_t>(n);
      last = Clock::now();
    } else if (n == 0) {
      return {Io::closed};
    } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      return is_disconnect(errno) ? IoResult{Io::closed} : IoResult{Io::error, errno};
    }
  }
  return {};
}

IoResult send_frame(int fd, const FrameHeader& h, std::span<const std::byte> payload,
                    std::chrono::milliseconds idle, bool stop_on_incoming) {
  IoResult r = send_all(fd, std::as_bytes(std::span<const FrameHeader>(&h, 1)), idle, stop_on_incoming);
  if (r.status != Io::ok || payload.empty()) return r;
  return send_all(fd, payload, idle, stop_on_incoming);
}

void ByteWriter::u64(uint64_t v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  buf_.insert(buf_.end(), p, p + sizeof v);
}
void ByteWriter::str(const std::string& s) {
  u64(s.size());
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  buf_.insert(buf_.end(), p, p + s.size());
}
uint64_t ByteReader::u64() {
  if (b_.size() - pos_ < sizeof(uint64_t)) throw std::runtime_error("malformed control message (truncated)");
  uint64_t v;
  std::memcpy(&v, b_.data() + pos_, sizeof v);
  pos_ += sizeof v;
  return v;
}
std::string ByteReader::str() {
  const uint64_t n = u64();
  if (b_.size() - pos_ < n) throw std::runtime_error("malformed control message (truncated string)");
  std::string s(reinterpret_cast<const char*>(b_.data() + pos_), n);
  pos_ += n;
  return s;
}

void set_nonblocking(int fd) { ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK); }

void tune_socket(int fd) {
  int one = 1, idle = 30, intvl = 5, cnt = 6;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
}

namespace {

struct AddrList {
  addrinfo* head = nullptr;
  AddrList(const AddrList&) = delete;
  AddrList& operator=(const AddrList&) = delete;
  AddrList(const char* host, int port, int flags, std::string* why) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = flags;
    const std::string p = std::to_string(port);
    const int rc = ::getaddrinfo(host, p.c_str(), &hints, &head);
    if (rc != 0) {
      head = nullptr;
      *why = std::string("cannot resolve '") + (host ? host : "*") + "': " + ::gai_strerror(rc);
    }
  }
  ~AddrList() {
    if (head) ::freeaddrinfo(head);
  }
};

bool is_loopback(const addrinfo* a) {
  if (a->ai_family == AF_INET)
    return (ntohl(reinterpret_cast<const sockaddr_in*>(a->ai_addr)->sin_addr.s_addr) >> 24) == 127;
  if (a->ai_family == AF_INET6)
    return IN6_IS_ADDR_LOOPBACK(&reinterpret_cast<const sockaddr_in6*>(a->ai_addr)->sin6_addr);
  return false;
}

bool is_numeric_or_localhost(const std::string& host) {
  in6_addr a6;
  in_addr a4;
  return host == "localhost" || ::inet_pton(AF_INET, host.c_str(), &a4) == 1 ||
         ::inet_pton(AF_INET6, host.c_str(), &a6) == 1;
}

}  // namespace

Socket listen_on(const std::string& host, int port) {
  std::string why;
  AddrList named(host.c_str(), port, 0, &why);
  if (!named.head) throw std::runtime_error("rank 0 cannot listen on MASTER_ADDR:MASTER_PORT: " + why);
  // A host name that resolves to loopback here (Debian's 127.0.1.1 line in /etc/hosts) is
  // reached through another address by the other nodes: listen on every interface then.
  bool all_loopback = true;
  for (addrinfo* a = named.head; a; a = a->ai_next) all_loopback = all_loopback && is_loopback(a);
  const bool wildcard = all_loopback && !is_numeric_or_localhost(host);
  AddrList any(nullptr, port, AI_PASSIVE, &why);
  const AddrList& list = wildcard ? any : named;
  int last_err = 0;
  for (addrinfo* a = list.head; a; a = a->ai_next) {
    Socket s(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol));
    if (!s.valid()) { last_err = errno; continue; }
    int one = 1;
    ::setsockopt(s.fd(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(s.fd(), a->ai_addr, a->ai_addrlen) == 0 && ::listen(s.fd(), 1024) == 0) return s;
    last_err = errno;
  }
  const std::string where = host + ":" + std::to_string(port);
  if (last_err == EADDRINUSE)
    throw std::runtime_error("rank 0 cannot listen on " + where + ": port " + std::to_string(port) +
                             " is already in use on this host (another job, or a previous run "
                             "still exiting): choose another MASTER_PORT" +
                             (std::getenv("TORCHELASTIC_RUN_ID")
                                  ? std::string(" (under PyTorch's torchrun, its agent holds MASTER_PORT: "
                                                "use tools/torchrun_multi_node_multi_gpu.sh instead)")
                                  : std::string()));
  if (last_err == EADDRNOTAVAIL)
    throw std::runtime_error("rank 0 cannot listen on " + where + ": MASTER_ADDR '" + host +
                             "' is not an address of this host: MASTER_ADDR must name the host "
                             "where rank 0 runs");
  throw std::runtime_error("rank 0 cannot listen on " + where + ": " + std::strerror(last_err));
}

Socket accept_one(int listen_fd, std::string* peer_addr) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  Socket s(::accept4(listen_fd, reinterpret_cast<sockaddr*>(&ss), &len, SOCK_CLOEXEC | SOCK_NONBLOCK));
  if (!s.valid()) return s;
  char host[NI_MAXHOST] = "?", serv[NI_MAXSERV] = "?";
  ::getnameinfo(reinterpret_cast<sockaddr*>(&ss), len, host, sizeof host, serv, sizeof serv,
                NI_NUMERICHOST | NI_NUMERICSERV);
  *peer_addr = std::string(host) + ":" + serv;
  tune_socket(s.fd());
  return s;
}

Socket try_connect(const std::string& host, int port, std::chrono::milliseconds limit, std::string* why) {
  AddrList list(host.c_str(), port, 0, why);
  const auto start = Clock::now();
  for (addrinfo* a = list.head; a; a = a->ai_next) {
    Socket s(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol));
    if (!s.valid()) { *why = std::strerror(errno); continue; }
    if (::connect(s.fd(), a->ai_addr, a->ai_addrlen) != 0) {
      if (errno != EINPROGRESS) { *why = std::strerror(errno); continue; }
      if (!(wait_for(s.fd(), POLLOUT, start, limit) & (POLLOUT | POLLERR | POLLHUP))) {
        *why = "connection attempt timed out";
        continue;
      }
      int err = 0;
      socklen_t len = sizeof err;
      ::getsockopt(s.fd(), SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) { *why = std::strerror(err); continue; }
    }
    tune_socket(s.fd());
    return s;
  }
  return Socket();
}

}  // namespace ftune::dist
