#pragma once
// Private to the config module: the one table of TrainConfig parameters. The TOML
// reader, the CLI flags, the help text, the TOML writer and validation all iterate
// over it, so adding a field to TrainConfig means adding one line to params.cpp.
#include <toml++/toml.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "ftune/config/train_config.hpp"

namespace ftune::config {

enum class Group { ModelData, Lora, Optim, Numerics, Logging };

// Pointer to the TrainConfig field; the alternative is the parameter's type.
using Member = std::variant<std::string TrainConfig::*, int TrainConfig::*, int64_t TrainConfig::*,
                            double TrainConfig::*, bool TrainConfig::*,
                            std::vector<std::string> TrainConfig::*>;

struct Param {
  const char* name;  // == the field name == the TOML key == the flag without "--"
  Member member;
  Group group;
  const char* help;                       // one line
  std::vector<std::string> choices = {};  // allowed values as written in TOML; empty = any
};
// Defaults are not listed: they are the member initialisers of TrainConfig{}.

const std::vector<Param>& params();
const Param* find_param(std::string_view name);
std::vector<std::string> param_names();

// "STR", "INT", "FLOAT", "BOOL", "LIST".
const char* type_name(const Param& p);

// The field's value in TOML syntax: "cuda" (quoted), 8, 2e-05, true, ["a", "b"].
std::string format_value(const Param& p, const TrainConfig& c);

// Setters. On a bad value they throw ConfigError with the message
// "invalid value for '<name>' <where>: <reason>"; `where` says where the value came
// from ("on the command line", "in cfg.toml line 3").
void set_from_string(const Param& p, TrainConfig& c, const std::string& text,
                     const std::string& where);
void set_from_toml(const Param& p, TrainConfig& c, const toml::node& value,
                   const std::string& where);

// Whether the current value is one of p.choices (true when p.choices is empty).
bool value_allowed(const Param& p, const TrainConfig& c);

}  // namespace ftune::config
