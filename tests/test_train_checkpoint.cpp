// HDF5 checkpoints: bitwise round trips of adapter / optimizer / trainer-state files,
// identity and LoRA-config mismatch errors, optimizer re-sharding across world sizes,
// refused shard sets, atomic finalize, discovery and pruning, and h5dump readability.
#include <doctest/doctest.h>
#include <hdf5.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>

#include "ftune/train/checkpoint.hpp"
#include "test_util.hpp"

using namespace ftune;
namespace fs = std::filesystem;

namespace {

ModelConfig tiny_model() { return ftune::test::llama_tiny_config(); }

using ftune::test::error_of;

LoraAdapter make_adapter(int rank, double alpha, std::vector<std::string> targets) {
  LoraSpec s;
  s.rank = rank;
  s.alpha = alpha;
  s.dropout = 0.05;
  s.targets = LoraSpec::parse_targets(targets);
  LoraAdapter a;
  a.allocate(tiny_model(), s);
  return a;
}

// Arbitrary bit patterns (NaN payloads, denormals, -0 included): round trips must be exact.
std::vector<float> random_floats(size_t n, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::vector<float> v(n);
  for (float& x : v) {
    const uint32_t bits = rng();
    std::memcpy(&x, &bits, sizeof bits);
  }
  return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
}

CheckpointIdentity identity(int64_t num_params) {
  CheckpointIdentity id;
  id.ftune_version = "0.1.0";
  id.model_fingerprint = "model-abc123";
  id.lora_fingerprint = "lora-def456";
  id.num_params = num_params;
  return id;
}

// The full optimizer state that a set of shard files is cut from.
struct FullState {
  std::vector<float> m, v, master;
};

FullState full_state(size_t n) {
  return {random_floats(n, 1), random_floats(n, 2), random_floats(n, 3)};
}

void write_shards(const std::string& dir, const FullState& st,
                  const std::vector<std::pair<uint64_t, uint64_t>>& ranges, int64_t step = 7) {
  const int world = static_cast<int>(ranges.size());
  for (int r = 0; r < world; ++r) {
    OptimizerShard s;
    s.rank = r;
    s.world_size = world;
    s.begin = ranges[r].first;
    s.end = ranges[r].second;
    s.step = step;
    s.m.assign(st.m.begin() + s.begin, st.m.begin() + s.end);
    s.v.assign(st.v.begin() + s.begin, st.v.begin() + s.end);
    s.master.assign(st.master.begin() + s.begin, st.master.begin() + s.end);
    write_optimizer_shard_h5(dir + "/" + optimizer_shard_file(r, world), s,
                             identity(static_cast<int64_t>(st.m.size())));
  }
}

void check_slice(const OptimizerShard& got, const FullState& st, uint64_t b, uint64_t e) {
  CHECK(got.begin == b);
  CHECK(got.end == e);
  CHECK(got.step == 7);
  auto slice = [&](const std::vector<float>& v) {
    return std::vector<float>(v.begin() + b, v.begin() + e);
  };
  CHECK(same_bits(got.m, slice(st.m)));
  CHECK(same_bits(got.v, slice(st.v)));
  CHECK(same_bits(got.master, slice(st.master)));
}

void touch(const fs::path& p, const std::string& text = "x") { std::ofstream(p) << text; }

void make_checkpoint(const fs::path& out, int64_t step, bool complete) {
  const fs::path d = out / checkpoint_dir_name(step);
  fs::create_directories(d);
  touch(d / "adapter.h5");
  if (complete) touch(d / "COMPLETE");
}

}  // namespace

