// PEFT LoRA adapter directories: adapter_config.json + adapter_model.safetensors, in the
// layout PEFT 0.21 writes and reads for a CAUSAL_LM model.
#include "ftune/io/peft.hpp"

#include <fcntl.h>
#include <stdio.h>  // renameat2 (glibc >= 2.28)
#include <stdlib.h>  // mkdtemp

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <stdexcept>

#include "ftune/io/safetensors.hpp"
#include "io_util.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace ftune {
namespace {

json adapter_config_json(const LoraSpec& s, const std::string& base) {
  // lora_alpha is written as an integer when it is one, as users pass it to PEFT.
  const json alpha = std::floor(s.alpha) == s.alpha && std::abs(s.alpha) < 1e15
                         ? json(static_cast<int64_t>(s.alpha)) : json(s.alpha);
  return {
      {"alora_invocation_tokens", nullptr},
      {"alpha_pattern", json::object()},
      {"arrow_config", nullptr},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", base.empty() ? json(nullptr) : json(base)},
      {"bias", "none"},
      {"corda_config", nullptr},
      {"ensure_weight_tying", false},
      {"eva_config", nullptr},
      {"exclude_modules", nullptr},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"kasa_config", nullptr},
      {"layer_replication", nullptr},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"loftq_config", json::object()},
      {"lora_alpha", alpha},
      {"lora_bias", false},
      {"lora_dropout", s.dropout},
      {"lora_ga_config", nullptr},
      {"megatron_config", nullptr},
      {"megatron_core", "megatron.core"},
      {"modules_to_save", nullptr},
      {"monteclora_config", nullptr},
      {"peft_type", "LORA"},
      {"peft_version", "0.21.0"},
      {"qalora_group_size", 16},
      {"r", s.rank},
      {"rank_pattern", json::object()},
      {"revision", nullptr},
      {"target_modules", s.target_names()},
      {"target_parameters", nullptr},
      {"task_type", "CAUSAL_LM"},
      {"trainable_token_indices", nullptr},
      {"use_bdlora", nullptr},
      {"use_dora", false},
      {"use_qalora", false},
      {"use_rslora", s.use_rslora},
      {"velora_config", nullptr},
  };
}

// "out/adapter/" -> "out/adapter": the name that gets renamed.
fs::path clean_dir(const std::string& dir) {
  fs::path p = fs::path(dir).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();
  if (p.empty()) throw std::runtime_error("save_peft_adapter: empty directory name");
  return p;
}

std::string make_temp_dir(const fs::path& base, const char* tag) {
  std::string tmpl = base.string() + tag + "XXXXXX";
  if (!::mkdtemp(tmpl.data()))
    throw std::runtime_error("cannot create a directory next to " + base.string() + ": " +
                             std::strerror(errno));
  // mkdtemp makes it 0700; the adapter directory it becomes should be readable like any other.
  using fs::perms;
  fs::permissions(tmpl, perms::owner_all | perms::group_read | perms::group_exec |
                            perms::others_read | perms::others_exec);
  return tmpl;
}

// Moves the finished `tmp` directory to `target`, replacing what is there.
void replace_dir(const std::string& tmp, const fs::path& target) {
  if (!fs::exists(target)) {
    fs::rename(tmp, target);
    return;
  }
  // Atomic swap where the filesystem supports it; the old adapter ends up in tmp.
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
    fs::remove_all(tmp);
    return;
  }
  // Fallback: move the old one aside (rename may replace an empty directory), then swap in.
  const std::string aside = make_temp_dir(target, ".old-");
  fs::rename(target, aside);
  try {
    fs::rename(tmp, target);
  } catch (...) {
    fs::rename(aside, target);
    throw;
  }
  fs::remove_all(aside);
}

