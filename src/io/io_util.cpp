#include "io_util.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace fs = std::filesystem;

namespace ftune::io {

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) ::close(fd_);
}

AtomicFileWriter::AtomicFileWriter(const std::string& path)
    : path_(path), tmp_(path + ".tmp"),
      fd_(::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) {
  if (fd_.get() < 0)
    throw std::runtime_error("cannot create " + tmp_ + ": " + std::strerror(errno));
}

AtomicFileWriter::~AtomicFileWriter() {
  if (!committed_) ::unlink(tmp_.c_str());
}

void AtomicFileWriter::write(const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    // Linux caps one write() near 2 GiB; loop for large tensors and partial writes.
    const ssize_t n = ::write(fd_.get(), p, bytes < (1u << 30) ? bytes : (1u << 30));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error("write " + tmp_ + ": " + std::strerror(errno));
    }
    p += n;
    bytes -= static_cast<size_t>(n);
  }
}

void AtomicFileWriter::commit() {
  if (::fsync(fd_.get()) != 0)
    throw std::runtime_error("fsync " + tmp_ + ": " + std::strerror(errno));
  if (::close(fd_.release()) != 0)
    throw std::runtime_error("close " + tmp_ + ": " + std::strerror(errno));
  if (::rename(tmp_.c_str(), path_.c_str()) != 0)
    throw std::runtime_error("rename " + tmp_ + " -> " + path_ + ": " + std::strerror(errno));
  committed_ = true;
  fs::path parent = fs::path(path_).parent_path();
  fsync_dir(parent.empty() ? "." : parent.string());
}

void write_text_atomic(const std::string& path, const std::string& text) {
  AtomicFileWriter w(path);
  w.write(text.data(), text.size());
  w.commit();
}

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(path + ": invalid JSON: " + e.what());
  }
}

void fsync_dir(const std::string& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() >= 0) ::fsync(fd.get());
}

}  // namespace ftune::io
