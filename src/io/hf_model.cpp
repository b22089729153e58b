// Hugging Face model directories: config.json <-> ModelConfig, safetensors <-> BaseWeights.
#include "ftune/io/hf_model.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "ftune/io/safetensors.hpp"
#include "ftune/model/weight_source.hpp"
#include "io_util.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace ftune {
namespace {

// Typed access to one JSON object with errors naming the file and key. A JSON null counts
// as absent, as transformers treats it (e.g. "head_dim": null).
struct JsonView {
  const json& j;
  std::string file;

  bool has(const std::string& k) const { return j.contains(k) && !j.at(k).is_null(); }
  [[noreturn]] void bad(const std::string& k, const std::string& what) const {
    throw std::runtime_error(file + ": key '" + k + "' " + what);
  }
  int64_t req_int(const std::string& k) const {
    if (!has(k)) bad(k, "is required but missing");
    return to_int(k, j.at(k));
  }
  int64_t opt_int(const std::string& k, int64_t def) const {
    return has(k) ? to_int(k, j.at(k)) : def;
  }
  double opt_num(const std::string& k, double def) const {
    if (!has(k)) return def;
    if (!j.at(k).is_number()) bad(k, "must be a number");
    return j.at(k).get<double>();
  }
  double req_num(const std::string& k) const {
    if (!has(k)) bad(k, "is required but missing");
    return opt_num(k, 0.0);
  }
  bool opt_bool(const std::string& k, bool def) const {
    if (!has(k)) return def;
    if (!j.at(k).is_boolean()) bad(k, "must be true or false");
    return j.at(k).get<bool>();
  }
  std::string opt_str(const std::string& k, const std::string& def) const {
    if (!has(k)) return def;
    if (!j.at(k).is_string()) bad(k, "must be a string");
    return j.at(k).get<std::string>();
  }
  // Token ids: an int, a list (the first is used) or null (-1).
  int64_t token_id(const std::string& k) const {
    if (!has(k)) return -1;
    const json& v = j.at(k);
    if (v.is_array()) return v.empty() || v[0].is_null() ? -1 : to_int(k, v[0]);
    return to_int(k, v);
  }
  int64_t to_int(const std::string& k, const json& v) const {
    // Accept 8.0 for 8 (some exporters write floats), but not 8.5.
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>())
      return static_cast<int64_t>(v.get<double>());
    bad(k, "must be an integer");
  }
};

// RoPE from transformers-5 `rope_parameters`, or the older top-level `rope_theta` +
// `rope_scaling` (null for plain RoPE).
RopeConfig parse_rope(const JsonView& top) {
  RopeConfig r;
  // A non-null rope_scaling wins, as in transformers 5 (`rope_scaling or rope_parameters`).
  const char* key = top.has("rope_scaling")      ? "rope_scaling"
                    : top.has("rope_parameters") ? "rope_parameters"
                                                 : nullptr;
  r.theta = top.opt_num("rope_theta", 10000.0);
  if (!key) return r;
  const json& obj = top.j.at(key);
  if (!obj.is_object()) top.bad(key, "must be an object or null");
  const JsonView rp{obj, top.file + " (" + key + ")"};
  r.type = rp.opt_str("rope_type", rp.opt_str("type", "default"));
  r.theta = rp.opt_num("rope_theta", r.theta);
  if (rp.opt_num("partial_rotary_factor", 1.0) != 1.0)
    rp.bad("partial_rotary_factor", "other than 1.0 is not supported");
  if (r.type == "default") return r;
  if (r.type == "linear") {
    r.factor = rp.req_num("factor");
    return r;
  }
  if (r.type == "llama3") {
    r.factor = rp.req_num("factor");
    r.low_freq_factor = rp.req_num("low_freq_factor");
    r.high_freq_factor = rp.req_num("high_freq_factor");
    r.original_max_position_embeddings = rp.req_int("original_max_position_embeddings");
    return r;
  }
  throw std::runtime_error(top.file + ": unsupported RoPE type '" + r.type + "' in " + key +
                           " (supported: default, linear, llama3)");
}

