#pragma once
// TCP plumbing of the env launcher: an fd owner, the frame format, and reads/writes that
// never block past a deadline (poll on non-blocking sockets).
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace ftune::dist {

using Clock = std::chrono::steady_clock;

// Owns a socket (or any fd) and closes it when destroyed.
class Socket {
 public:
  Socket() = default;
  explicit Socket(int fd) : fd_(fd) {}
  Socket(Socket&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Socket& operator=(Socket&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  ~Socket() { reset(); }
  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void reset();

 private:
  int fd_ = -1;
};

// Every message is one frame: a fixed header, then `length` payload bytes. All ranks run the
// same build on the same architecture, so the header travels in native byte order; the
// magic catches strangers and other protocol versions.
enum class MsgType : uint32_t {
  hello = 1, welcome, error, abort, bye,  // control
  all_reduce_f32, all_reduce_f64, reduce_scatter, all_gather, broadcast, strings, barrier,
  result,  // rank 0's answer to any collective
};
const char* msg_type_name(MsgType t);

struct FrameHeader {
  uint32_t magic = 0;
  uint32_t type = 0;
  uint64_t arg = 0;     // chunk index, broadcast root, abort origin rank ...
  uint64_t total = 0;   // element count of the whole collective (mismatch checks), abort code
  uint64_t length = 0;  // payload bytes that follow
};
static_assert(sizeof(FrameHeader) == 32);
inline constexpr uint32_t kFrameMagic = 0x31555446;  // "FTU1"

FrameHeader make_header(MsgType t, uint64_t arg, uint64_t total, uint64_t length);

enum class Io { ok, closed, timeout, error, incoming };
struct IoResult {
  Io status = Io::ok;
  int err = 0;  // errno for Io::error
  std::string describe() const;
};

// Writes all of `bytes`, waiting at most `idle` without progress. With stop_on_incoming, returns
// Io::incoming as soon as the socket is readable (the peer sent an error or abort notice).
IoResult send_all(int fd, std::span<const std::byte> bytes, std::chrono::milliseconds idle,
                  bool stop_on_incoming = false);
// Reads exactly buf.size() bytes, waiting at most `idle` without progress.
IoResult recv_all(int fd, std::span<std::byte> buf, std::chrono::milliseconds idle);
// Header then payload, as one frame.
IoResult send_frame(int fd, const FrameHeader& h, std::span<const std::byte> payload,
                    std::chrono::milliseconds idle, bool stop_on_incoming = false);

template <class T>
std::span<const std::byte> bytes_of(std::span<const T> s) {
  return std::as_bytes(s);
}

// Little serializer for control payloads (hello, welcome, string lists).
class ByteWriter {
 public:
  void u64(uint64_t v);
  void str(const std::string& s);
  const std::vector<std::byte>& bytes() const { return buf_; }

 private:
  std::vector<std::byte> buf_;
};
class ByteReader {
 public:
  explicit ByteReader(std::span<const std::byte> b) : b_(b) {}
  uint64_t u64();
  std::string str();

 private:
  std::span<const std::byte> b_;
  size_t pos_ = 0;
};

void set_nonblocking(int fd);
// TCP_NODELAY (collectives are request/response) and keep-alive (a vanished host is noticed
// even while the connection is idle).
void tune_socket(int fd);

// Rank 0's listening socket on host:port (SO_REUSEADDR). Throws with advice on failure.
Socket listen_on(const std::string& host, int port);
// Accepts one pending connection (non-blocking listener); invalid Socket if none.
Socket accept_one(int listen_fd, std::string* peer_addr);
// One connection attempt within `limit`; on failure returns an invalid Socket and sets *why.
Socket try_connect(const std::string& host, int port, std::chrono::milliseconds limit, std::string* why);

}  // namespace ftune::dist
