// HDF5 checkpoints: adapter.h5, optimizer-rank-R-of-N.h5, trainer_state.h5, atomic
// finalize (fsync, rename, COMPLETE), discovery and pruning. Layout of each file is
// described at its writer; strings are fixed-length UTF-8 (hdf5_util.hpp).
#include "ftune/train/checkpoint.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <stdexcept>

#include "ftune/io/hdf5.hpp"

namespace ftune {
namespace fs = std::filesystem;
namespace {

// Runs f, turning HDF5 failures into an error naming the checkpoint file.
template <class F>
auto on_file(const std::string& path, const char* what, F f) {
  try {
    return f();
  } catch (const h5::Error& e) {
    throw std::runtime_error(std::string("cannot ") + what + " checkpoint file '" + path +
                             "': " + e.what());
  }
}

std::string join(const std::vector<std::string>& v, char sep) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? std::string(1, sep) : "") + v[i];
  return s;
}

// ---- identity -------------------------------------------------------------------------

void write_identity(hid_t obj, const CheckpointIdentity& id) {
  h5::write_attr_str(obj, "format_version", id.format_version);
  h5::write_attr_str(obj, "ftune_version", id.ftune_version);
  h5::write_attr_str(obj, "model_fingerprint", id.model_fingerprint);
  h5::write_attr_str(obj, "lora_fingerprint", id.lora_fingerprint);
  h5::write_attr_i64(obj, "num_params", id.num_params);
}

// Every ftune file carries format_version; a file of another format is refused first.
void check_format(const std::string& path, hid_t obj, const std::string& expect) {
  if (!h5::has_attr(obj, "format_version"))
    throw std::runtime_error("'" + path + "' is not an ftune checkpoint file (no format_version)");
  const std::string got = h5::read_attr_str(obj, "format_version");
  if (got != expect)
    throw std::runtime_error("checkpoint file '" + path + "' has format_version " + got +
                             ", this ftune reads format_version " + expect);
}

CheckpointIdentity read_identity(const std::string& path, hid_t obj,
                                 const CheckpointIdentity& expect) {
  check_format(path, obj, expect.format_version);
  CheckpointIdentity id;
  id.ftune_version = h5::read_attr_str(obj, "ftune_version");
  id.model_fingerprint = h5::read_attr_str(obj, "model_fingerprint");
  id.lora_fingerprint = h5::read_attr_str(obj, "lora_fingerprint");
  id.num_params = h5::read_attr_i64(obj, "num_params");
  return id;
}

// Empty expected strings / a zero num_params are not checked (tools that only inspect).
// ftune_version is informational: a newer ftune may resume an older run of the same format.
void check_model(const std::string& path, const CheckpointIdentity& got,
                 const CheckpointIdentity& expect) {
  if (!expect.model_fingerprint.empty() && got.model_fingerprint != expect.model_fingerprint)
    throw std::runtime_error("checkpoint file '" + path +
                             "' was made for a different model (model_fingerprint " +
                             got.model_fingerprint + " vs " + expect.model_fingerprint + ")");
}

void check_lora(const std::string& path, const CheckpointIdentity& got,
                const CheckpointIdentity& expect) {
  if (!expect.lora_fingerprint.empty() && got.lora_fingerprint != expect.lora_fingerprint)
    throw std::runtime_error("checkpoint file '" + path +
                             "' was made for a different LoRA configuration (lora_fingerprint " +
                             got.lora_fingerprint + " vs " + expect.lora_fingerprint + ")");
  if (expect.num_params != 0 && got.num_params != expect.num_params)
    throw std::runtime_error("checkpoint file '" + path + "' holds a different number of LoRA " +
                             "parameters (num_params " + std::to_string(got.num_params) + " vs " +
                             std::to_string(expect.num_params) + ")");
}

// ---- filesystem helpers -----------------------------------------------------------------

[[noreturn]] void sys_fail(const std::string& what, const std::string& path) {
  throw std::runtime_error(what + " '" + path + "': " + std::strerror(errno));
}

