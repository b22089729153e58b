// TOML file + command line -> TrainConfig, and TrainConfig -> TOML / help text.
// Every loop here runs over the parameter table in params.cpp.
#include "ftune/config/parse.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "params.hpp"

namespace ftune {

using config::find_param;
using config::Group;
using config::Param;
using config::params;

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

size_t levenshtein(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

std::string did_you_mean(const std::string& word, const std::vector<std::string>& valid,
                         const std::string& prefix) {
  std::string near = nearest_name(word, valid);
  return near.empty() ? "" : "; did you mean '" + prefix + near + "'?";
}

void apply_file(const std::string& path, TrainConfig& c) {
  if (!std::filesystem::is_regular_file(path))
    throw ConfigError("cannot read config file '" + path + "': no such file");
  toml::table tbl;
  try {
    tbl = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    throw ConfigError("TOML syntax error in " + path + " line " +
                      std::to_string(e.source().begin.line) + ": " + std::string(e.description()));
  }
  // toml::table iterates in key order; report problems in file order instead.
  std::vector<std::pair<const toml::key*, const toml::node*>> entries;
  for (auto&& [key, node] : tbl) entries.emplace_back(&key, &node);
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) {
    return a.first->source().begin.line < b.first->source().begin.line;
  });
  for (const auto& [key, node] : entries) {
    const std::string name(key->str());
    const std::string at = path + " line " + std::to_string(key->source().begin.line);
    if (node->is_table())
      throw ConfigError("unexpected table '" + name + "' in " + at +
                        ": nested tables are not supported; put every key at the top level");
    const Param* p = find_param(name);
    if (!p)
      throw ConfigError("unknown key '" + name + "' in " + at +
                        did_you_mean(name, config::param_names(), ""));
    set_from_toml(*p, c, *node,
                  "in " + path + " line " + std::to_string(node->source().begin.line));
  }
}

bool is_help(const std::string& a) { return a == "--help" || a == "-h"; }

// CLI11 would report a missing value obscurely (or take the next flag as the value);
// check first so that a bare `--bf16` gets a message that says how to spell it.
void check_values_present(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.rfind("--", 0) != 0 || a.find('=') != std::string::npos) continue;
    const std::string name = a.substr(2);
    const Param* p = find_param(name);
    if (!p && name != "config") continue;  // unknown flags are reported later
    if (i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0) {
      ++i;
      continue;
    }
    if (p && std::holds_alternative<bool TrainConfig::*>(p->member))
      throw ConfigError("flag " + a + " needs a value: booleans are explicit, write " + a +
                        " true or " + a + " false");
    throw ConfigError("flag " + a + " needs a value (" + a + " VALUE or " + a + "=VALUE)");
  }
}

[[noreturn]] void unexpected_argument(const std::string& arg) {
  if (arg.empty() || arg[0] != '-')
    throw ConfigError("unexpected argument '" + arg +
                      "': parameters are given as --NAME VALUE (see ftune train --help)");
  std::string flag = arg.substr(0, arg.find('='));
  std::string name = flag.substr(
      flag.find_first_not_of('-') == std::string::npos ? flag.size() : flag.find_first_not_of('-'));
  std::vector<std::string> names = config::param_names();
  names.push_back("config");
  throw ConfigError("unknown flag '" + flag + "'" + did_you_mean(name, names, "--"));
}

const char* group_title(Group g) {
  switch (g) {
    case Group::ModelData:
      return "Model / data";
    case Group::Lora:
      return "LoRA";
    case Group::Optim:
      return "Optimisation";
    case Group::Numerics:
      return "Numerics / memory";
    case Group::Logging:
      return "Logging / saving";
  }
  return "";
}

constexpr Group kGroups[] = {Group::ModelData, Group::Lora, Group::Optim, Group::Numerics,
                             Group::Logging};

}  // namespace

