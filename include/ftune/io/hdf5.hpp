#pragma once
// io module: RAII owners for HDF5 handles, one error macro, and the few typed reads and
// writes that checkpoints and dataset caches need. HDF5's own error-stack printing is
// silenced; every failure becomes an h5::Error naming the call, source file and line (callers
// add the file path they were working on).
#include <hdf5.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace ftune::h5 {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Throws Error with the call text, where it was made and HDF5's innermost error message.
[[noreturn]] void fail(const char* call, const char* file, int line);

// HDF5 calls return a negative hid_t / herr_t / htri_t on failure.
template <class T>
T check(T v, const char* call, const char* file, int line) {
  if (v < 0) fail(call, file, line);
  return v;
}
#define FTUNE_H5_CHECK(call) ::ftune::h5::check((call), #call, __FILE__, __LINE__)

// Unique owner of one HDF5 identifier, closed with Close on destruction.
template <herr_t (*Close)(hid_t)>
class Handle {
 public:
  Handle() = default;
  explicit Handle(hid_t id) : id_(id) {}
  ~Handle() { reset(); }
  Handle(Handle&& o) noexcept : id_(std::exchange(o.id_, H5I_INVALID_HID)) {}
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = std::exchange(o.id_, H5I_INVALID_HID);
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  hid_t get() const { return id_; }
  hid_t release() { return std::exchange(id_, H5I_INVALID_HID); }
  void reset() {
    // A close failure in a destructor cannot be reported; errors that matter (a failed
    // flush of a written file) surface through File::close() below.
    if (id_ >= 0) Close(id_);
    id_ = H5I_INVALID_HID;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
};

using Group = Handle<H5Gclose>;
using Dataset = Handle<H5Dclose>;
using Dataspace = Handle<H5Sclose>;
using Attribute = Handle<H5Aclose>;
using Datatype = Handle<H5Tclose>;
using PropList = Handle<H5Pclose>;

// A file handle whose close() reports errors (the final flush of a written file happens there).
class File {
 public:
  explicit File(hid_t id) : h_(id) {}
  hid_t get() const { return h_.get(); }
  void close();

 private:
  Handle<H5Fclose> h_;
};

File create_file(const std::string& path);  // truncates an existing file
File open_file(const std::string& path);    // read-only

Group create_group(hid_t parent, const std::string& name);
Group open_group(hid_t parent, const std::string& name);
bool has_link(hid_t parent, const std::string& name);
hsize_t num_links(hid_t group);

// Attributes on a file, group or dataset. Strings are fixed-length UTF-8 (see below).
bool has_attr(hid_t obj, const std::string& name);
void write_attr_i64(hid_t obj, const std::string& name, int64_t v);
void write_attr_u64(hid_t obj, const std::string& name, uint64_t v);
void write_attr_f64(hid_t obj, const std::string& name, double v);
void write_attr_str(hid_t obj, const std::string& name, const std::string& v);
int64_t read_attr_i64(hid_t obj, const std::string& name);
uint64_t read_attr_u64(hid_t obj, const std::string& name);
double read_attr_f64(hid_t obj, const std::string& name);
std::string read_attr_str(hid_t obj, const std::string& name);

// Contiguous little-endian datasets of the given shape (a zero-sized shape is allowed).
void write_f32(hid_t parent, const std::string& name, const float* data,
               const std::vector<hsize_t>& dims);
void write_f64(hid_t parent, const std::string& name, const double* data,
               const std::vector<hsize_t>& dims);
// A 0-d dataset holding one fixed-length string (a dataset, not an attribute, because
// attributes are limited to 64 KiB and metrics logs grow past that).
void write_string_dataset(hid_t parent, const std::string& name, const std::string& v);

Dataset open_dataset(hid_t parent, const std::string& name);
std::vector<hsize_t> dataset_shape(hid_t dataset);
// Reads the whole dataset, which must hold exactly n values.
void read_f32(hid_t dataset, float* out, size_t n);
void read_f64(hid_t dataset, double* out, size_t n);
// Reads values [offset, offset + count) of a 1-D float dataset.
void read_f32_range(hid_t dataset, hsize_t offset, hsize_t count, float* out);
// Fixed-length or variable-length strings (the latter as h5py writes them).
std::string read_string_dataset(hid_t dataset);

}  // namespace ftune::h5