void fsync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (directory ? O_DIRECTORY : 0));
  if (fd < 0) sys_fail("cannot open for fsync", path);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  errno = err;
  if (rc != 0) sys_fail("fsync failed for", path);
}

void write_file_synced(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) throw std::runtime_error("cannot write '" + path + "'");
  fsync_path(path, false);  // fsync on a read-only descriptor flushes the file's data too
}

// STEP of a "checkpoint-STEP" name, or -1 for any other name (".tmp" dirs included).
int64_t step_of(const std::string& name) {
  static const std::string prefix = "checkpoint-";
  if (name.rfind(prefix, 0) != 0 || name.size() == prefix.size()) return -1;
  int64_t step = -1;
  const char* b = name.data() + prefix.size();
  const char* e = name.data() + name.size();
  auto [p, ec] = std::from_chars(b, e, step);
  return (ec == std::errc() && p == e && step >= 0) ? step : -1;
}

// Complete checkpoints of output_dir by step (a directory holding COMPLETE).
std::map<int64_t, fs::path> complete_checkpoints(const std::string& output_dir) {
  std::map<int64_t, fs::path> out;
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return out;
  for (const fs::directory_entry& e : fs::directory_iterator(output_dir)) {
    const int64_t step = step_of(e.path().filename().string());
    if (step >= 0 && e.is_directory() && fs::is_regular_file(e.path() / "COMPLETE"))
      out[step] = e.path();
  }
  return out;
}

std::string utc_timestamp() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

}  // namespace

std::string checkpoint_dir_name(int64_t step) { return "checkpoint-" + std::to_string(step); }

std::string optimizer_shard_file(int rank, int world_size) {
  return "optimizer-rank-" + std::to_string(rank) + "-of-" + std::to_string(world_size) + ".h5";
}

// ---- adapter.h5 -------------------------------------------------------------------------
// /            attrs: r, lora_alpha, use_rslora (0/1), lora_dropout, target_modules
//                     ("q_proj,v_proj"), model_type, num_hidden_layers, hidden_size,
//                     intermediate_size + identity (format_version, ftune_version,
//                     model_fingerprint, lora_fingerprint, num_params)
// /lora/<PEFT key>  float32 [r, in] (lora_A) or [out, r] (lora_B)

void write_adapter_h5(const std::string& path, const LoraAdapter& a, const CheckpointIdentity& id) {
  on_file(path, "write", [&] {
    h5::File f = h5::create_file(path);
    const hid_t root = f.get();
    h5::write_attr_i64(root, "r", a.spec.rank);
    h5::write_attr_f64(root, "lora_alpha", a.spec.alpha);
    h5::write_attr_i64(root, "use_rslora", a.spec.use_rslora ? 1 : 0);
    h5::write_attr_f64(root, "lora_dropout", a.spec.dropout);
    h5::write_attr_str(root, "target_modules", join(a.spec.target_names(), ','));
    h5::write_attr_str(root, "model_type", a.model.model_type);
    h5::write_attr_i64(root, "num_hidden_layers", a.model.num_hidden_layers);
    h5::write_attr_i64(root, "hidden_size", a.model.hidden_size);
    h5::write_attr_i64(root, "intermediate_size", a.model.intermediate_size);
    write_identity(root, id);
    {
      h5::Group lora = h5::create_group(root, "lora");
      const auto r = static_cast<hsize_t>(a.spec.rank);
      for (const LoraSlot& s : a.slots) {
        h5::write_f32(lora.get(), LoraAdapter::peft_key(s.layer, s.proj, 'A'),
                      a.params.data() + s.a_offset, {r, static_cast<hsize_t>(s.in)});
        h5::write_f32(lora.get(), LoraAdapter::peft_key(s.layer, s.proj, 'B'),
                      a.params.data() + s.b_offset, {static_cast<hsize_t>(s.out), r});
      }
    }
    f.close();
  });
}