const char* architecture_of(const std::string& model_type) {
  if (model_type == "llama") return "LlamaForCausalLM";
  if (model_type == "mistral") return "MistralForCausalLM";
  if (model_type == "qwen2") return "Qwen2ForCausalLM";
  if (model_type == "qwen3") return "Qwen3ForCausalLM";
  return nullptr;
}

// HF tensor names of w's views, pointing into w.storage; same names as BaseWeights::allocate
// but built from the views so saving does not allocate a second copy of the model.
std::vector<TensorToWrite> tensors_of(const BaseWeights& w) {
  const ModelConfig& c = w.cfg;
  std::vector<TensorToWrite> t;
  auto add = [&](std::string name, std::vector<int64_t> shape, const float* data) {
    if (!data) throw std::runtime_error("save_hf_model: weights not allocated (" + name + ")");
    t.push_back({std::move(name), std::move(shape), data});
  };
  add("model.embed_tokens.weight", {c.vocab_size, c.hidden_size}, w.embed);
  if (static_cast<int64_t>(w.layers.size()) != c.num_hidden_layers)
    throw std::runtime_error("save_hf_model: weights have " + std::to_string(w.layers.size()) +
                             " layers, config " + std::to_string(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = w.layers[l];
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    add(pre + "input_layernorm.weight", {c.hidden_size}, L.input_norm);
    for (Proj p : kAllProj) {
      const int i = static_cast<int>(p);
      const std::string base = pre + proj_parent(p) + "." + proj_name(p);
      add(base + ".weight", {proj_out_features(c, p), proj_in_features(c, p)}, L.w[i]);
      if (c.attention_bias && (p == Proj::q || p == Proj::k || p == Proj::v))
        add(base + ".bias", {proj_out_features(c, p)}, L.b[i]);
    }
    if (c.qk_norm) {
      add(pre + "self_attn.q_norm.weight", {c.head_dim}, L.q_norm);
      add(pre + "self_attn.k_norm.weight", {c.head_dim}, L.k_norm);
    }
    add(pre + "post_attention_layernorm.weight", {c.hidden_size}, L.post_norm);
  }
  add("model.norm.weight", {c.hidden_size}, w.final_norm);
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, c.hidden_size}, w.lm_head);
  return t;
}

// Streams tensors held in memory (to convert them while writing, one slice at a time).
std::vector<TensorToStream> copy_sources(const std::vector<TensorToWrite>& tensors) {
  std::vector<TensorToStream> r;
  r.reserve(tensors.size());
  for (const TensorToWrite& t : tensors) {
    const float* data = t.data;
    auto fill = [data](float* dst, size_t begin, size_t count) {
      std::copy(data + begin, data + begin + count, dst);
    };
    r.push_back({t.name, t.shape, fill});
  }
  return r;
}

// The names transformers gives a dtype in config.json (torch_dtype / dtype).
const char* torch_dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16";
    default:
      throw std::runtime_error(std::string("HF model files are written as F32 or BF16, not ") +
                               dtype_name(d));
  }
}

}  // namespace

