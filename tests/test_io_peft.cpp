// PEFT adapters: save -> load round trip, adapter_config.json contents, mismatch errors,
// older ".default." keys, and the reference init_adapter from shared data.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>

#include "ftune/io/hf_model.hpp"
#include "ftune/io/peft.hpp"
#include "ftune/io/safetensors.hpp"
#include "test_util.hpp"

using namespace ftune;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

ModelConfig tiny_model() { return ftune::test::llama_tiny_config(); }

using ftune::test::error_of;

LoraSpec spec(int r, double alpha, std::vector<std::string> targets, bool rslora = false) {
  LoraSpec s;
  s.rank = r;
  s.alpha = alpha;
  s.use_rslora = rslora;
  s.targets = LoraSpec::parse_targets(targets);
  return s;
}

LoraAdapter make_adapter(const LoraSpec& s, uint64_t seed) {
  LoraAdapter a;
  a.allocate(tiny_model(), s);
  a.init_peft_default(seed);
  // Non-zero B too, so the round trip checks every value.
  for (const LoraSlot& sl : a.slots)
    for (int64_t i = 0; i < sl.out * s.rank; ++i)
      a.params[sl.b_offset + i] = 0.001f * static_cast<float>((i + seed) % 97) - 0.05f;
  return a;
}

// Directory entries next to `dir` whose name starts with dir's name (temp/aside leftovers).
std::vector<std::string> siblings(const std::string& dir) {
  std::vector<std::string> r;
  const std::string stem = fs::path(dir).filename().string();
  for (const auto& e : fs::directory_iterator(fs::path(dir).parent_path())) {
    const std::string n = e.path().filename().string();
    if (n != stem && n.rfind(stem, 0) == 0) r.push_back(n);
  }
  return r;
}

}  // namespace

TEST_CASE("save_peft_adapter -> load_peft_adapter round trip, overwrite in place") {
  const std::string root = test::scratch("io_peft_rt");
  const std::string dir = root + "/adapter";
  const LoraSpec s = spec(4, 8, {"all-linear"});
  const LoraAdapter a = make_adapter(s, 3);
  save_peft_adapter(dir, a, "some/base-model");
  CHECK(fs::exists(dir + "/adapter_config.json"));
  CHECK(fs::exists(dir + "/adapter_model.safetensors"));
  CHECK(siblings(dir).empty());

  LoraAdapter b;
  b.allocate(tiny_model(), s);
  load_peft_adapter(dir, b);
  CHECK(b.params == a.params);

  // Tensor names, shapes and the metadata PEFT/transformers expect.
  SafetensorsFile f(dir + "/adapter_model.safetensors");
  CHECK(f.names().size() == 2 * 7 * 2);
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.info("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight").shape ==
        std::vector<int64_t>{4, 64});
  CHECK(f.info("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight").shape ==
        std::vector<int64_t>{32, 4});
  CHECK(f.info("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight").shape ==
        std::vector<int64_t>{4, 160});

  // Saving again over the existing directory replaces it and leaves nothing behind.
  const LoraAdapter a2 = make_adapter(s, 11);
  REQUIRE(a2.params != a.params);
  save_peft_adapter(dir + "/", a2, "");
  CHECK(siblings(dir).empty());
  load_peft_adapter(dir, b);
  CHECK(b.params == a2.params);
  const json cfg = json::parse(std::ifstream(dir + "/adapter_config.json"));
  CHECK(cfg["base_model_name_or_path"].is_null());
}