TEST_CASE("adapter.h5 round trip is bitwise and named by PEFT keys") {
  const std::string dir = test::scratch("ckpt_adapter");
  LoraAdapter a = make_adapter(8, 16.0, {"q_proj", "v_proj", "down_proj"});
  a.params = random_floats(a.params.size(), 42);
  const CheckpointIdentity id = identity(static_cast<int64_t>(a.params.size()));
  const std::string path = dir + "/adapter.h5";
  write_adapter_h5(path, a, id);

  LoraAdapter b = make_adapter(8, 16.0, {"q_proj", "v_proj", "down_proj"});
  read_adapter_h5(path, b, id);
  CHECK(same_bits(a.params, b.params));

  // The layout is what other tools see: /lora/<PEFT key> with its 2-D shape, config attributes.
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  REQUIRE(f >= 0);
  const std::string key = "/lora/" + LoraAdapter::peft_key(1, Proj::down, 'B');
  REQUIRE(H5Lexists(f, "/lora", H5P_DEFAULT) > 0);
  REQUIRE(H5Lexists(f, key.c_str(), H5P_DEFAULT) > 0);
  hid_t d = H5Dopen2(f, key.c_str(), H5P_DEFAULT);
  hid_t sp = H5Dget_space(d);
  hsize_t dims[2] = {0, 0};
  CHECK(H5Sget_simple_extent_ndims(sp) == 2);
  H5Sget_simple_extent_dims(sp, dims, nullptr);
  CHECK(dims[0] == 64);  // down_proj out = hidden_size
  CHECK(dims[1] == 8);
  H5Sclose(sp);
  H5Dclose(d);
  for (const char* attr :
       {"r", "lora_alpha", "use_rslora", "target_modules", "lora_dropout", "format_version",
        "ftune_version", "model_fingerprint", "lora_fingerprint", "num_params"})
    CHECK_MESSAGE(H5Aexists(f, attr) > 0, attr);
  H5Fclose(f);
}

TEST_CASE("adapter.h5 refuses another model, LoRA config or format, naming the field") {
  const std::string dir = test::scratch("ckpt_adapter_mismatch");
  LoraAdapter a = make_adapter(8, 16.0, {"q_proj", "v_proj"});
  a.params = random_floats(a.params.size(), 7);
  const CheckpointIdentity id = identity(static_cast<int64_t>(a.params.size()));
  const std::string path = dir + "/adapter.h5";
  write_adapter_h5(path, a, id);

  LoraAdapter b = make_adapter(8, 16.0, {"q_proj", "v_proj"});
  CheckpointIdentity other = id;
  other.model_fingerprint = "model-zzz";
  std::string e = error_of([&] { read_adapter_h5(path, b, other); });
  CHECK(e.find("different model") != std::string::npos);
  CHECK(e.find("model_fingerprint") != std::string::npos);
  CHECK(e.find(path) != std::string::npos);

  other = id;
  other.lora_fingerprint = "lora-zzz";
  CHECK(error_of([&] { read_adapter_h5(path, b, other); }).find("lora_fingerprint") !=
        std::string::npos);
  other = id;
  other.num_params = 5;
  CHECK(error_of([&] { read_adapter_h5(path, b, other); }).find("num_params") != std::string::npos);

  LoraAdapter r4 = make_adapter(4, 16.0, {"q_proj", "v_proj"});
  e = error_of([&] { read_adapter_h5(path, r4, id); });
  CHECK(e.find("LoRA config differs: r 8") != std::string::npos);
  LoraAdapter alpha = make_adapter(8, 32.0, {"q_proj", "v_proj"});
  CHECK(error_of([&] { read_adapter_h5(path, alpha, id); }).find("lora_alpha") !=
        std::string::npos);
  LoraAdapter tgt = make_adapter(8, 16.0, {"q_proj", "k_proj"});
  CHECK(error_of([&] { read_adapter_h5(path, tgt, id); }).find("target_modules") !=
        std::string::npos);

  CheckpointIdentity v2 = id;
  v2.format_version = "2";
  write_adapter_h5(path, a, v2);
  CHECK(error_of([&] { read_adapter_h5(path, b, id); }).find("format_version 2") !=
        std::string::npos);

  // Missing or non-HDF5 files name the path.
  e = error_of([&] { read_adapter_h5(dir + "/nope.h5", b, id); });
  CHECK(e.find(dir + "/nope.h5") != std::string::npos);
  touch(dir + "/garbage.h5", "not an hdf5 file");
  e = error_of([&] { read_adapter_h5(dir + "/garbage.h5", b, id); });
  CHECK(e.find(dir + "/garbage.h5") != std::string::npos);
  CHECK(e.find("H5Fopen") != std::string::npos);
  // RAII: no HDF5 file or object stays open, on the error paths either.
  CHECK(H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL) == 0);
}