// Projections a PEFT target_modules value selects, per layer of `m`. A list names modules
// by suffix; a string is "all-linear" or a regex full-matched against module names.
std::array<bool, kNumProj> targets_of(const json& tm, const ModelConfig& m,
                                      const std::string& file) {
  std::array<bool, kNumProj> t{};
  if (tm.is_array()) {
    for (const auto& n : tm) {
      if (!n.is_string()) throw std::runtime_error(file + ": target_modules entries must be strings");
      std::string name = n.get<std::string>();
      name = name.substr(name.rfind('.') == std::string::npos ? 0 : name.rfind('.') + 1);
      Proj p;
      if (!proj_from_name(name, &p))
        throw std::runtime_error(file + ": target_modules entry '" + n.get<std::string>() +
                                 "' is not one of the seven linear projections");
      t[static_cast<int>(p)] = true;
    }
    return t;
  }
  if (!tm.is_string()) throw std::runtime_error(file + ": target_modules missing or not a list");
  const std::string s = tm.get<std::string>();
  if (s == "all-linear") { t.fill(true); return t; }
  const std::regex re(s);
  for (int64_t l = 0; l < m.num_hidden_layers; ++l) {
    for (Proj p : kAllProj) {
      const std::string name = "model.layers." + std::to_string(l) + "." + proj_parent(p) + "." +
                               proj_name(p);
      const bool hit = std::regex_match(name, re);
      if (l > 0 && hit != t[static_cast<int>(p)])
        throw std::runtime_error(file + ": target_modules regex '" + s +
                                 "' selects different modules per layer (not supported)");
      t[static_cast<int>(p)] = hit;
    }
  }
  return t;
}

std::string join(const std::vector<std::string>& v) {
  std::string r = "[";
  for (size_t i = 0; i < v.size(); ++i) r += (i ? ", " : "") + v[i];
  return r + "]";
}

std::vector<std::string> names_of(const std::array<bool, kNumProj>& t) {
  LoraSpec s;
  s.targets = t;
  return s.target_names();
}

void check_config(const json& j, const LoraAdapter& a, const std::string& file) {
  auto mismatch = [&](const char* key, const std::string& adapter, const std::string& run) {
    return std::runtime_error(file + ": key '" + key + "': adapter has " + adapter +
                              ", this run has " + run);
  };
  auto has = [&](const char* k) { return j.contains(k) && !j.at(k).is_null(); };
  if (has("peft_type") && j["peft_type"] != "LORA")
    throw std::runtime_error(file + ": peft_type " + j["peft_type"].dump() + " is not LORA");
  if (!has("r") || !j["r"].is_number_integer())
    throw std::runtime_error(file + ": key 'r' missing or not an integer");
  if (j["r"].get<int64_t>() != a.spec.rank)
    throw mismatch("r", j["r"].dump(), std::to_string(a.spec.rank));
  if (!has("lora_alpha") || !j["lora_alpha"].is_number())
    throw std::runtime_error(file + ": key 'lora_alpha' missing or not a number");
  const double alpha = j["lora_alpha"].get<double>();
  if (std::abs(alpha - a.spec.alpha) > 1e-9 * std::max(1.0, std::abs(a.spec.alpha)))
    throw mismatch("lora_alpha", j["lora_alpha"].dump(), json(a.spec.alpha).dump());
  const bool rslora = has("use_rslora") && j["use_rslora"].get<bool>();
  if (rslora != a.spec.use_rslora)
    throw mismatch("use_rslora", rslora ? "true" : "false", a.spec.use_rslora ? "true" : "false");
  const auto targets = targets_of(has("target_modules") ? j["target_modules"] : json(), a.model, file);
  if (targets != a.spec.targets)
    throw mismatch("target_modules", join(names_of(targets)), join(a.spec.target_names()));

  // Features that would change the adapter's meaning and that this engine does not model.
  for (const char* k : {"use_dora", "lora_bias"})
    if (has(k) && j[k].is_boolean() && j[k].get<bool>())
      throw std::runtime_error(file + ": key '" + std::string(k) + "' = true is not supported");
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    if (has(k) && !j[k].empty())
      throw std::runtime_error(file + ": key '" + std::string(k) + "' is not supported (must be {})");
  if (has("bias") && j["bias"] != "none")
    throw std::runtime_error(file + ": key 'bias' = " + j["bias"].dump() + " is not supported");
  if (has("modules_to_save") && !j["modules_to_save"].empty())
    throw std::runtime_error(file + ": key 'modules_to_save' is not supported (must be null)");
  if (has("layers_to_transform")) {
    std::set<int64_t> layers;
    const json& lt = j["layers_to_transform"];
    if (lt.is_number_integer()) layers.insert(lt.get<int64_t>());
    else if (lt.is_array()) for (const auto& x : lt) layers.insert(x.get<int64_t>());
    for (int64_t l = 0; l < a.model.num_hidden_layers; ++l)
      if (!layers.count(l))
        throw std::runtime_error(file + ": key 'layers_to_transform' leaves out layer " +
                                 std::to_string(l) + "; adapters must cover every layer");
  }
}

}  // namespace