std::string nearest_name(const std::string& word, const std::vector<std::string>& valid) {
  const std::string w = lower(word);
  if (w.empty()) return "";
  // Allow about one edit per three letters, so short words need a close match.
  const size_t limit = std::min<size_t>(4, std::max<size_t>(1, (w.size() + 2) / 3));
  std::string best;
  size_t best_d = limit + 1;
  for (const auto& v : valid) {
    size_t d = levenshtein(w, lower(v));
    if (d < best_d && d < w.size()) best = v, best_d = d;
  }
  if (!best.empty() || w.size() < 4) return best;
  // HF habits like --epochs or --rank: a unique-enough fragment of a longer name.
  for (const auto& v : valid)
    if (lower(v).find(w) != std::string::npos && (best.empty() || v.size() < best.size())) best = v;
  return best;
}

TrainConfig load_train_config_file(const std::string& path) {
  TrainConfig c;
  apply_file(path, c);
  return c;
}

std::optional<TrainConfig> parse_train_command(const std::vector<std::string>& args) {
  if (std::any_of(args.begin(), args.end(), is_help)) {
    std::cout << train_help();
    return std::nullopt;
  }
  check_values_present(args);

  CLI::App app{"ftune train"};
  app.set_help_flag();  // handled above, without CLI11's exit path
  app.allow_extras();   // collected below to suggest the nearest name
  std::string config_path;
  CLI::Option* config_opt = app.add_option("--config", config_path);
  config_opt->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  // Values are taken as text and converted by the table, so CLI and TOML agree.
  std::vector<std::string> values(params().size());
  std::vector<CLI::Option*> opts;
  for (size_t i = 0; i < params().size(); ++i) {
    auto* o = app.add_option(std::string("--") + params()[i].name, values[i]);
    o->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // last one wins, as argparse
    opts.push_back(o);
  }
  try {
    app.parse(std::vector<std::string>(args.rbegin(), args.rend()));  // CLI11 wants reversed
  } catch (const CLI::ParseError& e) {
    throw ConfigError(std::string("command line: ") + e.what());
  }
  if (!app.remaining().empty()) unexpected_argument(app.remaining().front());

  TrainConfig c;
  if (config_opt->count()) {
    if (config_path.empty()) throw ConfigError("--config needs a file name");
    apply_file(config_path, c);
  }
  for (size_t i = 0; i < params().size(); ++i)
    if (opts[i]->count()) set_from_string(params()[i], c, values[i], "on the command line");
  return c;
}

std::string train_config_to_toml(const TrainConfig& c) {
  std::ostringstream os;
  os << "# ftune train configuration: every parameter (see `ftune train --help`)\n";
  for (Group g : kGroups) {
    os << "\n# --- " << group_title(g) << "\n";
    for (const Param& p : params())
      if (p.group == g) os << p.name << " = " << format_value(p, c) << "\n";
  }
  return os.str();
}

std::string train_help() {
  const TrainConfig defaults;
  std::ostringstream os;
  os << "Usage: ftune train [--config FILE.toml] [--NAME VALUE ...]\n\n"
        "Fine-tunes LoRA adapters. Every parameter below can be set in the TOML file\n"
        "(NAME = value, top level) and on the command line (--NAME VALUE or --NAME=VALUE);\n"
        "a flag overrides the file. Booleans take an explicit value (--bf16 false;\n"
        "true/false, 1/0, yes/no). LIST values are comma-separated on the command line\n"
        "(--train_file_dir a,b) and an array of strings or a comma-separated string in TOML.\n\n"
        "  --config FILE                        TOML file with parameters (optional)\n"
        "  -h, --help                           Print this help and exit\n";
  for (Group g : kGroups) {
    os << "\n" << group_title(g) << ":\n";
    for (const Param& p : params()) {
      if (p.group != g) continue;
      std::string lhs = std::string("--") + p.name + " " + config::type_name(p);
      os << "  " << lhs << std::string(lhs.size() < 36 ? 37 - lhs.size() : 1, ' ') << p.help
         << " [default: " << format_value(p, defaults);
      if (!p.choices.empty()) {
        os << "; one of: ";
        for (size_t i = 0; i < p.choices.size(); ++i) os << (i ? ", " : "") << p.choices[i];
      }
      os << "]\n";
    }
  }
  return os.str();
}

}  // namespace ftune
