// config.json parsing (llama/mistral/qwen2/qwen3, RoPE styles, refusals) and
// save_hf_model -> load_model_config/load_base_weights round trips.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "ftune/io/hf_model.hpp"
#include "ftune/io/safetensors.hpp"
#include "test_util.hpp"

using namespace ftune;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using ftune::test::error_of;

// A small config in the older (transformers 4) style; tests edit it per case.
json base_config(const std::string& type) {
  return {{"model_type", type},     {"vocab_size", 96},       {"hidden_size", 32},
          {"intermediate_size", 48}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
          {"num_key_value_heads", 2}, {"max_position_embeddings", 128},
          {"rms_norm_eps", 1e-6},   {"rope_theta", 10000.0},  {"rope_scaling", nullptr},
          {"hidden_act", "silu"},   {"tie_word_embeddings", false},
          {"bos_token_id", 1},      {"eos_token_id", 2}};
}

std::string write_config(const std::string& name, const json& j) {
  const std::string dir = test::scratch(name);
  std::ofstream(dir + "/config.json") << j.dump(2);
  return dir;
}

ModelConfig parse(const std::string& name, const json& j) {
  return load_model_config(write_config(name, j));
}

std::string parse_error(const std::string& name, const json& j) {
  return error_of([&] { (void)parse(name, j); });
}

// Fills every weight with a distinct, position-dependent value.
void fill(BaseWeights& w) {
  for (size_t i = 0; i < w.storage.size(); ++i)
    w.storage[i] = static_cast<float>((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
}

}  // namespace

TEST_CASE("reference llama_tiny config (transformers-5 rope_parameters, llama3)") {
  if (!test::have_shared()) {
    MESSAGE("shared data absent: skipping reference llama_tiny config");
    return;
  }
  const std::string dir = test::shared_dir() + "/data/reference/llama_tiny/model";
  const ModelConfig c = load_model_config(dir);
  CHECK(c.model_type == "llama");
  CHECK(c.vocab_size == 384);
  CHECK(c.hidden_size == 64);
  CHECK(c.intermediate_size == 160);
  CHECK(c.num_hidden_layers == 2);
  CHECK(c.num_attention_heads == 4);
  CHECK(c.num_key_value_heads == 2);
  CHECK(c.head_dim == 16);
  CHECK(c.max_position_embeddings == 256);
  CHECK(c.rms_norm_eps == doctest::Approx(1e-5));
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK_FALSE(c.attention_bias);
  CHECK_FALSE(c.qk_norm);
  CHECK(c.bos_token_id == 1);
  CHECK(c.eos_token_id == 2);
  CHECK(c.pad_token_id == -1);
  CHECK(c.rope.type == "llama3");
  CHECK(c.rope.theta == 500000.0);
  CHECK(c.rope.factor == 8.0);
  CHECK(c.rope.low_freq_factor == 1.0);
  CHECK(c.rope.high_freq_factor == 4.0);
  CHECK(c.rope.original_max_position_embeddings == 64);

  const BaseWeights w = load_base_weights(dir);
  CHECK(w.lm_head != w.embed);
  SafetensorsFile f(dir + "/model.safetensors");
  std::vector<float> expect(384 * 64);  // room for the largest tensor read below
  f.read_f32("model.layers.1.mlp.down_proj.weight", {64, 160}, expect.data());
  CHECK(std::equal(expect.begin(), expect.begin() + 64 * 160, w.layers[1].w[static_cast<int>(Proj::down)]));
  f.read_f32("lm_head.weight", {384, 64}, expect.data());
  CHECK(std::equal(expect.begin(), expect.begin() + 384 * 64, w.lm_head));
  f.read_f32("model.norm.weight", {64}, expect.data());
  CHECK(std::equal(expect.begin(), expect.begin() + 64, w.final_norm));
}

TEST_CASE("older config style: top-level rope_theta + rope_scaling") {
  json j = base_config("llama");
  j["rope_theta"] = 1e6;
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 4}};
  j["eos_token_id"] = {7, 8};
  j["pad_token_id"] = nullptr;
  j["head_dim"] = nullptr;
  j.erase("num_key_value_heads");
  ModelConfig c = parse("io_hf_old_linear", j);
  CHECK(c.rope.type == "linear");
  CHECK(c.rope.theta == 1e6);
  CHECK(c.rope.factor == 4.0);
  CHECK(c.eos_token_id == 7);
  CHECK(c.pad_token_id == -1);
  CHECK(c.head_dim == 8);             // hidden / heads
  CHECK(c.num_key_value_heads == 4);  // defaults to heads

  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 32.0}, {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  c = parse("io_hf_old_llama3", j);
  CHECK(c.rope.type == "llama3");
  CHECK(c.rope.factor == 32.0);
  CHECK(c.rope.original_max_position_embeddings == 8192);
  CHECK(c.rope.theta == 1e6);

  j["rope_scaling"] = nullptr;
  c = parse("io_hf_old_default", j);
  CHECK(c.rope.type == "default");
  CHECK(c.rope.theta == 1e6);

  j.erase("rope_theta");
  CHECK(parse("io_hf_no_theta", j).rope.theta == 10000.0);
}

