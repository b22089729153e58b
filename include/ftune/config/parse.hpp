#pragma once
// config module: TOML file + command-line flags -> TrainConfig. A flag overrides the
// file; unknown keys/flags fail with the nearest valid name suggested.
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "ftune/config/train_config.hpp"

namespace ftune {

struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Parses the arguments of `ftune train` (argv after the word "train"):
// `--config FILE.toml` plus `--NAME VALUE` for every TrainConfig field. Booleans take an
// explicit value (`--bf16 false`). Lists take comma-separated values.
// Returns std::nullopt after printing help for `--help` (caller exits 0).
// Throws ConfigError naming file/line/key on any bad input.
std::optional<TrainConfig> parse_train_command(const std::vector<std::string>& args);

// The TOML file alone (keys = field names; an empty file is valid).
TrainConfig load_train_config_file(const std::string& path);

// Resolved configuration as TOML (every field), written to output_dir by the trainer.
std::string train_config_to_toml(const TrainConfig& c);

// Value checks (ranges, enums) and parameters accepted but not implemented yet:
// throws ConfigError "<key> = <value> is not yet supported ..." instead of ignoring them.
void validate_train_config(const TrainConfig& c);

// Complete help text for `ftune train --help`.
std::string train_help();

// Nearest valid name by edit distance, for "did you mean" messages ("" when none is close).
std::string nearest_name(const std::string& word, const std::vector<std::string>& valid);

}  // namespace ftune
