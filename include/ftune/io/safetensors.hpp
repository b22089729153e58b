#pragma once
// io module: safetensors reading (memory-mapped, single or sharded through
// model.safetensors.index.json) and writing (fp32, or bf16 streamed), with dtype conversion
// to fp32.
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace ftune {

enum class DType { F32, F16, BF16, F64, I64, I32, I8, U8, BOOL };
const char* dtype_name(DType d);

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  int64_t numel() const;
};

// One .safetensors file, mapped read-only. Errors name the file and tensor.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Converts tensor `name` to fp32 into dst (numel floats); checks the expected shape.
  void read_f32(const std::string& name, const std::vector<int64_t>& expect_shape,
                float* dst) const;
  // Elements [begin, begin + count) of the row-major tensor only (count 0: just the checks).
  void read_f32(const std::string& name, const std::vector<int64_t>& expect_shape, float* dst,
                size_t begin, size_t count) const;

 private:
  struct Entry { TensorInfo info; size_t begin, end; };
  std::string path_;
  std::map<std::string, Entry> tensors_;
  std::map<std::string, std::string> metadata_;
  const uint8_t* data_ = nullptr;  // start of the byte buffer (after the header)
  void* map_ = nullptr;
  size_t map_size_ = 0;
};

// A model directory's weights: model.safetensors, or the shards listed by
// model.safetensors.index.json. Lookups by tensor name across shards.
class SafetensorsSet {
 public:
  explicit SafetensorsSet(const std::string& dir);
  bool has(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;
  void read_f32(const std::string& name, const std::vector<int64_t>& expect_shape,
                float* dst) const;
  void read_f32(const std::string& name, const std::vector<int64_t>& expect_shape, float* dst,
                size_t begin, size_t count) const;
  std::vector<std::string> names() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor -> file index
};

struct TensorToWrite {
  std::string name;
  std::vector<int64_t> shape;
  const float* data;  // fp32, numel(shape) values
};
// Writes an fp32 safetensors file (tensors sorted by name, 8-byte aligned header),
// atomically: into path + ".tmp", fsync, rename.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// fp32 -> bf16 bits, rounding to nearest even as torch's .to(torch.bfloat16); NaN stays NaN.
uint16_t float_to_bf16(float f);

// A tensor made on demand: fill(dst, begin, count) writes its row-major elements
// [begin, begin + count) as fp32 into dst. Lets a model be written that is never whole in
// memory (init-model of 8B shapes).
struct TensorToStream {
  std::string name;
  std::vector<int64_t> shape;
  std::function<void(float* dst, size_t begin, size_t count)> fill;
};
// As write_safetensors, with the tensors stored as `dtype` (F32, or BF16 rounded by
// float_to_bf16), filled slice by slice: memory stays two slices of a few MB whatever the
// model size, and the write of one slice overlaps the fill of the next. With F32 the file
// is byte-identical to write_safetensors of the same values.
void write_safetensors_streamed(const std::string& path,
                                const std::vector<TensorToStream>& tensors, DType dtype,
                                const std::map<std::string, std::string>& metadata = {});

}  // namespace ftune
