// Model-directory helpers of `ftune export` / `ftune generate`: adapters whose spec comes
// from their own config, byte sizes, and the sharded HF writer.
#include <array>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <stdexcept>

#include "ftune/io/hf_model.hpp"
#include "ftune/io/peft.hpp"
#include "ftune/io/safetensors.hpp"
#include "ftune/train/commands.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace ftune {
namespace {

json read_json(const fs::path& file) {
  std::ifstream in(file);
  if (!in) throw std::runtime_error(file.string() + ": cannot open file");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    throw std::runtime_error(file.string() + ": invalid JSON: " + e.what());
  }
}

// PEFT's target_modules: a list of module-name suffixes, "all-linear", or a regex that
// full-matches module names (decided on layer 0; load_peft_adapter checks the other layers).
std::array<bool, kNumProj> targets_from(const json& tm, const std::string& file) {
  if (tm.is_array()) {
    std::vector<std::string> names;
    for (const auto& n : tm) {
      if (!n.is_string())
        throw std::runtime_error(file + ": target_modules entries must be strings");
      const std::string s = n.get<std::string>();
      names.push_back(s.substr(s.rfind('.') == std::string::npos ? 0 : s.rfind('.') + 1));
    }
    return LoraSpec::parse_targets(names);
  }
  if (!tm.is_string()) throw std::runtime_error(file + ": target_modules missing or not a list");
  const std::string s = tm.get<std::string>();
  if (s == "all-linear") return LoraSpec::parse_targets({"all-linear"});
  std::array<bool, kNumProj> t{};
  const std::regex re(s);
  for (Proj p : kAllProj)
    t[static_cast<int>(p)] = std::regex_match(
        std::string("model.layers.0.") + proj_parent(p) + "." + proj_name(p), re);
  return t;
}

// The HF tensors of `w` in checkpoint order (as save_hf_model writes them).
std::vector<TensorToWrite> hf_tensors(const BaseWeights& w) {
  const ModelConfig& c = w.cfg;
  if (static_cast<int64_t>(w.layers.size()) != c.num_hidden_layers || !w.embed)
    throw std::runtime_error("save_hf_model_sharded: weights are not allocated");
  std::vector<TensorToWrite> t;
  t.push_back({"model.embed_tokens.weight", {c.vocab_size, c.hidden_size}, w.embed});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = w.layers[l];
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    t.push_back({pre + "input_layernorm.weight", {c.hidden_size}, L.input_norm});
    for (Proj p : kAllProj) {
      const int i = static_cast<int>(p);
      const std::string base = pre + proj_parent(p) + "." + proj_name(p);
      t.push_back({base + ".weight", {proj_out_features(c, p), proj_in_features(c, p)}, L.w[i]});
      if (L.b[i]) t.push_back({base + ".bias", {proj_out_features(c, p)}, L.b[i]});
    }
    if (c.qk_norm) {
      t.push_back({pre + "self_attn.q_norm.weight", {c.head_dim}, L.q_norm});
      t.push_back({pre + "self_attn.k_norm.weight", {c.head_dim}, L.k_norm});
    }
    t.push_back({pre + "post_attention_layernorm.weight", {c.hidden_size}, L.post_norm});
  }
  t.push_back({"model.norm.weight", {c.hidden_size}, w.final_norm});
  if (!c.tie_word_embeddings)
    t.push_back({"lm_head.weight", {c.vocab_size, c.hidden_size}, w.lm_head});
  return t;
}

// Text file written to a temporary name and renamed, so a failed write leaves no torn file.
void write_text_file(const fs::path& file, const std::string& text) {
  const std::string tmp = file.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    if (!out.flush()) throw std::runtime_error(file.string() + ": write failed");
  }
  fs::rename(tmp, file);
}

int64_t bytes_of(const TensorToWrite& t) {
  int64_t n = 4;
  for (int64_t d : t.shape) n *= d;
  return n;
}

}  // namespace

LoraAdapter load_adapter_dir(const std::string& dir, const ModelConfig& m) {
  if (!fs::is_directory(dir))
    throw std::runtime_error("adapter directory '" + dir + "' not found");
  const fs::path cfg_file = fs::path(dir) / "adapter_config.json";
  if (!fs::exists(cfg_file))
    throw std::runtime_error("adapter directory '" + dir +
                             "': no adapter_config.json (not a PEFT adapter directory?)");
  const json j = read_json(cfg_file);
  const std::string file = cfg_file.string();
  LoraSpec spec;
  if (!j.contains("r") || !j["r"].is_number_integer())
    throw std::runtime_error(file + ": key 'r' missing or not an integer");
  if (!j.contains("lora_alpha") || !j["lora_alpha"].is_number())
    throw std::runtime_error(file + ": key 'lora_alpha' missing or not a number");
  spec.rank = j["r"].get<int>();
  spec.alpha = j["lora_alpha"].get<double>();
  spec.use_rslora = j.value("use_rslora", false);
  if (j.contains("lora_dropout") && j["lora_dropout"].is_number())
    spec.dropout = j["lora_dropout"].get<double>();
  spec.targets = targets_from(j.contains("target_modules") ? j["target_modules"] : json(), file);
  LoraAdapter a;
  a.allocate(m, spec);
  load_peft_adapter(dir, a);  // re-checks the config and every tensor's shape
  return a;
}

int64_t parse_byte_size(const std::string& s) {
  static const std::regex re(R"(\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?i?B)?\s*)", std::regex::icase);
  std::smatch m;
  if (!std::regex_match(s, m, re))
    throw std::runtime_error("invalid size '" + s + "' (examples: 5GB, 500MB, 2GiB, 1048576)");
  std::string unit = m[2].str();
  for (char& ch : unit) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  double mult = 1;
  if (!unit.empty() && unit != "B") {
    const bool binary = unit.size() == 3;  // KIB, MIB, ...
    const int power = static_cast<int>(std::string("KMGT").find(unit[0])) + 1;
    mult = std::pow(binary ? 1024.0 : 1000.0, power);
  }
  const double bytes = std::stod(m[1].str()) * mult;
  if (bytes < 1) throw std::runtime_error("size '" + s + "' must be at least one byte");
  return static_cast<int64_t>(bytes);
}

int save_hf_model_sharded(const std::string& dir, const BaseWeights& w, int64_t max_shard_bytes) {
  const std::vector<TensorToWrite> tensors = hf_tensors(w);
  // Greedy packing in checkpoint order, as transformers' split_torch_state_dict_into_shards.
  std::vector<std::vector<TensorToWrite>> shards(1);
  int64_t total = 0, current = 0;
  for (const TensorToWrite& t : tensors) {
    const int64_t b = bytes_of(t);
    if (current > 0 && current + b > max_shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(t);
    current += b;
    total += b;
  }
  if (shards.size() == 1) {
    save_hf_model(dir, w);
    return 1;
  }
  fs::create_directories(dir);
  json weight_map = json::object();
  const size_t n = shards.size();
  auto shard_name = [n](size_t i) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
    return std::string(buf);
  };
  for (size_t i = 0; i < n; ++i) {
    write_safetensors((fs::path(dir) / shard_name(i)).string(), shards[i], {{"format", "pt"}});
    for (const TensorToWrite& t : shards[i]) weight_map[t.name] = shard_name(i);
  }
  const json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  // The index last: a directory with shards but no index is not loadable, never half-loadable.
  write_text_file(fs::path(dir) / "model.safetensors.index.json", index.dump(2) + "\n");
  write_text_file(fs::path(dir) / "config.json", model_config_to_json(w.cfg));
  return static_cast<int>(n);
}

}  // namespace ftune