TEST_CASE("adapter_config.json has PEFT's fields and values") {
  const std::string dir = test::scratch("io_peft_cfg") + "/adapter";
  LoraSpec s = spec(8, 16, {"q_proj", "v_proj"}, true);
  s.dropout = 0.05;
  save_peft_adapter(dir, make_adapter(s, 1), "meta-llama/Llama-3.2-1B");
  const json j = json::parse(std::ifstream(dir + "/adapter_config.json"));
  CHECK(j["peft_type"] == "LORA");
  CHECK(j["task_type"] == "CAUSAL_LM");
  CHECK(j["r"] == 8);
  CHECK(j["lora_alpha"].is_number_integer());
  CHECK(j["lora_alpha"] == 16);
  CHECK(j["lora_dropout"].get<double>() == doctest::Approx(0.05));
  CHECK(j["use_rslora"] == true);
  CHECK(j["use_dora"] == false);
  CHECK(j["bias"] == "none");
  CHECK(j["fan_in_fan_out"] == false);
  CHECK(j["inference_mode"] == true);
  CHECK(j["init_lora_weights"] == true);
  CHECK(j["modules_to_save"].is_null());
  CHECK(j["layers_to_transform"].is_null());
  CHECK(j["rank_pattern"] == json::object());
  CHECK(j["alpha_pattern"] == json::object());
  CHECK(j["peft_version"] == "0.21.0");
  CHECK(j["base_model_name_or_path"] == "meta-llama/Llama-3.2-1B");
  CHECK(j["target_modules"].get<std::set<std::string>>() == std::set<std::string>{"q_proj", "v_proj"});

  if (test::have_shared()) {  // same key set as a real PEFT 0.21 file
    const json ref = json::parse(std::ifstream(
        test::shared_dir() + "/data/reference/llama_tiny/init_adapter/adapter_config.json"));
    std::set<std::string> ours, theirs;
    for (const auto& [k, v] : j.items()) ours.insert(k);
    for (const auto& [k, v] : ref.items()) theirs.insert(k);
    CHECK(ours == theirs);
  }

  // A fractional alpha stays a float.
  s.alpha = 2.5;
  save_peft_adapter(dir, make_adapter(s, 1), "");
  CHECK(json::parse(std::ifstream(dir + "/adapter_config.json"))["lora_alpha"] == 2.5);
}

TEST_CASE("load_peft_adapter refuses adapters that differ from the run") {
  const std::string dir = test::scratch("io_peft_mm") + "/adapter";
  save_peft_adapter(dir, make_adapter(spec(4, 8, {"q_proj", "k_proj", "v_proj"}), 5), "");
  auto load_as = [&](const LoraSpec& s) {
    LoraAdapter a;
    a.allocate(tiny_model(), s);
    return error_of([&] { load_peft_adapter(dir, a); });
  };
  CHECK(load_as(spec(4, 8, {"q_proj", "k_proj", "v_proj"})).empty());

  std::string e = load_as(spec(8, 8, {"q_proj", "k_proj", "v_proj"}));
  CHECK(e.find("'r'") != std::string::npos);
  CHECK(e.find("adapter has 4") != std::string::npos);
  CHECK(e.find("run has 8") != std::string::npos);
  CHECK(e.find("adapter_config.json") != std::string::npos);

  e = load_as(spec(4, 16, {"q_proj", "k_proj", "v_proj"}));
  CHECK(e.find("lora_alpha") != std::string::npos);
  CHECK(e.find("16") != std::string::npos);

  e = load_as(spec(4, 8, {"q_proj", "k_proj", "v_proj"}, true));
  CHECK(e.find("use_rslora") != std::string::npos);

  e = load_as(spec(4, 8, {"q_proj", "v_proj"}));
  CHECK(e.find("target_modules") != std::string::npos);
  CHECK(e.find("k_proj") != std::string::npos);

  // A different layer count: the adapter's layer-1 tensors are not used by a 1-layer run.
  LoraAdapter one;
  ModelConfig m1 = tiny_model();
  m1.num_hidden_layers = 1;
  one.allocate(m1, spec(4, 8, {"q_proj", "k_proj", "v_proj"}));
  e = error_of([&] { load_peft_adapter(dir, one); });
  CHECK(e.find("layers.1") != std::string::npos);

  // A shape mismatch (different model width) names the tensor.
  LoraAdapter wide;
  ModelConfig mw = tiny_model();
  mw.hidden_size = 128;
  wide.allocate(mw, spec(4, 8, {"q_proj", "k_proj", "v_proj"}));
  e = error_of([&] { load_peft_adapter(dir, wide); });
  CHECK(e.find("lora_A") != std::string::npos);
  CHECK(e.find("[4, 64]") != std::string::npos);
}