ModelConfig load_model_config(const std::string& dir) {
  const std::string file = (fs::path(dir) / "config.json").string();
  if (!fs::exists(file)) throw std::runtime_error("model directory " + dir + ": no config.json");
  const json j = io::read_json_file(file);
  if (!j.is_object()) throw std::runtime_error(file + ": not a JSON object");
  const JsonView v{j, file};

  ModelConfig c;
  c.model_type = v.opt_str("model_type", "");
  if (!architecture_of(c.model_type))
    throw std::runtime_error(file + ": unsupported model_type '" + c.model_type +
                             "' (supported: llama, mistral, qwen2, qwen3)");
  const bool is_qwen = c.model_type == "qwen2" || c.model_type == "qwen3";

  c.vocab_size = v.req_int("vocab_size");
  c.hidden_size = v.req_int("hidden_size");
  c.intermediate_size = v.req_int("intermediate_size");
  c.num_hidden_layers = v.req_int("num_hidden_layers");
  c.num_attention_heads = v.req_int("num_attention_heads");
  c.max_position_embeddings = v.req_int("max_position_embeddings");
  for (const char* k : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "max_position_embeddings"})
    if (v.req_int(k) <= 0) v.bad(k, "must be positive");
  c.num_key_value_heads = v.opt_int("num_key_value_heads", c.num_attention_heads);
  if (c.num_key_value_heads <= 0 || c.num_attention_heads % c.num_key_value_heads != 0)
    v.bad("num_key_value_heads", "must be positive and divide num_attention_heads");
  // transformers' Qwen3Config defaults head_dim to 128, not hidden/heads.
  if (c.model_type == "qwen3" && !j.contains("head_dim")) {
    c.head_dim = 128;
  } else if (v.has("head_dim")) {
    c.head_dim = v.req_int("head_dim");
    if (c.head_dim <= 0) v.bad("head_dim", "must be positive");
  } else {
    if (c.hidden_size % c.num_attention_heads != 0)
      v.bad("head_dim", "is absent and hidden_size is not divisible by num_attention_heads");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  c.rms_norm_eps = v.opt_num("rms_norm_eps", 1e-6);
  c.tie_word_embeddings = v.opt_bool("tie_word_embeddings", false);

  // Which attention projections carry biases follows the transformers model classes:
  // Qwen2 hard-codes q/k/v biases, Mistral none, Llama and Qwen3 read attention_bias.
  if (c.model_type == "qwen2") c.attention_bias = true;
  else if (c.model_type == "mistral") c.attention_bias = false;
  else c.attention_bias = v.opt_bool("attention_bias", false);
  c.qk_norm = c.model_type == "qwen3";

  if (v.opt_bool("mlp_bias", false)) v.bad("mlp_bias", "= true is not supported");
  const std::string act = v.opt_str("hidden_act", "silu");
  if (act != "silu" && act != "swish") v.bad("hidden_act", "'" + act + "' is not supported (only silu)");

  // Sliding-window attention is not implemented as a mask. Where transformers would apply a
  // window (mistral: sliding_window below max_position_embeddings, e.g. v0.1's 4096; qwen2/3:
  // use_sliding_window with some layer at or past max_window_layers) the window is recorded and
  // the trainer requires model_max_length <= window, where the window masks nothing.
  const int64_t window = v.opt_int("sliding_window", -1);
  const bool window_bites = window >= 0 && window < c.max_position_embeddings;
  if (c.model_type == "mistral" && window_bites) c.sliding_window = window;
  if (is_qwen && v.opt_bool("use_sliding_window", false) && window_bites &&
      v.opt_int("max_window_layers", 0) < c.num_hidden_layers)
    c.sliding_window = window;
  if (v.has("layer_types")) {
    if (!j.at("layer_types").is_array()) v.bad("layer_types", "must be a list");
    for (const auto& t : j.at("layer_types"))
      if (!t.is_string() || t.get<std::string>() != "full_attention")
        v.bad("layer_types", "contains " + t.dump() + "; only full_attention is supported");
  }

  c.bos_token_id = v.token_id("bos_token_id");
  c.eos_token_id = v.token_id("eos_token_id");
  c.pad_token_id = v.token_id("pad_token_id");
  c.rope = parse_rope(v);
  return c;
}