TEST_CASE("optimizer shards round trip and re-shard across world sizes") {
  const size_t n = 1003;
  const FullState st = full_state(n);
  struct Case {
    const char* name;
    std::vector<std::pair<uint64_t, uint64_t>> saved, loaded;
  };
  const std::vector<Case> cases = {
      {"1to1", {{0, n}}, {{0, n}}},
      {"2to1", {{0, 502}, {502, n}}, {{0, n}}},
      {"1to2", {{0, n}}, {{0, 502}, {502, n}}},
      {"3to2", {{0, 1}, {1, 700}, {700, n}}, {{0, 502}, {502, n}}},
      {"2to3", {{0, 502}, {502, n}}, {{0, 335}, {335, 669}, {669, n}}},
      {"empty_ranges", {{0, 0}, {0, n}}, {{0, 0}, {n, n}, {0, n}}},
  };
  for (const Case& c : cases) {
    SUBCASE(c.name) {
      const std::string dir = test::scratch(std::string("ckpt_reshard_") + c.name);
      write_shards(dir, st, c.saved);
      for (auto [b, e] : c.loaded) {
        const OptimizerShard got = read_optimizer_resharded(dir, b, e, identity(n));
        check_slice(got, st, b, e);
        CHECK(got.world_size == static_cast<int>(c.saved.size()));
      }
    }
  }
}

TEST_CASE("optimizer shard sets with missing, overlapping or mixed files are refused") {
  const size_t n = 1000;
  const FullState st = full_state(n);
  const CheckpointIdentity id = identity(n);

  std::string dir = test::scratch("ckpt_shard_missing");
  write_shards(dir, st, {{0, 300}, {300, 600}, {600, n}});
  fs::remove(dir + "/" + optimizer_shard_file(1, 3));
  CHECK(error_of([&] {
          read_optimizer_resharded(dir, 0, n, id);
        }).find("missing optimizer-rank-1-of-3.h5") != std::string::npos);

  dir = test::scratch("ckpt_shard_gap");
  write_shards(dir, st, {{0, 300}, {400, n}});
  CHECK(error_of([&] { read_optimizer_resharded(dir, 0, n, id); }).find("gap") !=
        std::string::npos);

  dir = test::scratch("ckpt_shard_overlap");
  write_shards(dir, st, {{0, 500}, {400, n}});
  CHECK(error_of([&] { read_optimizer_resharded(dir, 0, n, id); }).find("overlap") !=
        std::string::npos);

  dir = test::scratch("ckpt_shard_short");
  write_shards(dir, st, {{0, 500}, {500, 900}});
  CHECK(error_of([&] { read_optimizer_resharded(dir, 0, 900, id); }).find("cover [0, 900)") !=
        std::string::npos);

  dir = test::scratch("ckpt_shard_mixed");
  write_shards(dir, st, {{0, 500}, {500, n}});
  write_shards(dir, st, {{0, n}});
  CHECK(error_of([&] { read_optimizer_resharded(dir, 0, n, id); }).find("mixes") !=
        std::string::npos);

  dir = test::scratch("ckpt_shard_none");
  CHECK(error_of([&] { read_optimizer_resharded(dir, 0, n, id); }).find("no optimizer") !=
        std::string::npos);

  dir = test::scratch("ckpt_shard_identity");
  write_shards(dir, st, {{0, 500}, {500, n}});
  CheckpointIdentity other = id;
  other.model_fingerprint = "another";
  CHECK(error_of([&] { read_optimizer_resharded(dir, 0, n, other); }).find("model_fingerprint") !=
        std::string::npos);
  CHECK(error_of([&] { read_optimizer_resharded(dir, 0, n + 1, id); }).find("outside") !=
        std::string::npos);
  CHECK(H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL) == 0);
}

TEST_CASE("optimizer shards disagreeing on the step are refused") {
  const size_t n = 100;
  const FullState st = full_state(n);
  const std::string dir = test::scratch("ckpt_shard_step");
  const std::string other = test::scratch("ckpt_shard_step_other");
  write_shards(dir, st, {{0, 50}, {50, n}}, 7);
  write_shards(other, st, {{0, 50}, {50, n}}, 8);
  fs::copy_file(other + "/" + optimizer_shard_file(1, 2), dir + "/" + optimizer_shard_file(1, 2),
                fs::copy_options::overwrite_existing);
  CHECK(error_of([&] {
          read_optimizer_resharded(dir, 0, n, identity(n));
        }).find("disagree on the step") != std::string::npos);
}

