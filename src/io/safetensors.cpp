// safetensors reader (mmap) and writers (fp32 from memory; fp32 or bf16 streamed).
// Format: u64 little-endian header length N, N bytes of JSON
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the byte
// buffer the offsets index into.
#include "ftune/io/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <future>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "io_util.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace ftune {

static_assert(std::endian::native == std::endian::little,
              "safetensors is little-endian; this reader copies bytes as-is");

namespace {

// The safetensors reference implementation refuses headers above 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

size_t dtype_size(DType d) {
  switch (d) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: return 2;
    case DType::I8: case DType::U8: case DType::BOOL: return 1;
  }
  return 0;
}

bool parse_dtype(const std::string& s, DType* out) {
  static const std::pair<const char*, DType> kNames[] = {
      {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16}, {"F64", DType::F64},
      {"I64", DType::I64}, {"I32", DType::I32}, {"I8", DType::I8},     {"U8", DType::U8},
      {"BOOL", DType::BOOL}};
  for (const auto& [name, d] : kNames)
    if (s == name) { *out = d; return true; }
  return false;
}

// IEEE binary16 -> binary32, exact for every input (subnormals, inf, NaN payloads).
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24 is exactly representable as a normal float.
    float v = std::ldexp(static_cast<float>(mant), -24);
    bits = std::bit_cast<uint32_t>(v) | sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

int64_t shape_numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

}  // namespace

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F64: return "F64";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
  }
  return "?";
}

int64_t TensorInfo::numel() const { return shape_numel(shape); }

// ---------------------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  auto fail = [&](const std::string& what) -> std::runtime_error {
    return std::runtime_error("safetensors file " + path_ + ": " + what);
  };
  io::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) throw fail(std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw fail(std::string("fstat: ") + std::strerror(errno));
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) throw fail("truncated: " + std::to_string(file_size) + " bytes, no header");

  map_ = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw fail(std::string("mmap: ") + std::strerror(errno));
  }
  map_size_ = file_size;
  // The destructor does not run when a constructor throws: unmap by hand on error.
  try {
    const auto* bytes = static_cast<const uint8_t*>(map_);
    uint64_t header_len = 0;
    std::memcpy(&header_len, bytes, 8);
    if (header_len > kMaxHeaderBytes || header_len > file_size - 8)
      throw fail("header length " + std::to_string(header_len) + " is invalid for a file of " +
                 std::to_string(file_size) + " bytes (truncated or not safetensors)");
    data_ = bytes + 8 + header_len;
    const uint64_t data_len = file_size - 8 - header_len;

    json header;
    try {
      header = json::parse(bytes + 8, bytes + 8 + header_len);
    } catch (const json::exception& e) {
      throw fail(std::string("header is not valid JSON: ") + e.what());
    }
    if (!header.is_object()) throw fail("header is not a JSON object");

    for (const auto& [name, v] : header.items()) {
      if (name == "__metadata__") {
        if (v.is_null()) continue;
        if (!v.is_object()) throw fail("__metadata__ is not an object");
        for (const auto& [k, mv] : v.items()) {
          if (!mv.is_string()) throw fail("__metadata__ value '" + k + "' is not a string");
          metadata_[k] = mv.get<std::string>();
        }
        continue;
      }
      auto tfail = [&](const std::string& what) { return fail("tensor '" + name + "': " + what); };
      if (!v.is_object()) throw tfail("entry is not an object");
      if (!v.contains("dtype") || !v["dtype"].is_string()) throw tfail("missing dtype");
      if (!v.contains("shape") || !v["shape"].is_array()) throw tfail("missing shape");
      if (!v.contains("data_offsets") || !v["data_offsets"].is_array() ||
          v["data_offsets"].size() != 2)
        throw tfail("missing data_offsets [begin, end]");
      Entry e;
      e.info.name = name;
      const std::string dt = v["dtype"].get<std::string>();
      if (!parse_dtype(dt, &e.info.dtype)) throw tfail("unsupported dtype " + dt);
      for (const auto& d : v["shape"]) {
        if (!d.is_number_integer() || d.get<int64_t>() < 0) throw tfail("bad shape entry");
        e.info.shape.push_back(d.get<int64_t>());
      }
      for (const auto& o : v["data_offsets"])
        if (!o.is_number_unsigned()) throw tfail("data_offsets are not non-negative integers");
      const uint64_t begin = v["data_offsets"][0].get<uint64_t>();
      const uint64_t end = v["data_offsets"][1].get<uint64_t>();
      if (begin > end || end > data_len)
        throw tfail("data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                    "] out of range (data section is " + std::to_string(data_len) +
                    " bytes; file truncated?)");
      const uint64_t want = static_cast<uint64_t>(e.info.numel()) * dtype_size(e.info.dtype);
      if (end - begin != want)
        throw tfail("data_offsets span " + std::to_string(end - begin) + " bytes but shape " +
                    shape_str(e.info.shape) + " of " + dt + " needs " + std::to_string(want));
      e.begin = begin;
      e.end = end;
      tensors_.emplace(name, std::move(e));
    }
  } catch (...) {
    ::munmap(map_, map_size_);
    map_ = nullptr;
    throw;
  }
  // The mapping stays valid after the descriptor closes (UniqueFd closes it here).
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end())
    throw std::runtime_error("safetensors file " + path_ + ": no tensor '" + name + "'");
  return it->second.info;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> r;
  r.reserve(tensors_.size());
  for (const auto& kv : tensors_) r.push_back(kv.first);
  return r;
}

