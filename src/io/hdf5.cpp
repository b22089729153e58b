// RAII HDF5 handles and typed reads/writes for the checkpoint files.
#include "ftune/io/hdf5.hpp"

#include <algorithm>
#include <filesystem>

namespace ftune::h5 {
namespace {

// HDF5 prints its error stack to stderr by default; we report errors as exceptions instead.
// Called before every file open/create (cheap), so it also holds on threads that never
// called it before in a thread-safe HDF5 build, where the setting is per thread.
void silence_error_printing() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

herr_t innermost_error(unsigned n, const H5E_error2_t* e, void* out) {
  // Walking upward, the first record is the most specific one (e.g. "unable to open file").
  auto* msg = static_cast<std::string*>(out);
  if (n == 0 && e->desc) *msg = std::string(e->func_name) + ": " + e->desc;
  return 0;
}

PropList file_access_props() {
  PropList fapl(FTUNE_H5_CHECK(H5Pcreate(H5P_FILE_ACCESS)));
#if H5_VERSION_GE(1, 10, 7)
  // Keep HDF5's file locks, but do not fail on file systems without flock (some Lustre/NFS
  // mounts); ranks never open a file for writing while another reads it.
  FTUNE_H5_CHECK(H5Pset_file_locking(fapl.get(), true, true));
#endif
  return fapl;
}

Datatype string_type(size_t length) {
  Datatype t(FTUNE_H5_CHECK(H5Tcopy(H5T_C_S1)));
  // HDF5 does not allow a zero-sized string type: "" is stored as one NUL byte.
  FTUNE_H5_CHECK(H5Tset_size(t.get(), std::max<size_t>(length, 1)));
  FTUNE_H5_CHECK(H5Tset_strpad(t.get(), H5T_STR_NULLPAD));
  FTUNE_H5_CHECK(H5Tset_cset(t.get(), H5T_CSET_UTF8));
  return t;
}

// Reads a string stored with file type `type` through `read(memtype, buffer)`.
template <class ReadFn>
std::string read_string(hid_t type, ReadFn read) {
  if (H5Tget_class(type) != H5T_STRING) throw Error("expected a string, found another type");
  if (FTUNE_H5_CHECK(H5Tis_variable_str(type)) > 0) {
    Datatype mem(FTUNE_H5_CHECK(H5Tcopy(H5T_C_S1)));
    FTUNE_H5_CHECK(H5Tset_size(mem.get(), H5T_VARIABLE));
    char* p = nullptr;
    read(mem.get(), static_cast<void*>(&p));
    std::string s = p ? p : "";
    if (p) H5free_memory(p);
    return s;
  }
  const size_t size = H5Tget_size(type);
  if (size == 0) throw Error("string type of size 0");
  std::string buf(size, '\0');
  read(type, static_cast<void*>(buf.data()));
  buf.resize(std::min(buf.find('\0'), buf.size()));  // null-padded or null-terminated
  return buf;
}

Attribute open_attr(hid_t obj, const std::string& name) {
  if (!has_attr(obj, name)) throw Error("missing attribute '" + name + "'");
  return Attribute(FTUNE_H5_CHECK(H5Aopen(obj, name.c_str(), H5P_DEFAULT)));
}

void write_scalar_attr(hid_t obj, const std::string& name, hid_t file_type, hid_t mem_type,
                       const void* v) {
  if (has_attr(obj, name)) FTUNE_H5_CHECK(H5Adelete(obj, name.c_str()));
  Dataspace space(FTUNE_H5_CHECK(H5Screate(H5S_SCALAR)));
  Attribute a(FTUNE_H5_CHECK(
      H5Acreate2(obj, name.c_str(), file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT)));
  FTUNE_H5_CHECK(H5Awrite(a.get(), mem_type, v));
}

void read_scalar_attr(hid_t obj, const std::string& name, hid_t mem_type, void* out) {
  Attribute a = open_attr(obj, name);
  Dataspace space(FTUNE_H5_CHECK(H5Aget_space(a.get())));
  if (FTUNE_H5_CHECK(H5Sget_simple_extent_npoints(space.get())) != 1)
    throw Error("attribute '" + name + "' is not a scalar");
  FTUNE_H5_CHECK(H5Aread(a.get(), mem_type, out));
}

void write_numeric(hid_t parent, const std::string& name, hid_t file_type, hid_t mem_type,
                   const void* data, const std::vector<hsize_t>& dims) {
  Dataspace space(
      FTUNE_H5_CHECK(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr)));
  Dataset d(FTUNE_H5_CHECK(H5Dcreate2(parent, name.c_str(), file_type, space.get(), H5P_DEFAULT,
                                      H5P_DEFAULT, H5P_DEFAULT)));
  if (FTUNE_H5_CHECK(H5Sget_simple_extent_npoints(space.get())) > 0)  // nothing to write if 0
    FTUNE_H5_CHECK(H5Dwrite(d.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data));
}

void read_numeric(hid_t dataset, hid_t mem_type, void* out, size_t n) {
  Dataspace space(FTUNE_H5_CHECK(H5Dget_space(dataset)));
  const auto have = static_cast<size_t>(FTUNE_H5_CHECK(H5Sget_simple_extent_npoints(space.get())));
  if (have != n)
    throw Error("dataset holds " + std::to_string(have) + " values, expected " + std::to_string(n));
  if (n > 0) FTUNE_H5_CHECK(H5Dread(dataset, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out));
}

}  // namespace