TEST_CASE("trainer_state.h5 round trip") {
  const std::string dir = test::scratch("ckpt_state");
  TrainerState s;
  s.step = 123;
  s.data_epoch = 2;
  s.data_pos = 17;
  s.data_consumed = 999;
  s.seed = 0xFEDCBA9876543210ull;  // above INT64_MAX: must survive as unsigned
  s.world_size = 3;
  s.tokens = 1234567;
  std::mt19937_64 rng(5);
  for (int i = 0; i < 123; ++i) {
    const uint64_t bits = rng();
    double d;
    std::memcpy(&d, &bits, 8);
    s.losses.push_back(d);
  }
  // Longer than an attribute may hold (64 KiB), multi-line, with UTF-8.
  for (int i = 0; i < 2000; ++i)
    s.metrics_jsonl += "{\"step\": " + std::to_string(i) + ", \"loss\": 1.25, \"note\": \"ü→λ\"}\n";
  write_trainer_state_h5(dir + "/trainer_state.h5", s);
  const TrainerState r = read_trainer_state_h5(dir + "/trainer_state.h5");
  CHECK(r.step == s.step);
  CHECK(r.data_epoch == s.data_epoch);
  CHECK(r.data_pos == s.data_pos);
  CHECK(r.data_consumed == s.data_consumed);
  CHECK(r.seed == s.seed);
  CHECK(r.world_size == s.world_size);
  CHECK(r.tokens == s.tokens);
  CHECK(r.metrics_jsonl == s.metrics_jsonl);
  REQUIRE(r.losses.size() == s.losses.size());
  CHECK(std::memcmp(r.losses.data(), s.losses.data(), s.losses.size() * 8) == 0);

  // Empty losses and metrics (a checkpoint at step 0).
  write_trainer_state_h5(dir + "/empty.h5", TrainerState{});
  const TrainerState e = read_trainer_state_h5(dir + "/empty.h5");
  CHECK(e.losses.empty());
  CHECK(e.metrics_jsonl.empty());
  CHECK(e.step == 0);
}

TEST_CASE("every checkpoint file is readable by h5dump") {
  if (std::system("command -v h5dump > /dev/null 2>&1") != 0) {
    MESSAGE("h5dump not installed (apt-get install hdf5-tools): skipped");
    return;
  }
  const std::string dir = test::scratch("ckpt_h5dump");
  LoraAdapter a = make_adapter(4, 8.0, {"all"});
  a.init_peft_default(3);
  const CheckpointIdentity id = identity(static_cast<int64_t>(a.params.size()));
  write_adapter_h5(dir + "/adapter.h5", a, id);
  write_shards(dir, full_state(a.params.size()), {{0, 10}, {10, a.params.size()}});
  TrainerState s;
  s.losses = {1.0, 2.0};
  s.metrics_jsonl = "{\"a\": 1}\n";
  write_trainer_state_h5(dir + "/trainer_state.h5", s);
  for (const char* f :
       {"adapter.h5", "optimizer-rank-0-of-2.h5", "optimizer-rank-1-of-2.h5", "trainer_state.h5"}) {
    const std::string cmd = "h5dump -H '" + dir + "/" + f + "' > /dev/null 2>&1";
    CHECK_MESSAGE(std::system(cmd.c_str()) == 0, f);
  }
  const std::string cmd = "h5dump -d metrics_jsonl '" + dir + "/trainer_state.h5' > /dev/null 2>&1";
  CHECK(std::system(cmd.c_str()) == 0);
}

TEST_CASE("finalize_checkpoint renames atomically and writes COMPLETE last") {
  const fs::path out = test::scratch("ckpt_finalize");
  const fs::path tmp = out / "checkpoint-12.tmp", final_dir = out / "checkpoint-12";
  fs::create_directories(tmp / "adapter");
  touch(tmp / "adapter.h5");
  touch(tmp / "adapter" / "adapter_config.json", "{}");
  CHECK_FALSE(find_latest_checkpoint(out.string()).has_value());  // a .tmp is no checkpoint
  CHECK_FALSE(fs::exists(final_dir));

  finalize_checkpoint(tmp.string(), final_dir.string());
  CHECK_FALSE(fs::exists(tmp));
  CHECK(fs::is_regular_file(final_dir / "adapter" / "adapter_config.json"));
  std::ifstream in(final_dir / "COMPLETE");
  std::stringstream text;
  text << in.rdbuf();
  CHECK(text.str().find("step 12") != std::string::npos);
  CHECK(text.str().find("time ") != std::string::npos);
  CHECK(find_latest_checkpoint(out.string()) == final_dir.string());

  // The final name must not exist yet; a missing tmp dir is an error.
  fs::create_directories(tmp);
  CHECK(error_of([&] {
          finalize_checkpoint(tmp.string(), final_dir.string());
        }).find("already exists") != std::string::npos);
  CHECK(fs::exists(tmp));
  CHECK_FALSE(error_of([&] {
                finalize_checkpoint((out / "nope.tmp").string(), (out / "x").string());
              }).empty());
}