void read_adapter_h5(const std::string& path, LoraAdapter& a, const CheckpointIdentity& expect) {
  on_file(path, "read", [&] {
    h5::File f = h5::open_file(path);
    const hid_t root = f.get();
    const CheckpointIdentity got = read_identity(path, root, expect);
    check_model(path, got, expect);
    // The LoRA config is compared field by field first: "r 8 vs 4" says more than a hash.
    auto differs = [&](const std::string& field, const std::string& ckpt, const std::string& run) {
      throw std::runtime_error("checkpoint file '" + path + "': LoRA config differs: " + field +
                               " " + ckpt + " (checkpoint) vs " + run + " (this run)");
    };
    const int64_t r = h5::read_attr_i64(root, "r");
    if (r != a.spec.rank) differs("r", std::to_string(r), std::to_string(a.spec.rank));
    const double alpha = h5::read_attr_f64(root, "lora_alpha");
    if (alpha != a.spec.alpha)
      differs("lora_alpha", std::to_string(alpha), std::to_string(a.spec.alpha));
    const bool rslora = h5::read_attr_i64(root, "use_rslora") != 0;
    if (rslora != a.spec.use_rslora)
      differs("use_rslora", rslora ? "true" : "false", a.spec.use_rslora ? "true" : "false");
    const std::string targets = h5::read_attr_str(root, "target_modules");
    if (targets != join(a.spec.target_names(), ','))
      differs("target_modules", targets, join(a.spec.target_names(), ','));
    check_lora(path, got, expect);
    if (got.num_params != static_cast<int64_t>(a.params.size()))
      throw std::runtime_error("checkpoint file '" + path + "' holds " +
                               std::to_string(got.num_params) + " LoRA parameters, the adapter " +
                               std::to_string(a.params.size()));

    h5::Group lora = h5::open_group(root, "lora");
    if (h5::num_links(lora.get()) != 2 * a.slots.size())
      throw std::runtime_error(
          "checkpoint file '" + path + "' holds " + std::to_string(h5::num_links(lora.get())) +
          " LoRA tensors, the adapter has " + std::to_string(2 * a.slots.size()));
    auto read_tensor = [&](const std::string& key, hsize_t rows, hsize_t cols, size_t offset) {
      h5::Dataset d = h5::open_dataset(lora.get(), key);
      if (h5::dataset_shape(d.get()) != std::vector<hsize_t>{rows, cols})
        throw std::runtime_error("checkpoint file '" + path + "': tensor " + key +
                                 " has the wrong shape (expected [" + std::to_string(rows) + ", " +
                                 std::to_string(cols) + "])");
      h5::read_f32(d.get(), a.params.data() + offset, rows * cols);
    };
    const auto rr = static_cast<hsize_t>(a.spec.rank);
    for (const LoraSlot& s : a.slots) {
      read_tensor(LoraAdapter::peft_key(s.layer, s.proj, 'A'), rr, s.in, s.a_offset);
      read_tensor(LoraAdapter::peft_key(s.layer, s.proj, 'B'), s.out, rr, s.b_offset);
    }
  });
}

// ---- optimizer-rank-R-of-N.h5 -------------------------------------------------------------
// /  attrs: rank, world_size, begin, end, step + identity
//    datasets m, v, master: float32 [end - begin]

void write_optimizer_shard_h5(const std::string& path, const OptimizerShard& s,
                              const CheckpointIdentity& id) {
  const size_t n = s.end - s.begin;
  if (s.end < s.begin || s.m.size() != n || s.v.size() != n || s.master.size() != n)
    throw std::runtime_error("optimizer shard for '" + path + "' is inconsistent: range [" +
                             std::to_string(s.begin) + ", " + std::to_string(s.end) + ") but " +
                             std::to_string(s.m.size()) + "/" + std::to_string(s.v.size()) + "/" +
                             std::to_string(s.master.size()) + " values in m/v/master");
  on_file(path, "write", [&] {
    h5::File f = h5::create_file(path);
    const hid_t root = f.get();
    h5::write_attr_i64(root, "rank", s.rank);
    h5::write_attr_i64(root, "world_size", s.world_size);
    h5::write_attr_u64(root, "begin", s.begin);
    h5::write_attr_u64(root, "end", s.end);
    h5::write_attr_i64(root, "step", s.step);
    write_identity(root, id);
    h5::write_f32(root, "m", s.m.data(), {n});
    h5::write_f32(root, "v", s.v.data(), {n});
    h5::write_f32(root, "master", s.master.data(), {n});
    f.close();
  });
}