TEST_CASE("qwen2, qwen3 and mistral specifics") {
  json q2 = base_config("qwen2");
  q2["attention_bias"] = false;  // Qwen2 has q/k/v biases whatever the key says
  q2["use_sliding_window"] = false;
  q2["sliding_window"] = 32;  // inert while use_sliding_window is false
  q2["max_window_layers"] = 0;
  q2["tie_word_embeddings"] = true;
  ModelConfig c = parse("io_hf_qwen2", q2);
  CHECK(c.attention_bias);
  CHECK_FALSE(c.qk_norm);
  CHECK(c.tie_word_embeddings);

  CHECK(c.sliding_window == -1);
  q2["use_sliding_window"] = true;  // a window that bites is recorded for the trainer's check
  CHECK(parse("io_hf_qwen2_swa", q2).sliding_window == 32);
  q2["max_window_layers"] = 2;  // no layer at or past max_window_layers: window unused
  CHECK(parse("io_hf_qwen2_swa_unused", q2).sliding_window == -1);
  q2["use_sliding_window"] = false;
  q2["layer_types"] = {"full_attention", "sliding_attention"};
  CHECK(parse_error("io_hf_qwen2_layer_types", q2).find("layer_types") != std::string::npos);

  json q3 = base_config("qwen3");
  q3["head_dim"] = 16;  // Qwen3 head_dim need not be hidden/heads
  q3["attention_bias"] = true;
  c = parse("io_hf_qwen3", q3);
  CHECK(c.qk_norm);
  CHECK(c.attention_bias);
  CHECK(c.head_dim == 16);
  CHECK(c.q_dim() == 64);
  q3.erase("head_dim");
  q3.erase("attention_bias");
  c = parse("io_hf_qwen3_defaults", q3);
  CHECK(c.head_dim == 128);  // transformers' Qwen3Config default
  CHECK_FALSE(c.attention_bias);

  json m = base_config("mistral");
  m["sliding_window"] = nullptr;
  m["attention_bias"] = true;  // MistralAttention has no biases
  c = parse("io_hf_mistral", m);
  CHECK_FALSE(c.attention_bias);
  CHECK(c.sliding_window == -1);
  m["sliding_window"] = 4096;  // >= max_position_embeddings (128): never restricts attention
  CHECK(parse("io_hf_mistral_big_window", m).sliding_window == -1);
  m["sliding_window"] = 64;  // Mistral-7B-v0.1 style: recorded, written back by save_hf_model
  c = parse("io_hf_mistral_swa", m);
  CHECK(c.sliding_window == 64);
  CHECK(json::parse(model_config_to_json(c))["sliding_window"] == 64);
}

TEST_CASE("unsupported or incomplete configs are refused with the key named") {
  json j = base_config("gemma");
  std::string e = parse_error("io_hf_gemma", j);
  CHECK(e.find("gemma") != std::string::npos);
  CHECK(e.find("config.json") != std::string::npos);
  CHECK(e.find("llama, mistral, qwen2, qwen3") != std::string::npos);

  j = base_config("llama");
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 10000.0}, {"factor", 4.0}};
  j.erase("rope_scaling");
  e = parse_error("io_hf_yarn", j);
  CHECK(e.find("yarn") != std::string::npos);
  CHECK(e.find("default, linear, llama3") != std::string::npos);

  j = base_config("llama");
  j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
  CHECK(parse_error("io_hf_dynamic", j).find("dynamic") != std::string::npos);

  j = base_config("llama");
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  CHECK(parse_error("io_hf_llama3_incomplete", j).find("low_freq_factor") != std::string::npos);

  j = base_config("llama");
  j.erase("hidden_size");
  e = parse_error("io_hf_missing", j);
  CHECK(e.find("hidden_size") != std::string::npos);
  CHECK(e.find("config.json") != std::string::npos);

  j = base_config("llama");
  j["mlp_bias"] = true;
  CHECK(parse_error("io_hf_mlp_bias", j).find("mlp_bias") != std::string::npos);
  j = base_config("llama");
  j["hidden_act"] = "gelu";
  CHECK(parse_error("io_hf_gelu", j).find("gelu") != std::string::npos);
  j = base_config("llama");
  j["num_key_value_heads"] = 3;
  CHECK(parse_error("io_hf_kv", j).find("num_key_value_heads") != std::string::npos);

  const std::string empty = test::scratch("io_hf_no_config");
  CHECK(error_of([&] { (void)load_model_config(empty); }).find(empty) != std::string::npos);
}