TEST_CASE("missing tensors, .default. keys, .bin adapters, unsupported config") {
  const std::string dir = test::scratch("io_peft_keys") + "/adapter";
  const LoraSpec s = spec(4, 8, {"q_proj", "o_proj"});
  const LoraAdapter a = make_adapter(s, 9);
  save_peft_adapter(dir, a, "");
  const std::string st = dir + "/adapter_model.safetensors";

  // Rewrite the tensors with older PEFT's ".default." names, dropping one.
  auto rewrite = [&](const std::string& drop, bool with_default) {
    std::vector<TensorToWrite> t;
    for (const LoraSlot& sl : a.slots) {
      for (char which : {'A', 'B'}) {
        std::string key = LoraAdapter::peft_key(sl.layer, sl.proj, which);
        if (key == drop) continue;
        if (with_default) key.insert(key.size() - std::string(".weight").size(), ".default");
        const bool isA = which == 'A';
        t.push_back({key, isA ? std::vector<int64_t>{4, sl.in} : std::vector<int64_t>{sl.out, 4},
                     a.params.data() + (isA ? sl.a_offset : sl.b_offset)});
      }
    }
    write_safetensors(st, t);
  };
  LoraAdapter b;
  b.allocate(tiny_model(), s);
  rewrite("", true);
  load_peft_adapter(dir, b);
  CHECK(b.params == a.params);

  const std::string gone = LoraAdapter::peft_key(1, Proj::o, 'B');
  rewrite(gone, false);
  std::string e = error_of([&] { load_peft_adapter(dir, b); });
  CHECK(e.find(gone) != std::string::npos);
  CHECK(e.find("adapter_model.safetensors") != std::string::npos);

  fs::rename(st, dir + "/adapter_model.bin");
  e = error_of([&] { load_peft_adapter(dir, b); });
  CHECK(e.find("adapter_model.bin") != std::string::npos);
  CHECK(e.find("safetensors") != std::string::npos);
  fs::remove(dir + "/adapter_model.bin");
  CHECK(error_of([&] { load_peft_adapter(dir, b); }).find(dir) != std::string::npos);

  // Config features that would change the adapter's meaning are refused by key.
  save_peft_adapter(dir, a, "");
  const std::string cfg_path = dir + "/adapter_config.json";
  const json cfg = json::parse(std::ifstream(cfg_path));
  for (const auto& [key, value] : std::vector<std::pair<std::string, json>>{
           {"use_dora", true}, {"bias", "all"}, {"rank_pattern", {{"q_proj", 8}}},
           {"modules_to_save", {"lm_head"}}, {"layers_to_transform", {0}}}) {
    json edited = cfg;
    edited[key] = value;
    std::ofstream(cfg_path) << edited.dump();
    CHECK(error_of([&] { load_peft_adapter(dir, b); }).find(key) != std::string::npos);
  }
  // PEFT may also store target_modules as a regex string.
  json edited = cfg;
  edited["target_modules"] = ".*\\.(q_proj|o_proj)";
  std::ofstream(cfg_path) << edited.dump();
  load_peft_adapter(dir, b);
  CHECK(b.params == a.params);
}