OptimizerShard read_optimizer_resharded(const std::string& dir, uint64_t begin, uint64_t end,
                                        const CheckpointIdentity& expect) {
  struct Source {
    std::string path;
    int rank = 0;
    uint64_t begin = 0, end = 0;
    int64_t step = 0;
  };
  // Collect the shard files; their names must agree on N and cover every rank once.
  static const std::regex pattern(R"(optimizer-rank-(\d+)-of-(\d+)\.h5)");
  std::map<int, Source> by_rank;
  int world = -1;
  if (!fs::is_directory(dir))
    throw std::runtime_error("checkpoint '" + dir + "' is not a directory");
  for (const fs::directory_entry& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    std::smatch m;
    if (!std::regex_match(name, m, pattern)) continue;
    const int r = std::stoi(m[1]), n = std::stoi(m[2]);
    if (world >= 0 && n != world)
      throw std::runtime_error("checkpoint '" + dir + "' mixes optimizer shards of world sizes " +
                               std::to_string(world) + " and " + std::to_string(n));
    world = n;
    by_rank[r] = Source{e.path().string(), r};
  }
  if (world < 0)
    throw std::runtime_error("checkpoint '" + dir + "' has no optimizer-rank-*-of-*.h5 (a "
                             "run with save_only_model = true saves no optimizer state, so its "
                             "checkpoints cannot be resumed; start a new run from its model or "
                             "adapter instead)");
  for (int r = 0; r < world; ++r)
    if (!by_rank.count(r))
      throw std::runtime_error("checkpoint '" + dir + "' is missing " +
                               optimizer_shard_file(r, world));
  if (static_cast<int>(by_rank.size()) != world)
    throw std::runtime_error("checkpoint '" + dir + "' has optimizer shards beyond rank " +
                             std::to_string(world - 1) + " of " + std::to_string(world));

  // Read every header: identity, rank/world agree with the name, ranges tile [0, num_params).
  int64_t num_params = -1, step = -1;
  std::vector<Source> sources;
  for (auto& entry : by_rank) {
    const int r = entry.first;
    Source& src = entry.second;
    on_file(src.path, "read", [&] {
      h5::File f = h5::open_file(src.path);
      const CheckpointIdentity got = read_identity(src.path, f.get(), expect);
      check_model(src.path, got, expect);
      check_lora(src.path, got, expect);
      if (num_params >= 0 && got.num_params != num_params)
        throw std::runtime_error("optimizer shards of '" + dir + "' disagree on num_params");
      num_params = got.num_params;
      if (h5::read_attr_i64(f.get(), "rank") != r ||
          h5::read_attr_i64(f.get(), "world_size") != world)
        throw std::runtime_error("optimizer shard '" + src.path +
                                 "' has rank/world_size attributes that contradict its name");
      src.begin = h5::read_attr_u64(f.get(), "begin");
      src.end = h5::read_attr_u64(f.get(), "end");
      src.step = h5::read_attr_i64(f.get(), "step");
      if (step >= 0 && src.step != step)
        throw std::runtime_error("optimizer shards of '" + dir + "' disagree on the step (" +
                                 std::to_string(step) + " vs " + std::to_string(src.step) + ")");
      step = src.step;
    });
    sources.push_back(src);
  }
  std::sort(sources.begin(), sources.end(), [](const Source& x, const Source& y) {
    return x.begin < y.begin || (x.begin == y.begin && x.end < y.end);
  });
  uint64_t covered = 0;
  for (const Source& s : sources) {
    if (s.end < s.begin || s.begin != covered)
      throw std::runtime_error(
          "optimizer shards of '" + dir +
          "' do not tile the parameter vector: " + (s.begin < covered ? "overlap" : "gap") +
          " at " + std::to_string(std::min(s.begin, covered)) + " (" + s.path + ")");
    covered = s.end;
  }
  if (covered != static_cast<uint64_t>(num_params))
    throw std::runtime_error("optimizer shards of '" + dir + "' cover [0, " +
                             std::to_string(covered) + ") of " + std::to_string(num_params) +
                             " parameters");
  if (begin > end || end > covered)
    throw std::runtime_error("requested optimizer range [" + std::to_string(begin) + ", " +
                             std::to_string(end) + ") is outside the checkpoint's " +
                             std::to_string(covered) + " parameters");

  // Copy [begin, end) out of the files that overlap it.
  OptimizerShard out;
  out.world_size = world;  // the checkpoint's sharding; rank: the file that holds `begin`
  out.begin = begin;
  out.end = end;
  out.step = step;
  out.m.resize(end - begin);
  out.v.resize(end - begin);
  out.master.resize(end - begin);
  bool first = true;
  for (const Source& s : sources) {
    const uint64_t lo = std::max(begin, s.begin), hi = std::min(end, s.end);
    if (lo >= hi) continue;
    if (first) {
      out.rank = s.rank;
      first = false;
    }
    on_file(s.path, "read", [&] {
      h5::File f = h5::open_file(s.path);
      const std::pair<const char*, std::vector<float>*> parts[] = {
          {"m", &out.m}, {"v", &out.v}, {"master", &out.master}};
      for (auto [name, vec] : parts) {
        h5::Dataset d = h5::open_dataset(f.get(), name);
        if (h5::dataset_shape(d.get()) != std::vector<hsize_t>{s.end - s.begin})
          throw std::runtime_error("optimizer shard '" + s.path + "': dataset " + name +
                                   " does not match its [begin, end)");
        h5::read_f32_range(d.get(), lo - s.begin, hi - lo, vec->data() + (lo - begin));
      }
    });
  }
  return out;
}