TEST_CASE("save_hf_model -> load_model_config / load_base_weights round trip") {
  struct Case { std::string type; bool tied; std::string rope; };
  for (const Case& k : {Case{"llama", false, "llama3"}, Case{"qwen2", false, "default"},
                        Case{"qwen3", true, "linear"}, Case{"mistral", true, "default"}}) {
    CAPTURE(k.type);
    ModelConfig c = parse("io_hf_rt_cfg", base_config(k.type));
    c.tie_word_embeddings = k.tied;
    c.head_dim = k.type == "qwen3" ? 16 : 8;
    c.pad_token_id = 0;
    c.rope.type = k.rope;
    c.rope.theta = 500000.0;
    if (k.rope != "default") c.rope.factor = 8.0;
    if (k.rope == "llama3") c.rope.original_max_position_embeddings = 64;
    if (k.type == "llama") c.attention_bias = true;

    BaseWeights w;
    w.allocate(c);
    fill(w);
    const std::string dir = test::scratch("io_hf_rt_" + k.type);
    save_hf_model(dir, w);
    CHECK(fs::exists(dir + "/config.json"));
    CHECK(fs::exists(dir + "/model.safetensors"));

    const json j = json::parse(std::ifstream(dir + "/config.json"));
    CHECK(j["architectures"].size() == 1);
    CHECK(j["dtype"] == "float32");
    CHECK(j["torch_dtype"] == "float32");
    CHECK(j["rope_parameters"]["rope_type"] == k.rope);
    CHECK(SafetensorsFile(dir + "/model.safetensors").metadata().at("format") == "pt");
    CHECK(SafetensorsFile(dir + "/model.safetensors").has("lm_head.weight") == !k.tied);

    const ModelConfig r = load_model_config(dir);
    CHECK(r.model_type == c.model_type);
    CHECK(r.vocab_size == c.vocab_size);
    CHECK(r.hidden_size == c.hidden_size);
    CHECK(r.intermediate_size == c.intermediate_size);
    CHECK(r.num_hidden_layers == c.num_hidden_layers);
    CHECK(r.num_attention_heads == c.num_attention_heads);
    CHECK(r.num_key_value_heads == c.num_key_value_heads);
    CHECK(r.head_dim == c.head_dim);
    CHECK(r.max_position_embeddings == c.max_position_embeddings);
    CHECK(r.rms_norm_eps == c.rms_norm_eps);
    CHECK(r.tie_word_embeddings == c.tie_word_embeddings);
    CHECK(r.attention_bias == c.attention_bias);
    CHECK(r.qk_norm == c.qk_norm);
    CHECK(r.bos_token_id == c.bos_token_id);
    CHECK(r.eos_token_id == c.eos_token_id);
    CHECK(r.pad_token_id == 0);
    CHECK(r.rope.type == c.rope.type);
    CHECK(r.rope.theta == c.rope.theta);
    CHECK(r.rope.factor == c.rope.factor);
    if (k.rope == "llama3") CHECK(r.rope.original_max_position_embeddings == 64);

    const BaseWeights back = load_base_weights(dir);
    CHECK(back.storage == w.storage);
    CHECK((back.lm_head == back.embed) == k.tied);
  }
}