void save_peft_adapter(const std::string& dir, const LoraAdapter& a,
                       const std::string& base_model_name_or_path) {
  const fs::path target = clean_dir(dir);
  if (!target.parent_path().empty()) fs::create_directories(target.parent_path());

  const int64_t r = a.spec.rank;
  std::vector<TensorToWrite> tensors;
  tensors.reserve(2 * a.slots.size());
  for (const LoraSlot& s : a.slots) {
    if (s.b_offset + static_cast<size_t>(s.out * r) > a.params.size())
      throw std::runtime_error("save_peft_adapter: adapter params are not allocated");
    tensors.push_back({LoraAdapter::peft_key(s.layer, s.proj, 'A'), {r, s.in},
                       a.params.data() + s.a_offset});
    tensors.push_back({LoraAdapter::peft_key(s.layer, s.proj, 'B'), {s.out, r},
                       a.params.data() + s.b_offset});
  }

  const std::string tmp = make_temp_dir(target, ".tmp-");
  try {
    io::write_text_atomic((fs::path(tmp) / "adapter_config.json").string(),
                          adapter_config_json(a.spec, base_model_name_or_path).dump(2) + "\n");
    write_safetensors((fs::path(tmp) / "adapter_model.safetensors").string(), tensors,
                      {{"format", "pt"}});
    replace_dir(tmp, target);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
  io::fsync_dir(target.parent_path().empty() ? "." : target.parent_path().string());
}

void load_peft_adapter(const std::string& dir, LoraAdapter& a) {
  const fs::path d(dir);
  const std::string cfg_file = (d / "adapter_config.json").string();
  const std::string st_file = (d / "adapter_model.safetensors").string();
  if (!fs::exists(st_file)) {
    if (fs::exists(d / "adapter_model.bin"))
      throw std::runtime_error("adapter directory " + dir +
                               ": adapter_model.bin found, but only adapter_model.safetensors is "
                               "supported (re-save with safe_serialization=True)");
    throw std::runtime_error("adapter directory " + dir + ": no adapter_model.safetensors");
  }
  if (!fs::exists(cfg_file))
    throw std::runtime_error("adapter directory " + dir + ": no adapter_config.json");
  check_config(io::read_json_file(cfg_file), a, cfg_file);

  const SafetensorsFile f(st_file);
  std::set<std::string> used;
  // Older PEFT versions saved "...lora_A.default.weight"; accept both spellings.
  auto resolve = [&](int layer, Proj p, char which) {
    const std::string key = LoraAdapter::peft_key(layer, p, which);
    if (f.has(key)) return key;
    const std::string tail = ".weight";
    const std::string alt = key.substr(0, key.size() - tail.size()) + ".default" + tail;
    if (f.has(alt)) return alt;
    throw std::runtime_error(st_file + ": missing tensor '" + key + "'");
  };
  const int64_t r = a.spec.rank;
  for (const LoraSlot& s : a.slots) {
    const std::string ka = resolve(s.layer, s.proj, 'A');
    const std::string kb = resolve(s.layer, s.proj, 'B');
    f.read_f32(ka, {r, s.in}, a.params.data() + s.a_offset);
    f.read_f32(kb, {s.out, r}, a.params.data() + s.b_offset);
    used.insert(ka);
    used.insert(kb);
  }
  for (const std::string& name : f.names())
    if (!used.count(name))
      throw std::runtime_error(st_file + ": tensor '" + name +
                               "' is not used by this run's model (different layer count, "
                               "targets or extra trained modules)");
}

}  // namespace ftune