// ---- trainer_state.h5 ---------------------------------------------------------------------
// /  attrs: format_version, step, data_epoch, data_pos, data_consumed, seed (uint64),
//           world_size, tokens
//    losses         float64 [steps]
//    metrics_jsonl  0-d fixed-length UTF-8 string (the metrics.jsonl text, may be "")

void write_trainer_state_h5(const std::string& path, const TrainerState& s) {
  on_file(path, "write", [&] {
    h5::File f = h5::create_file(path);
    const hid_t root = f.get();
    h5::write_attr_str(root, "format_version", CheckpointIdentity{}.format_version);
    h5::write_attr_i64(root, "step", s.step);
    h5::write_attr_i64(root, "data_epoch", s.data_epoch);
    h5::write_attr_i64(root, "data_pos", s.data_pos);
    h5::write_attr_i64(root, "data_consumed", s.data_consumed);
    h5::write_attr_u64(root, "seed", s.seed);
    h5::write_attr_i64(root, "world_size", s.world_size);
    h5::write_attr_i64(root, "tokens", s.tokens);
    h5::write_f64(root, "losses", s.losses.data(), {s.losses.size()});
    h5::write_string_dataset(root, "metrics_jsonl", s.metrics_jsonl);
    f.close();
  });
}

TrainerState read_trainer_state_h5(const std::string& path) {
  return on_file(path, "read", [&] {
    h5::File f = h5::open_file(path);
    const hid_t root = f.get();
    // format_version is the only identity this file carries.
    check_format(path, root, CheckpointIdentity{}.format_version);
    TrainerState s;
    s.step = h5::read_attr_i64(root, "step");
    s.data_epoch = h5::read_attr_i64(root, "data_epoch");
    s.data_pos = h5::read_attr_i64(root, "data_pos");
    s.data_consumed = h5::read_attr_i64(root, "data_consumed");
    s.seed = h5::read_attr_u64(root, "seed");
    s.world_size = h5::read_attr_i64(root, "world_size");
    s.tokens = h5::read_attr_i64(root, "tokens");
    {
      h5::Dataset d = h5::open_dataset(root, "losses");
      const std::vector<hsize_t> shape = h5::dataset_shape(d.get());
      if (shape.size() != 1) throw std::runtime_error("losses is not 1-D in '" + path + "'");
      s.losses.resize(shape[0]);
      h5::read_f64(d.get(), s.losses.data(), s.losses.size());
    }
    h5::Dataset m = h5::open_dataset(root, "metrics_jsonl");
    s.metrics_jsonl = h5::read_string_dataset(m.get());
    return s;
  });
}