std::string model_config_to_json(const ModelConfig& c, DType dtype) {
  const char* dtype_str = torch_dtype_name(dtype);
  const char* arch = architecture_of(c.model_type);
  if (!arch) throw std::runtime_error("model_config_to_json: unsupported model_type '" +
                                      c.model_type + "'");
  auto id = [](int64_t t) { return t < 0 ? json(nullptr) : json(t); };
  // transformers-5 layout (rope inside rope_parameters), as its save_pretrained writes it.
  json rope = {{"rope_type", c.rope.type}, {"rope_theta", c.rope.theta}};
  if (c.rope.type == "linear" || c.rope.type == "llama3") rope["factor"] = c.rope.factor;
  if (c.rope.type == "llama3") {
    rope["low_freq_factor"] = c.rope.low_freq_factor;
    rope["high_freq_factor"] = c.rope.high_freq_factor;
    rope["original_max_position_embeddings"] = c.rope.original_max_position_embeddings;
  }
  json j = {
      {"architectures", {arch}},
      {"model_type", c.model_type},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"hidden_act", "silu"},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rms_norm_eps", c.rms_norm_eps},
      {"initializer_range", 0.02},
      {"attention_dropout", 0.0},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"use_cache", true},
      {"bos_token_id", id(c.bos_token_id)},
      {"eos_token_id", id(c.eos_token_id)},
      {"pad_token_id", id(c.pad_token_id)},
      {"rope_parameters", rope},
      {"dtype", dtype_str},
      {"torch_dtype", dtype_str},  // the name transformers 4.x reads
  };
  if (c.model_type == "llama") {
    j["attention_bias"] = c.attention_bias;
    j["mlp_bias"] = false;
    j["pretraining_tp"] = 1;
  } else if (c.model_type == "mistral") {
    // MistralConfig defaults to 4096 when absent: write null unless the model has a window.
    j["sliding_window"] = c.sliding_window > 0 ? nlohmann::json(c.sliding_window) : nlohmann::json();
  } else {  // qwen2, qwen3
    if (c.model_type == "qwen3") j["attention_bias"] = c.attention_bias;
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
    j["max_window_layers"] = c.num_hidden_layers;
    j["layer_types"] = std::vector<std::string>(c.num_hidden_layers, "full_attention");
  }
  return j.dump(2) + "\n";
}

BaseWeights load_base_weights(const std::string& dir) {
  return load_base_weights(dir, load_model_config(dir));
}

namespace {

// An HF directory's safetensors, checked against the config when opened (every tensor
// present, shapes and dtypes convertible, nothing unexpected), then read slice by slice
// from the memory-mapped files.
class SafetensorsWeightSource final : public WeightSource {
 public:
  SafetensorsWeightSource(const std::string& dir, const ModelConfig& cfg)
      : WeightSource(cfg), dir_(dir), set_(dir) {
    std::set<std::string> used;
    for (const auto& e : entries_) {
      if (!set_.has(e.name)) {
        if (e.name == "lm_head.weight")
          throw std::runtime_error("model directory " + dir +
                                   ": lm_head.weight is missing but config.json has "
                                   "tie_word_embeddings false");
        throw std::runtime_error("model directory " + dir + ": tensor '" + e.name +
                                 "' is missing from the safetensors files");
      }
      set_.read_f32(e.name, e.shape, nullptr, 0, 0);  // shape and dtype checks only
      used.insert(e.name);
    }
    // Unused tensors: a layer past num_hidden_layers, or a per-layer tensor the config does
    // not describe (e.g. biases with attention_bias false), means config and weights disagree.
    const std::string layers_prefix = "model.layers.";
    for (const std::string& name : set_.names()) {
      if (used.count(name) || name.rfind(layers_prefix, 0) != 0) continue;
      if (name.ends_with("rotary_emb.inv_freq")) continue;  // buffer saved by old exports
      const size_t dot = name.find('.', layers_prefix.size());
      const std::string num = name.substr(layers_prefix.size(), dot - layers_prefix.size());
      const bool numeric = !num.empty() && num.find_first_not_of("0123456789") == std::string::npos;
      if (numeric && std::stoll(num) >= cfg.num_hidden_layers)
        throw std::runtime_error("model directory " + dir + ": tensor '" + name +
                                 "' is beyond num_hidden_layers = " +
                                 std::to_string(cfg.num_hidden_layers) +
                                 " (config.json does not match the weights)");
      throw std::runtime_error("model directory " + dir + ": unexpected tensor '" + name +
                               "' for a " + cfg.model_type +
                               " config (attention_bias/qk_norm do not match the weights?)");
    }
  }
  void read(size_t t, size_t begin, size_t count, float* dst) const override {
    const BaseWeights::Entry& e = entries_.at(t);
    set_.read_f32(e.name, e.shape, dst, begin, count);
  }
  std::string describe() const override { return "safetensors in " + dir_; }

 private:
  std::string dir_;
  SafetensorsSet set_;
};

constexpr const char* kRandomInitFile = "ftune_random_init.json";

}  // namespace