void SafetensorsFile::read_f32(const std::string& name, const std::vector<int64_t>& expect_shape,
                               float* dst) const {
  int64_t n = 1;
  for (int64_t d : expect_shape) n *= d;
  read_f32(name, expect_shape, dst, 0, static_cast<size_t>(n));
}

namespace {
// Widening conversions to fp32 of elements [0, n) at src; parallel for large slices (a 70B
// model is 70 billion of them), each element alone so any thread count gives the same floats.
constexpr size_t kParallelConvert = size_t(1) << 20;
template <typename F>
void convert_elements(float* dst, const uint8_t* src, size_t n, size_t elem_bytes, F&& one) {
#pragma omp parallel for schedule(static) if (n > kParallelConvert)
  for (size_t i = 0; i < n; ++i) dst[i] = one(src + elem_bytes * i);
}
}  // namespace

void SafetensorsFile::read_f32(const std::string& name, const std::vector<int64_t>& expect_shape,
                               float* dst, size_t begin, size_t count) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end())
    throw std::runtime_error("safetensors file " + path_ + ": no tensor '" + name + "'");
  const Entry& e = it->second;
  if (e.info.shape != expect_shape)
    throw std::runtime_error("safetensors file " + path_ + ": tensor '" + name + "' has shape " +
                             shape_str(e.info.shape) + ", expected " + shape_str(expect_shape));
  if (begin + count > static_cast<size_t>(e.info.numel()))
    throw std::runtime_error("safetensors file " + path_ + ": slice past the end of '" + name + "'");
  // memcpy per element: the data section need not be aligned for the element type.
  switch (e.info.dtype) {
    case DType::F32:
      if (count) std::memcpy(dst, data_ + e.begin + 4 * begin, count * 4);
      break;
    case DType::BF16:
      convert_elements(dst, data_ + e.begin + 2 * begin, count, 2, [](const uint8_t* p) {
        uint16_t h;
        std::memcpy(&h, p, 2);
        return std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
      });
      break;
    case DType::F16:
      convert_elements(dst, data_ + e.begin + 2 * begin, count, 2, [](const uint8_t* p) {
        uint16_t h;
        std::memcpy(&h, p, 2);
        return half_to_float(h);
      });
      break;
    case DType::F64:
      convert_elements(dst, data_ + e.begin + 8 * begin, count, 8, [](const uint8_t* p) {
        double d;
        std::memcpy(&d, p, 8);
        return static_cast<float>(d);
      });
      break;
    default:
      throw std::runtime_error("safetensors file " + path_ + ": tensor '" + name + "' has dtype " +
                               dtype_name(e.info.dtype) +
                               "; only F32, F16, BF16 and F64 convert to fp32");
  }
}

// ---------------------------------------------------------------------------------------
// SafetensorsSet