TEST_CASE("find_latest_checkpoint picks the highest complete step") {
  const fs::path out = test::scratch("ckpt_latest");
  CHECK_FALSE(find_latest_checkpoint(out.string()).has_value());
  CHECK_FALSE(find_latest_checkpoint((out / "missing").string()).has_value());
  make_checkpoint(out, 9, true);
  make_checkpoint(out, 10, true);    // numeric order, not lexicographic
  make_checkpoint(out, 100, false);  // no COMPLETE: ignored
  fs::create_directories(out / "checkpoint-200.tmp");
  touch(out / "checkpoint-200.tmp" / "COMPLETE");  // a .tmp never counts
  fs::create_directories(out / "checkpoint-abc");
  touch(out / "checkpoint-abc" / "COMPLETE");
  touch(out / "checkpoint-300");  // a file, not a directory
  CHECK(find_latest_checkpoint(out.string()) == (out / "checkpoint-10").string());
}

TEST_CASE("prune_checkpoints keeps the newest complete ones and drops stale .tmp dirs") {
  const fs::path out = test::scratch("ckpt_prune");
  for (int64_t step : {5, 10, 15, 20, 25}) make_checkpoint(out, step, true);
  make_checkpoint(out, 30, false);
  fs::create_directories(out / "checkpoint-35.tmp");

  prune_checkpoints(out.string(), 0);  // keep all, but the stale .tmp goes
  CHECK_FALSE(fs::exists(out / "checkpoint-35.tmp"));
  CHECK(fs::exists(out / "checkpoint-5"));

  prune_checkpoints(out.string(), 2);
  for (int64_t step : {5, 10, 15}) CHECK_FALSE(fs::exists(out / checkpoint_dir_name(step)));
  CHECK(fs::exists(out / "checkpoint-20"));
  CHECK(fs::exists(out / "checkpoint-25"));
  CHECK(fs::exists(out / "checkpoint-30"));  // incomplete: left alone, never counted

  prune_checkpoints(out.string(), 1);
  CHECK_FALSE(fs::exists(out / "checkpoint-20"));
  CHECK(find_latest_checkpoint(out.string()) == (out / "checkpoint-25").string());
  prune_checkpoints((out / "missing").string(), 1);  // no output dir: nothing to do
}

TEST_CASE("recover_checkpoints undoes a re-save killed halfway, and tidies a finished one") {
  const fs::path out = test::scratch("ckpt_recover");
  // Killed after the old copy was moved aside, before the new one was renamed in.
  make_checkpoint(out, 4, true);
  fs::rename(out / "checkpoint-4", out / "checkpoint-4.old");
  // Killed after the rename, before COMPLETE: the new copy is incomplete.
  make_checkpoint(out, 8, true);
  fs::rename(out / "checkpoint-8", out / "checkpoint-8.old");
  make_checkpoint(out, 8, false);
  // Finished: both complete, the .old is left over.
  make_checkpoint(out, 12, true);
  make_checkpoint(out, 13, true);
  fs::rename(out / "checkpoint-13", out / "checkpoint-12.old");
  // An incomplete .old is not ours to judge.
  make_checkpoint(out, 16, false);
  fs::rename(out / "checkpoint-16", out / "checkpoint-16.old");

  recover_checkpoints(out.string());
  CHECK(fs::is_regular_file(out / "checkpoint-4" / "COMPLETE"));
  CHECK_FALSE(fs::exists(out / "checkpoint-4.old"));
  CHECK(fs::is_regular_file(out / "checkpoint-8" / "COMPLETE"));
  CHECK_FALSE(fs::exists(out / "checkpoint-8.old"));
  CHECK(fs::is_regular_file(out / "checkpoint-12" / "COMPLETE"));
  CHECK_FALSE(fs::exists(out / "checkpoint-12.old"));
  CHECK(fs::exists(out / "checkpoint-16.old"));
  CHECK(find_latest_checkpoint(out.string()) == (out / "checkpoint-12").string());
  recover_checkpoints((out / "missing").string());  // no output dir: nothing to do
}