TEST_CASE("load_base_weights refuses weights that do not match the config") {
  ModelConfig c = parse("io_hf_mm_cfg", base_config("llama"));
  BaseWeights w;
  const auto entries = w.allocate(c);
  fill(w);
  auto save_with = [&](const std::string& name, const std::function<void(std::vector<TensorToWrite>&)>& edit) {
    const std::string dir = test::scratch(name);
    std::ofstream(dir + "/config.json") << model_config_to_json(c);
    std::vector<TensorToWrite> t;
    for (const auto& e : entries) t.push_back({e.name, e.shape, w.storage.data() + e.offset});
    edit(t);
    write_safetensors(dir + "/model.safetensors", t);
    return dir;
  };
  auto drop = [](const std::string& n) {
    return [n](std::vector<TensorToWrite>& t) {
      std::erase_if(t, [&](const TensorToWrite& x) { return x.name == n; });
    };
  };
  std::string dir = save_with("io_hf_mm_ok", [](auto&) {});
  CHECK(load_base_weights(dir).storage == w.storage);

  dir = save_with("io_hf_mm_lm_head", drop("lm_head.weight"));
  std::string e = error_of([&] { (void)load_base_weights(dir); });
  CHECK(e.find("lm_head.weight") != std::string::npos);
  CHECK(e.find("tie_word_embeddings") != std::string::npos);

  dir = save_with("io_hf_mm_missing", drop("model.layers.1.self_attn.k_proj.weight"));
  e = error_of([&] { (void)load_base_weights(dir); });
  CHECK(e.find("model.layers.1.self_attn.k_proj.weight") != std::string::npos);
  CHECK(e.find(dir) != std::string::npos);

  const std::vector<float> extra(32, 1.0f);
  dir = save_with("io_hf_mm_extra_layer", [&](auto& t) {
    t.push_back({"model.layers.2.input_layernorm.weight", {32}, extra.data()});
  });
  CHECK(error_of([&] { (void)load_base_weights(dir); }).find("num_hidden_layers") != std::string::npos);

  dir = save_with("io_hf_mm_bias", [&](auto& t) {
    t.push_back({"model.layers.0.self_attn.q_proj.bias", {32}, extra.data()});
  });
  CHECK(error_of([&] { (void)load_base_weights(dir); }).find("q_proj.bias") != std::string::npos);

  dir = save_with("io_hf_mm_shape", [&](auto& t) {
    for (auto& x : t)
      if (x.name == "model.norm.weight") x.shape = {16};
  });
  e = error_of([&] { (void)load_base_weights(dir); });
  CHECK(e.find("model.norm.weight") != std::string::npos);
  CHECK(e.find("[32]") != std::string::npos);

  // Unused tensors that do not contradict the config are ignored.
  dir = save_with("io_hf_mm_ignored", [&](auto& t) {
    t.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", {4}, extra.data()});
    t.push_back({"some.other.buffer", {4}, extra.data()});
  });
  CHECK(load_base_weights(dir).storage == w.storage);
}

TEST_CASE("repo fixtures: qwen2 tied+bias, llama bf16 sharded, qwen3 qk_norm") {
  const std::string fx = test::source_dir() + "/tests/fixtures";
  if (!fs::exists(fx + "/qwen2_tiny/model")) {
    MESSAGE("tests/fixtures absent: skipping");
    return;
  }
  struct Expect { std::string name, type; bool tied, bias, qk_norm; int64_t heads, kv, head_dim; std::string rope; };
  for (const Expect& x : {Expect{"qwen2_tiny", "qwen2", true, true, false, 4, 2, 16, "default"},
                          Expect{"llama_rslora", "llama", false, false, false, 4, 1, 16, "linear"},
                          Expect{"qwen3_tiny", "qwen3", false, false, true, 8, 2, 16, "default"}}) {
    CAPTURE(x.name);
    const std::string dir = fx + "/" + x.name + "/model";
    const ModelConfig c = load_model_config(dir);
    CHECK(c.model_type == x.type);
    CHECK(c.tie_word_embeddings == x.tied);
    CHECK(c.attention_bias == x.bias);
    CHECK(c.qk_norm == x.qk_norm);
    CHECK(c.num_attention_heads == x.heads);
    CHECK(c.num_key_value_heads == x.kv);
    CHECK(c.head_dim == x.head_dim);
    CHECK(c.rope.type == x.rope);

    const BaseWeights w = load_base_weights(dir, c);
    CHECK((w.lm_head == w.embed) == x.tied);
    // Every tensor of the directory (single or sharded) landed at its place, converted.
    const SafetensorsSet set(dir);
    BaseWeights layout;
    size_t checked = 0;
    for (const auto& e : layout.allocate(c)) {
      std::vector<float> v(static_cast<size_t>(set.info(e.name).numel()));
      set.read_f32(e.name, e.shape, v.data());
      CHECK(std::equal(v.begin(), v.end(), w.storage.begin() + e.offset));
      if (set.info(e.name).dtype == DType::BF16)  // bf16 values have zero low mantissa bits
        CHECK(std::all_of(v.begin(), v.end(),
                          [](float f) { return (std::bit_cast<uint32_t>(f) & 0xffffu) == 0; }));
      ++checked;
    }
    CHECK(checked == set.names().size());
    if (x.bias) {
      const float* qb = w.layers[0].b[static_cast<int>(Proj::q)];
      CHECK(std::any_of(qb, qb + c.q_dim(), [](float f) { return f != 0.0f; }));
    }
    if (x.qk_norm) CHECK(w.layers[1].k_norm[0] != 0.0f);
  }
}