SafetensorsSet::SafetensorsSet(const std::string& dir) {
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  // Same preference as transformers: the single file first, then the index.
  if (fs::exists(single)) {
    files_.push_back(std::make_unique<SafetensorsFile>(single.string()));
    for (const auto& n : files_[0]->names()) where_[n] = 0;
    return;
  }
  if (!fs::exists(index)) {
    const bool bin = fs::exists(fs::path(dir) / "pytorch_model.bin") ||
                     fs::exists(fs::path(dir) / "pytorch_model.bin.index.json");
    throw std::runtime_error("model directory " + dir +
                             ": neither model.safetensors nor model.safetensors.index.json found" +
                             (bin ? " (pytorch_model.bin is not supported; convert to safetensors)"
                                  : ""));
  }
  const json j = io::read_json_file(index.string());
  if (!j.contains("weight_map") || !j["weight_map"].is_object())
    throw std::runtime_error(index.string() + ": missing object key 'weight_map'");
  std::map<std::string, size_t> file_index;  // shard file name -> files_ index
  for (const auto& [tensor, shard_v] : j["weight_map"].items()) {
    if (!shard_v.is_string())
      throw std::runtime_error(index.string() + ": weight_map['" + tensor + "'] is not a string");
    const std::string shard = shard_v.get<std::string>();
    auto it = file_index.find(shard);
    if (it == file_index.end()) {
      files_.push_back(std::make_unique<SafetensorsFile>((fs::path(dir) / shard).string()));
      it = file_index.emplace(shard, files_.size() - 1).first;
    }
    if (!files_[it->second]->has(tensor))
      throw std::runtime_error(index.string() + ": weight_map lists '" + tensor + "' in " + shard +
                               ", which does not contain it");
    where_[tensor] = it->second;
  }
}

bool SafetensorsSet::has(const std::string& name) const { return where_.count(name) != 0; }

const TensorInfo& SafetensorsSet::info(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw std::runtime_error("no tensor '" + name + "' in the model files");
  return files_[it->second]->info(name);
}

void SafetensorsSet::read_f32(const std::string& name, const std::vector<int64_t>& expect_shape,
                              float* dst) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw std::runtime_error("no tensor '" + name + "' in the model files");
  files_[it->second]->read_f32(name, expect_shape, dst);
}

void SafetensorsSet::read_f32(const std::string& name, const std::vector<int64_t>& expect_shape,
                              float* dst, size_t begin, size_t count) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw std::runtime_error("no tensor '" + name + "' in the model files");
  files_[it->second]->read_f32(name, expect_shape, dst, begin, count);
}

std::vector<std::string> SafetensorsSet::names() const {
  std::vector<std::string> r;
  r.reserve(where_.size());
  for (const auto& kv : where_) r.push_back(kv.first);
  return r;
}

// ---------------------------------------------------------------------------------------
// Writer