TEST_CASE("reference init_adapter from shared data loads") {
  if (!test::have_shared()) {
    MESSAGE("shared data absent: skipping reference init_adapter");
    return;
  }
  const std::string ref = test::shared_dir() + "/data/reference/llama_tiny";
  const ModelConfig m = load_model_config(ref + "/model");
  CHECK(m.q_dim() == tiny_model().q_dim());
  LoraAdapter a;
  a.allocate(m, spec(4, 8, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"}));
  load_peft_adapter(ref + "/init_adapter", a);
  REQUIRE(a.slots.size() == 14);

  // Every A and B equals the file's tensor; the reference B is deliberately non-zero (README).
  SafetensorsFile f(ref + "/init_adapter/adapter_model.safetensors");
  for (const LoraSlot& sl : a.slots) {
    CAPTURE(sl.layer);
    CAPTURE(std::string(proj_name(sl.proj)));
    std::vector<float> A(4 * sl.in), B(sl.out * 4);
    f.read_f32(LoraAdapter::peft_key(sl.layer, sl.proj, 'A'), {4, sl.in}, A.data());
    f.read_f32(LoraAdapter::peft_key(sl.layer, sl.proj, 'B'), {sl.out, 4}, B.data());
    CHECK(std::equal(A.begin(), A.end(), a.params.data() + sl.a_offset));
    CHECK(std::equal(B.begin(), B.end(), a.params.data() + sl.b_offset));
    CHECK(std::any_of(A.begin(), A.end(), [](float x) { return x != 0.0f; }));
    CHECK(std::any_of(B.begin(), B.end(), [](float x) { return x != 0.0f; }));
  }

  // The trained adapter of the same run loads into the same layout and differs from init.
  LoraAdapter trained;
  trained.allocate(m, a.spec);
  load_peft_adapter(ref + "/expected/peft", trained);
  CHECK(trained.params != a.params);

  // A run with a different rank is refused, naming the key.
  LoraAdapter r8;
  r8.allocate(m, spec(8, 8, {"all"}));
  CHECK(error_of([&] { load_peft_adapter(ref + "/init_adapter", r8); }).find("'r'") !=
        std::string::npos);
}

TEST_CASE("repo fixtures: PEFT init and trained adapters load and re-save unchanged") {
  const std::string fx = test::source_dir() + "/tests/fixtures";
  if (!fs::exists(fx + "/qwen2_tiny/init_adapter")) {
    MESSAGE("tests/fixtures absent: skipping");
    return;
  }
  for (const std::string name : {"qwen2_tiny", "llama_rslora", "qwen3_tiny"}) {
    CAPTURE(name);
    const json run = json::parse(std::ifstream(fx + "/" + name + "/run.json"));
    const LoraSpec s = spec(run["r"].get<int>(), run["alpha"].get<double>(),
                            run["target_modules"].get<std::vector<std::string>>(),
                            run.value("use_rslora", false));
    const ModelConfig m = load_model_config(fx + "/" + name + "/model");
    for (const std::string sub : {"init_adapter", "expected/peft"}) {
      CAPTURE(sub);
      const std::string src = fx + "/" + name + "/" + sub;
      LoraAdapter a;
      a.allocate(m, s);
      load_peft_adapter(src, a);

      const std::string out = test::scratch("io_peft_fx") + "/adapter";
      save_peft_adapter(out, a, "");
      SafetensorsFile theirs(src + "/adapter_model.safetensors"), ours(out + "/adapter_model.safetensors");
      CHECK(ours.names() == theirs.names());
      for (const std::string& n : theirs.names()) {
        CHECK(ours.info(n).shape == theirs.info(n).shape);
        std::vector<float> x(theirs.info(n).numel()), y(x.size());
        theirs.read_f32(n, theirs.info(n).shape, x.data());
        ours.read_f32(n, ours.info(n).shape, y.data());
        CHECK(x == y);
      }
      const json jt = json::parse(std::ifstream(src + "/adapter_config.json"));
      const json jo = json::parse(std::ifstream(out + "/adapter_config.json"));
      for (const char* k : {"r", "lora_alpha", "use_rslora", "peft_type", "task_type", "bias"})
        CHECK(jo[k] == jt[k]);
      CHECK(jo["target_modules"].get<std::set<std::string>>() ==
            jt["target_modules"].get<std::set<std::string>>());
    }
  }
}