[[noreturn]] void fail(const char* call, const char* file, int line) {
  std::string detail;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, innermost_error, &detail);
  H5Eclear2(H5E_DEFAULT);
  std::string where = std::filesystem::path(file).filename().string() + ":" + std::to_string(line);
  throw Error(std::string(call) + " failed at " + where +
              (detail.empty() ? "" : " (" + detail + ")"));
}

void File::close() {
  if (h_.get() < 0) return;
  FTUNE_H5_CHECK(H5Fflush(h_.get(), H5F_SCOPE_LOCAL));
  FTUNE_H5_CHECK(H5Fclose(h_.release()));
}

File create_file(const std::string& path) {
  silence_error_printing();
  PropList fapl = file_access_props();
  return File(FTUNE_H5_CHECK(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get())));
}

File open_file(const std::string& path) {
  silence_error_printing();
  if (!std::filesystem::is_regular_file(path)) throw Error("no such file");
  PropList fapl = file_access_props();
  return File(FTUNE_H5_CHECK(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get())));
}

Group create_group(hid_t parent, const std::string& name) {
  return Group(
      FTUNE_H5_CHECK(H5Gcreate2(parent, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)));
}

Group open_group(hid_t parent, const std::string& name) {
  if (!has_link(parent, name)) throw Error("missing group '" + name + "'");
  return Group(FTUNE_H5_CHECK(H5Gopen2(parent, name.c_str(), H5P_DEFAULT)));
}

bool has_link(hid_t parent, const std::string& name) {
  return FTUNE_H5_CHECK(H5Lexists(parent, name.c_str(), H5P_DEFAULT)) > 0;
}

hsize_t num_links(hid_t group) {
  H5G_info_t info;
  FTUNE_H5_CHECK(H5Gget_info(group, &info));
  return info.nlinks;
}

bool has_attr(hid_t obj, const std::string& name) {
  return FTUNE_H5_CHECK(H5Aexists(obj, name.c_str())) > 0;
}

void write_attr_i64(hid_t obj, const std::string& name, int64_t v) {
  write_scalar_attr(obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v);
}
void write_attr_u64(hid_t obj, const std::string& name, uint64_t v) {
  write_scalar_attr(obj, name, H5T_STD_U64LE, H5T_NATIVE_UINT64, &v);
}
void write_attr_f64(hid_t obj, const std::string& name, double v) {
  write_scalar_attr(obj, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v);
}
void write_attr_str(hid_t obj, const std::string& name, const std::string& v) {
  Datatype t = string_type(v.size());
  std::string buf = v;
  buf.resize(std::max<size_t>(v.size(), 1), '\0');
  write_scalar_attr(obj, name, t.get(), t.get(), buf.data());
}