namespace {

// What the header needs of a tensor to write, whichever way its data comes.
struct HeaderEntry {
  const std::string* name;
  const std::vector<int64_t>* shape;
  size_t index;  // into the caller's tensor list
};

// Sorts `entries` by name (the safetensors convention), checks names and shapes, and
// returns the padded header with the 8-byte length prefix to write first.
std::string header_bytes(const std::string& path, std::vector<HeaderEntry>& entries, DType dtype,
                         const std::map<std::string, std::string>& metadata) {
  std::sort(entries.begin(), entries.end(),
            [](const HeaderEntry& a, const HeaderEntry& b) { return *a.name < *b.name; });
  json header = json::object();  // nlohmann's default object is a std::map: keys sorted
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const std::string& name = *entries[i].name;
    if (name.empty() || name == "__metadata__")
      throw std::runtime_error("write_safetensors " + path + ": invalid tensor name '" + name + "'");
    if (i > 0 && *entries[i - 1].name == name)
      throw std::runtime_error("write_safetensors " + path + ": duplicate tensor '" + name + "'");
    for (int64_t d : *entries[i].shape)
      if (d < 0) throw std::runtime_error("write_safetensors " + path + ": tensor '" + name +
                                          "' has a negative dimension");
    const uint64_t bytes = static_cast<uint64_t>(shape_numel(*entries[i].shape)) * dtype_size(dtype);
    header[name] = {{"dtype", dtype_name(dtype)},
                    {"shape", *entries[i].shape},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string hs = header.dump();
  // Pad with spaces so the data section starts 8-byte aligned (8-byte prefix + header).
  hs.append((8 - hs.size() % 8) % 8, ' ');
  const uint64_t header_len = hs.size();
  return std::string(reinterpret_cast<const char*>(&header_len), 8) + hs;
}

// Elements per slice of write_safetensors_streamed: 16 MB of fp32, big enough that a
// parallel fill and one write() amortise their start-up, small enough to stay in memory.
constexpr size_t kStreamSlice = size_t{1} << 22;

// One slice in flight: its fp32 values and, for BF16, their conversion.
struct SliceBuffer {
  std::vector<float> f32;
  std::vector<uint16_t> bf16;
  // Fills elements [begin, begin + count) of t; returns the bytes to write.
  std::pair<const void*, size_t> make(const TensorToStream& t, size_t begin, size_t count,
                                      DType dtype) {
    f32.resize(count);
    t.fill(f32.data(), begin, count);
    if (dtype == DType::F32) return {f32.data(), count * 4};
    bf16.resize(count);
    const int64_t n = static_cast<int64_t>(count);
#pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) bf16[i] = float_to_bf16(f32[i]);
    return {bf16.data(), count * 2};
  }
};

}  // namespace

uint16_t float_to_bf16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  // A NaN whose payload sits in the low 16 bits would round to inf: keep it a (quiet) NaN.
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  // Adding 0x7fff plus the lowest kept bit rounds half-way cases to the even neighbour.
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<HeaderEntry> sorted;
  sorted.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorToWrite& t = tensors[i];
    if (shape_numel(t.shape) > 0 && t.data == nullptr)
      throw std::runtime_error("write_safetensors " + path + ": tensor '" + t.name + "' has no data");
    sorted.push_back({&t.name, &t.shape, i});
  }
  const std::string header = header_bytes(path, sorted, DType::F32, metadata);

  io::AtomicFileWriter out(path);
  out.write(header.data(), header.size());
  for (const HeaderEntry& e : sorted)
    out.write(tensors[e.index].data, static_cast<size_t>(shape_numel(*e.shape)) * 4);
  out.commit();
}

void write_safetensors_streamed(const std::string& path,
                                const std::vector<TensorToStream>& tensors, DType dtype,
                                const std::map<std::string, std::string>& metadata) {
  if (dtype != DType::F32 && dtype != DType::BF16)
    throw std::runtime_error("write_safetensors " + path + ": can write F32 or BF16, not " +
                             dtype_name(dtype));
  std::vector<HeaderEntry> sorted;
  sorted.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (shape_numel(tensors[i].shape) > 0 && !tensors[i].fill)
      throw std::runtime_error("write_safetensors " + path + ": tensor '" + tensors[i].name +
                               "' has no data");
    sorted.push_back({&tensors[i].name, &tensors[i].shape, i});
  }
  const std::string header = header_bytes(path, sorted, dtype, metadata);

  io::AtomicFileWriter out(path);
  out.write(header.data(), header.size());
  // Two buffers: a helper thread writes one slice while this thread fills the next. Declared
  // after `out` so an exception waits for the write in flight before `out` goes away.
  SliceBuffer buffers[2];
  std::future<void> writing;
  size_t slice = 0;
  for (const HeaderEntry& e : sorted) {
    const TensorToStream& t = tensors[e.index];
    const size_t n = static_cast<size_t>(shape_numel(t.shape));
    for (size_t begin = 0; begin < n; begin += kStreamSlice, ++slice) {
      const auto [data, bytes] =
          buffers[slice % 2].make(t, begin, std::min(kStreamSlice, n - begin), dtype);
      if (writing.valid()) writing.get();  // frees the other buffer; rethrows a write error
      writing = std::async(std::launch::async, [&out, data, bytes] { out.write(data, bytes); });
    }
  }
  if (writing.valid()) writing.get();
  out.commit();
}

}  // namespace ftune
