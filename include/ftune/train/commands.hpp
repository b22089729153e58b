#pragma once
// train module: the `ftune export` and `ftune generate` subcommands and the model-directory
// helpers they share. `args` are the words after the command name; each returns the exit
// code (0 also for --help, CLI11's non-zero code for a usage error) and throws
// std::runtime_error on a failure (main prints it and exits 1).
#include <cstdint>
#include <string>
#include <vector>

#include "ftune/model/lora.hpp"
#include "ftune/model/model_config.hpp"
#include "ftune/model/weights.hpp"

namespace ftune {

// `ftune export --model DIR --adapter PEFT_DIR --output OUT --merge [--tokenizer DIR]
//  [--max_shard_size 5GB] [--overwrite]`: base + adapter merged into an HF model directory.
int run_export_command(const std::vector<std::string>& args);

// `ftune generate --model DIR [--adapter PEFT_DIR] [--tokenizer DIR] (--prompt TEXT |
//  --input FILE.jsonl) [--template NAME] [--max_new_tokens N] [--temperature T] [--top_p P]
//  [--top_k K] [--seed S]`: greedy (T = 0) or seeded sampling on the CPU, with a KV cache.
int run_generate_command(const std::vector<std::string>& args);

// A PEFT adapter directory for model `m`, its rank/alpha/rslora/targets read from its own
// adapter_config.json (unlike load_peft_adapter, which checks them against a run's spec).
// A missing directory or file is reported with the path.
LoraAdapter load_adapter_dir(const std::string& dir, const ModelConfig& m);

// "5GB" (10^9), "500MiB" (2^20), "1024" bytes, ... -> bytes; throws on anything else.
int64_t parse_byte_size(const std::string& s);

// save_hf_model, split like transformers' save_pretrained when the weights exceed
// max_shard_bytes: model-0000i-of-0000n.safetensors + model.safetensors.index.json (a tensor
// larger than the limit gets a shard of its own). Returns the number of weight files.
int save_hf_model_sharded(const std::string& dir, const BaseWeights& w, int64_t max_shard_bytes);

}  // namespace ftune
