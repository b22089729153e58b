// Tokenized datasets cached as HDF5: <cache_dir>/ftune-data-<hash>.h5 holding
//   input_ids, labels   int32 [total tokens]   all examples back to back
//   offsets             int64 [examples + 1]   example k = [offsets[k], offsets[k+1])
//   description         string                 what the key hashes (checked on read)
// plus format_version and the DatasetStats as attributes.
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <optional>
#include <sstream>

#include "dataset_internal.hpp"
#include "ftune/data/tokenizer.hpp"
#include "ftune/io/hdf5.hpp"

namespace fs = std::filesystem;

namespace ftune::dataset {
namespace {

// Bump when the encoding or the file layout changes (old caches then simply miss).
constexpr int64_t kCacheFormatVersion = 1;

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// Size and FNV-1a hash of a file's bytes ("" when it does not exist).
std::string file_fingerprint(const fs::path& p) {
  if (!fs::is_regular_file(p)) return "";
  std::ifstream in(p, std::ios::binary);
  std::vector<char> buf(1 << 20);
  uint64_t h = fnv1a64(nullptr, 0), n = 0;
  while (in.read(buf.data(), static_cast<std::streamsize>(buf.size())) || in.gcount() > 0) {
    h = fnv1a64(buf.data(), static_cast<size_t>(in.gcount()), h);
    n += static_cast<uint64_t>(in.gcount());
  }
  return std::to_string(n) + ":" + hex64(h);
}

nlohmann::json tokenizer_fingerprint(const DatasetOptions& opt) {
  if (!opt.tokenizer) return nullptr;
  if (!opt.tokenizer_path.empty()) {
    const fs::path p(opt.tokenizer_path);
    if (fs::is_directory(p))
      return {{"tokenizer.json", file_fingerprint(p / "tokenizer.json")},
              {"tokenizer_config.json", file_fingerprint(p / "tokenizer_config.json")}};
    return {{"file", file_fingerprint(p)}};
  }
  // No path given: fingerprint the vocabulary and special ids instead.
  const Tokenizer& t = *opt.tokenizer;
  uint64_t h = fnv1a64(nullptr, 0);
  for (int32_t id = 0; id < t.vocab_size(); ++id) {
    const std::string tok = t.id_to_token(id) + '\n';
    h = fnv1a64(tok.data(), tok.size(), h);
  }
  return {{"vocab", hex64(h)}, {"bos", t.bos_id()}, {"eos", t.eos_id()}, {"pad", t.pad_id()}};
}

void write_ints(hid_t parent, const char* name, hid_t file_type, hid_t mem_type, const void* data,
                hsize_t n) {
  h5::Dataspace space(FTUNE_H5_CHECK(H5Screate_simple(1, &n, nullptr)));
  h5::Dataset d(FTUNE_H5_CHECK(H5Dcreate2(parent, name, file_type, space.get(), H5P_DEFAULT,
                                          H5P_DEFAULT, H5P_DEFAULT)));
  if (n > 0) FTUNE_H5_CHECK(H5Dwrite(d.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data));
}

template <class T>
std::vector<T> read_ints(hid_t parent, const char* name, hid_t mem_type) {
  h5::Dataset d = h5::open_dataset(parent, name);
  const auto shape = h5::dataset_shape(d.get());
  if (shape.size() != 1) throw h5::Error(std::string(name) + " is not 1-D");
  std::vector<T> out(shape[0]);
  if (!out.empty())
    FTUNE_H5_CHECK(H5Dread(d.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()));
  return out;
}

// DatasetStats fields stored as attributes (cache_hit is not stored: it is set on read).
template <class Fn>
void for_each_stat(DatasetStats& s, Fn fn) {
  fn("records", s.records);
  fn("examples", s.examples);
  fn("skipped", s.skipped);
  fn("no_pairs", s.no_pairs);
  fn("truncated", s.truncated);
  fn("dropped_no_labels", s.dropped_no_labels);
  fn("tokens", s.tokens);
  fn("label_tokens", s.label_tokens);
}

}  // namespace

uint64_t fnv1a64(const void* data, size_t n, uint64_t h) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

std::string cache_description(const DatasetOptions& opt, const std::vector<std::string>& files) {
  nlohmann::json d;
  d["format_version"] = kCacheFormatVersion;
  d["files"] = nlohmann::json::array();
  for (const auto& f : files) {
    // Paths are made absolute so ranks started from different directories agree.
    const auto mtime = fs::last_write_time(f).time_since_epoch();
    d["files"].push_back({{"path", fs::weakly_canonical(f).string()},
                          {"size", fs::file_size(f)},
                          {"mtime_ns", std::chrono::duration_cast<std::chrono::nanoseconds>(mtime).count()}});
  }
  d["tokenizer"] = tokenizer_fingerprint(opt);
  const ChatTemplate& t = get_chat_template(opt.template_name);
  d["template"] = {t.name, t.system_prompt, t.prompt, t.sep, t.stop_str};
  d["max_length"] = opt.max_length;
  d["train_on_inputs"] = opt.train_on_inputs;
  d["max_samples"] = opt.max_samples > 0 ? opt.max_samples : -1;
  d["skip_bad_examples"] = opt.skip_bad_examples;
  return d.dump();
}

std::string cache_file_for(const DatasetOptions& opt, const std::string& description) {
  const std::string name = "ftune-data-" + hex64(fnv1a64(description.data(), description.size())) + ".h5";
  return (fs::path(opt.cache_dir) / name).string();
}

namespace {

// Opens `path` when it is a complete cache written for `description`.
std::optional<h5::File> open_valid(const std::string& path, const std::string& description) {
  if (!fs::is_regular_file(path)) return std::nullopt;
  h5::File f = h5::open_file(path);
  if (h5::read_attr_i64(f.get(), "format_version") != kCacheFormatVersion) return std::nullopt;
  if (h5::read_string_dataset(h5::open_dataset(f.get(), "description").get()) != description)
    return std::nullopt;
  return f;
}

}  // namespace

bool cache_is_valid(const std::string& path, const std::string& description) {
  try {
    return open_valid(path, description).has_value();
  } catch (const std::exception&) {
    return false;
  }
}

bool read_cache(const std::string& path, const std::string& description,
                std::vector<Example>& examples, DatasetStats& stats) {
  try {  // anything unreadable or stale counts as a miss; the caller rebuilds it
    std::optional<h5::File> f = open_valid(path, description);
    if (!f) return false;
    const auto offsets = read_ints<int64_t>(f->get(), "offsets", H5T_NATIVE_INT64);
    const auto ids = read_ints<int32_t>(f->get(), "input_ids", H5T_NATIVE_INT32);
    const auto labels = read_ints<int32_t>(f->get(), "labels", H5T_NATIVE_INT32);
    if (offsets.empty() || offsets.front() != 0 || ids.size() != labels.size() ||
        offsets.back() != static_cast<int64_t>(ids.size()))
      return false;
    std::vector<Example> out(offsets.size() - 1);
    for (size_t k = 0; k < out.size(); ++k) {
      if (offsets[k + 1] < offsets[k]) return false;
      out[k].input_ids.assign(ids.begin() + offsets[k], ids.begin() + offsets[k + 1]);
      out[k].labels.assign(labels.begin() + offsets[k], labels.begin() + offsets[k + 1]);
    }
    DatasetStats s;
    for_each_stat(s, [&](const char* name, int64_t& v) { v = h5::read_attr_i64(f->get(), name); });
    examples = std::move(out);
    stats = s;
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

void write_cache(const std::string& path, const std::string& description,
                 const std::vector<Example>& examples, const DatasetStats& stats) {
  static std::atomic<int> counter{0};
  fs::create_directories(fs::path(path).parent_path());
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  try {
    std::vector<int64_t> offsets{0};
    std::vector<int32_t> ids, labels;
    for (const Example& ex : examples) {
      ids.insert(ids.end(), ex.input_ids.begin(), ex.input_ids.end());
      labels.insert(labels.end(), ex.labels.begin(), ex.labels.end());
      offsets.push_back(static_cast<int64_t>(ids.size()));
    }
    h5::File f = h5::create_file(tmp);
    h5::write_attr_i64(f.get(), "format_version", kCacheFormatVersion);
    h5::write_string_dataset(f.get(), "description", description);
    DatasetStats s = stats;
    for_each_stat(s, [&](const char* name, int64_t& v) { h5::write_attr_i64(f.get(), name, v); });
    write_ints(f.get(), "offsets", H5T_STD_I64LE, H5T_NATIVE_INT64, offsets.data(), offsets.size());
    write_ints(f.get(), "input_ids", H5T_STD_I32LE, H5T_NATIVE_INT32, ids.data(), ids.size());
    write_ints(f.get(), "labels", H5T_STD_I32LE, H5T_NATIVE_INT32, labels.data(), labels.size());
    f.close();
    fs::rename(tmp, path);  // atomic: readers see the old file or the complete new one
  } catch (const std::exception& e) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw std::runtime_error("cannot write dataset cache '" + path + "': " + e.what());
  }
}

}  // namespace ftune::dataset