// ---- finalize, discovery, pruning ---------------------------------------------------------

void finalize_checkpoint(const std::string& tmp_dir, const std::string& final_dir) {
  if (!fs::is_directory(tmp_dir))
    throw std::runtime_error("checkpoint directory '" + tmp_dir + "' does not exist");
  if (fs::exists(final_dir))
    throw std::runtime_error("cannot finalize checkpoint: '" + final_dir + "' already exists");
  // Data first: every file and directory of the checkpoint reaches the disk before the
  // rename makes it visible under its final name.
  for (const fs::directory_entry& e : fs::recursive_directory_iterator(tmp_dir)) {
    if (e.is_regular_file())
      fsync_path(e.path().string(), false);
    else if (e.is_directory())
      fsync_path(e.path().string(), true);
  }
  fsync_path(tmp_dir, true);
  if (::rename(tmp_dir.c_str(), final_dir.c_str()) != 0)
    sys_fail("cannot rename '" + tmp_dir + "' to", final_dir);
  // COMPLETE last: its presence is what makes the directory a checkpoint.
  const int64_t step = step_of(fs::path(final_dir).filename().string());
  write_file_synced((fs::path(final_dir) / "COMPLETE").string(),
                    (step >= 0 ? "step " + std::to_string(step) + "\n" : std::string()) + "time " +
                        utc_timestamp() + "\n");
  fsync_path(final_dir, true);
  fs::path parent = fs::absolute(final_dir).parent_path();
  fsync_path(parent.string(), true);
}

std::optional<std::string> find_latest_checkpoint(const std::string& output_dir) {
  const auto all = complete_checkpoints(output_dir);
  if (all.empty()) return std::nullopt;
  return all.rbegin()->second.string();
}

void recover_checkpoints(const std::string& output_dir) {
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return;
  std::vector<fs::path> olds;
  for (const fs::directory_entry& e : fs::directory_iterator(output_dir)) {
    const std::string name = e.path().filename().string();
    if (e.is_directory() && name.ends_with(".old") && step_of(name.substr(0, name.size() - 4)) >= 0)
      olds.push_back(e.path());
  }
  for (const fs::path& old : olds) {
    const fs::path final_dir = old.parent_path() / old.stem();  // checkpoint-STEP
    if (fs::is_regular_file(final_dir / "COMPLETE")) {
      fs::remove_all(old);  // the replacement finished: the old copy is no longer needed
      continue;
    }
    // The re-save died between moving the old copy aside and completing the new one: the old
    // copy is the only complete checkpoint of that step. Put it back.
    if (!fs::is_regular_file(old / "COMPLETE")) continue;  // not ours to judge
    fs::remove_all(final_dir);
    fs::rename(old, final_dir);
  }
}

void prune_checkpoints(const std::string& output_dir, int64_t keep) {
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return;
  // Stale "checkpoint-STEP.tmp" dirs: left by a save that was killed before its rename.
  std::vector<fs::path> stale;
  for (const fs::directory_entry& e : fs::directory_iterator(output_dir)) {
    const std::string name = e.path().filename().string();
    if (e.is_directory() && name.size() > 4 && name.ends_with(".tmp") &&
        step_of(name.substr(0, name.size() - 4)) >= 0)
      stale.push_back(e.path());
  }
  for (const fs::path& p : stale) fs::remove_all(p);
  if (keep <= 0) return;
  // Incomplete checkpoint-STEP dirs (no COMPLETE) are left alone: they are not ours to judge.
  auto all = complete_checkpoints(output_dir);
  while (static_cast<int64_t>(all.size()) > keep) {  // keep >= 1: the newest always survives
    fs::remove_all(all.begin()->second);
    all.erase(all.begin());
  }
}

}  // namespace ftune