std::unique_ptr<WeightSource> open_base_weights(const std::string& dir, const ModelConfig& cfg) {
  const fs::path marker = fs::path(dir) / kRandomInitFile;
  const bool has_safetensors = fs::exists(fs::path(dir) / "model.safetensors") ||
                               fs::exists(fs::path(dir) / "model.safetensors.index.json");
  if (has_safetensors || !fs::exists(marker))
    return std::make_unique<SafetensorsWeightSource>(dir, cfg);
  const json j = io::read_json_file(marker.string());
  const JsonView v{j, marker.string()};
  if (!j.is_object() || !v.has("generator") || !j.at("generator").is_string() ||
      j.at("generator").get<std::string>() != "fast_init")
    throw std::runtime_error(marker.string() +
                             ": key 'generator' must be \"fast_init\" (written by ftune init-model "
                             "--weights on_load)");
  const int64_t seed = v.req_int("seed");
  if (seed < 0) v.bad("seed", "must be >= 0");
  const double std = v.opt_num("initializer_range", -1.0);
  if (!(std > 0)) v.bad("initializer_range", "is required and must be > 0");
  return std::make_unique<RandomWeightSource>(cfg, static_cast<uint64_t>(seed), std);
}

BaseWeights load_base_weights(const std::string& dir, const ModelConfig& cfg) {
  return materialize(*open_base_weights(dir, cfg));
}

void save_random_on_load_model(const std::string& dir, const ModelConfig& c, uint64_t seed,
                               double std) {
  const std::string config = model_config_to_json(c, DType::BF16);
  for (const char* f : {"model.safetensors", "model.safetensors.index.json"})
    if (fs::exists(fs::path(dir) / f))
      throw std::runtime_error("init-model: " + (fs::path(dir) / f).string() +
                               " exists; --weights on_load writes no weights, so the directory "
                               "would keep the old ones: choose an empty directory");
  fs::create_directories(dir);
  json m;
  m["generator"] = "fast_init";
  m["seed"] = seed;
  m["initializer_range"] = std;
  m["note"] = "ftune makes these weights when it loads the model (init_random_slice_fast); "
              "other tools cannot load this directory";
  io::write_text_atomic((fs::path(dir) / kRandomInitFile).string(), m.dump(2) + "\n");
  io::write_text_atomic((fs::path(dir) / "config.json").string(), config);
}

void save_hf_model(const std::string& dir, const BaseWeights& w, DType dtype) {
  const std::string config = model_config_to_json(w.cfg, dtype);  // checks dtype first
  fs::create_directories(dir);
  const std::string file = (fs::path(dir) / "model.safetensors").string();
  const std::vector<TensorToWrite> tensors = tensors_of(w);
  if (dtype == DType::F32) {
    write_safetensors(file, tensors, {{"format", "pt"}});  // straight from w, no copy
  } else {
    write_safetensors_streamed(file, copy_sources(tensors), dtype, {{"format", "pt"}});
  }
  io::write_text_atomic((fs::path(dir) / "config.json").string(), config);
}

void save_random_hf_model(const std::string& dir, const ModelConfig& c, uint64_t seed,
                          double std, DType dtype) {
  const std::string config = model_config_to_json(c, dtype);
  fs::create_directories(dir);
  const std::vector<BaseWeights::Entry> entries = BaseWeights::layout(c);
  std::vector<TensorToStream> tensors;
  tensors.reserve(entries.size());
  for (size_t t = 0; t < entries.size(); ++t) {
    // Tensor t is made slice by slice as the writer asks: the model is never in memory.
    auto fill = [&entries, t, seed, std](float* dst, size_t begin, size_t count) {
      init_random_slice_fast(entries[t], t, seed, std, begin, count, dst);
    };
    tensors.push_back({entries[t].name, entries[t].shape, fill});
  }
  write_safetensors_streamed((fs::path(dir) / "model.safetensors").string(), tensors, dtype,
                             {{"format", "pt"}});
  io::write_text_atomic((fs::path(dir) / "config.json").string(), config);
}

}  // namespace ftune