int64_t read_attr_i64(hid_t obj, const std::string& name) {
  int64_t v = 0;
  read_scalar_attr(obj, name, H5T_NATIVE_INT64, &v);
  return v;
}
uint64_t read_attr_u64(hid_t obj, const std::string& name) {
  uint64_t v = 0;
  read_scalar_attr(obj, name, H5T_NATIVE_UINT64, &v);
  return v;
}
double read_attr_f64(hid_t obj, const std::string& name) {
  double v = 0;
  read_scalar_attr(obj, name, H5T_NATIVE_DOUBLE, &v);
  return v;
}
std::string read_attr_str(hid_t obj, const std::string& name) {
  Attribute a = open_attr(obj, name);
  Datatype t(FTUNE_H5_CHECK(H5Aget_type(a.get())));
  try {
    return read_string(t.get(),
                       [&](hid_t mem, void* buf) { FTUNE_H5_CHECK(H5Aread(a.get(), mem, buf)); });
  } catch (const Error& e) {
    throw Error("attribute '" + name + "': " + e.what());
  }
}

void write_f32(hid_t parent, const std::string& name, const float* data,
               const std::vector<hsize_t>& dims) {
  write_numeric(parent, name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, data, dims);
}
void write_f64(hid_t parent, const std::string& name, const double* data,
               const std::vector<hsize_t>& dims) {
  write_numeric(parent, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, data, dims);
}

void write_string_dataset(hid_t parent, const std::string& name, const std::string& v) {
  Datatype t = string_type(v.size());
  std::string buf = v;
  buf.resize(std::max<size_t>(v.size(), 1), '\0');
  Dataspace space(FTUNE_H5_CHECK(H5Screate(H5S_SCALAR)));
  Dataset d(FTUNE_H5_CHECK(H5Dcreate2(parent, name.c_str(), t.get(), space.get(), H5P_DEFAULT,
                                      H5P_DEFAULT, H5P_DEFAULT)));
  FTUNE_H5_CHECK(H5Dwrite(d.get(), t.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()));
}

Dataset open_dataset(hid_t parent, const std::string& name) {
  if (!has_link(parent, name)) throw Error("missing dataset '" + name + "'");
  return Dataset(FTUNE_H5_CHECK(H5Dopen2(parent, name.c_str(), H5P_DEFAULT)));
}

std::vector<hsize_t> dataset_shape(hid_t dataset) {
  Dataspace space(FTUNE_H5_CHECK(H5Dget_space(dataset)));
  const int rank = FTUNE_H5_CHECK(H5Sget_simple_extent_ndims(space.get()));
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  FTUNE_H5_CHECK(H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr));
  return dims;
}

void read_f32(hid_t dataset, float* out, size_t n) {
  read_numeric(dataset, H5T_NATIVE_FLOAT, out, n);
}
void read_f64(hid_t dataset, double* out, size_t n) {
  read_numeric(dataset, H5T_NATIVE_DOUBLE, out, n);
}

void read_f32_range(hid_t dataset, hsize_t offset, hsize_t count, float* out) {
  if (count == 0) return;
  Dataspace file_space(FTUNE_H5_CHECK(H5Dget_space(dataset)));
  FTUNE_H5_CHECK(
      H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, &offset, nullptr, &count, nullptr));
  Dataspace mem_space(FTUNE_H5_CHECK(H5Screate_simple(1, &count, nullptr)));
  FTUNE_H5_CHECK(
      H5Dread(dataset, H5T_NATIVE_FLOAT, mem_space.get(), file_space.get(), H5P_DEFAULT, out));
}

std::string read_string_dataset(hid_t dataset) {
  Datatype t(FTUNE_H5_CHECK(H5Dget_type(dataset)));
  return read_string(t.get(), [&](hid_t mem, void* buf) {
    FTUNE_H5_CHECK(H5Dread(dataset, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf));
  });
}

}  // namespace ftune::h5
