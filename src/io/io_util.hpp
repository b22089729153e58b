#pragma once
// Private helpers of the io module: file descriptors, atomic file writes, JSON files.
#include <string>

#include <nlohmann/json.hpp>

namespace ftune::io {

// Owns a POSIX file descriptor (closed on destruction).
class UniqueFd {
 public:
  explicit UniqueFd(int fd = -1) : fd_(fd) {}
  ~UniqueFd();
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  int get() const { return fd_; }
  int release() { int f = fd_; fd_ = -1; return f; }

 private:
  int fd_;
};

// Writes `path` atomically: data goes to path + ".tmp", commit() fsyncs it, renames it over
// `path` and fsyncs the directory. Without commit() the temp file is removed.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(const std::string& path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  void write(const void* data, size_t bytes);
  void commit();

 private:
  std::string path_, tmp_;
  UniqueFd fd_;
  bool committed_ = false;
};

void write_text_atomic(const std::string& path, const std::string& text);
// Parses a JSON file; errors name the file.
nlohmann::json read_json_file(const std::string& path);
// fsync of a directory, so a rename inside it is durable (best effort).
void fsync_dir(const std::string& dir);

}  // namespace ftune::io
