// ftune: LoRA fine-tuning of Llama/Qwen models. Subcommands:
//   train       train a LoRA adapter (config file + flags)
//   init-model  write a randomly initialised HF model directory (tests, demos)
//   tokenize    encode JSONL texts with an HF tokenizer.json
//   doctor      check a multi-rank setup
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "ftune/config/parse.hpp"
#include "ftune/data/tokenizer.hpp"
#include "ftune/io/hf_model.hpp"
#include "ftune/model/weights.hpp"
#include "ftune/dist/communicator.hpp"
#include "ftune/train/commands.hpp"
#include "ftune/train/doctor.hpp"
#include "ftune/train/trainer.hpp"

namespace {

constexpr const char* kUsage = R"(ftune )" FTUNE_VERSION R"( - LoRA fine-tuning of Llama/Qwen-family models

usage: ftune <command> [options]

commands:
  train       train a LoRA adapter: ftune train --config FILE.toml [--NAME VALUE ...]
  init-model  write a randomly initialised HF model directory
  tokenize    encode {"text": ...} JSONL lines into {"ids": [...]} with an HF tokenizer
  doctor      check a (multi-rank) setup: rendezvous, GPUs, all-reduce bandwidth, data, output
  export      merge an adapter into its base model: ftune export --model DIR --adapter DIR --output DIR --merge
  generate    generate text on the CPU: ftune generate --model DIR [--adapter DIR] --prompt TEXT

launch several ranks with `mpirun -np N ftune train ...`, `srun ftune train ...` or
tools/torchrun_multi_node_multi_gpu.sh (torchrun's MASTER_ADDR/MASTER_PORT/... variables).

`ftune <command> --help` lists a command's options.
)";

int cmd_train(const std::vector<std::string>& args) {
  std::optional<ftune::TrainConfig> cfg = ftune::parse_train_command(args);
  if (!cfg) return 0;  // --help
  // Config errors are reported before the rendezvous: every rank sees the same file.
  ftune::validate_train_config(*cfg);
  std::unique_ptr<ftune::Communicator> comm = ftune::bootstrap();
  try {
    ftune::run_training(*cfg, *comm);
  } catch (const ftune::CollectiveError& e) {
    // Every rank raised it together: exit cleanly, rank 0 reports.
    if (comm->rank() == 0) std::cerr << "\nftune: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    if (comm->size() == 1) throw;
    // One rank failed alone: the others may wait on it in a collective, so end the job.
    std::cerr << "\nftune: error on rank " << comm->rank() << " of " << comm->size() << ": "
              << e.what() << "\n";
    comm->abort(1);
  }
  return 0;
}

int cmd_init_model(const std::vector<std::string>& args) {
  CLI::App app{"Write a randomly initialised HF model directory (config.json + model.safetensors)",
               "ftune init-model"};
  ftune::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 512; c.hidden_size = 128; c.intermediate_size = 344;
  c.num_hidden_layers = 4; c.num_attention_heads = 4; c.num_key_value_heads = 2;
  c.head_dim = 0; c.max_position_embeddings = 2048; c.rms_norm_eps = 1e-5;
  c.bos_token_id = 1; c.eos_token_id = 2;
  std::string out, rope_type = "default";
  uint64_t seed = 0;
  double std_dev = 0.02;
  app.add_option("--output", out, "directory to write")->required();
  app.add_option("--model_type", c.model_type, "llama | mistral | qwen2 | qwen3")
      ->check(CLI::IsMember({"llama", "mistral", "qwen2", "qwen3"}))->capture_default_str();
  app.add_option("--vocab_size", c.vocab_size)->capture_default_str();
  app.add_option("--hidden_size", c.hidden_size)->capture_default_str();
  app.add_option("--intermediate_size", c.intermediate_size)->capture_default_str();
  app.add_option("--num_hidden_layers", c.num_hidden_layers)->capture_default_str();
  app.add_option("--num_attention_heads", c.num_attention_heads)->capture_default_str();
  app.add_option("--num_key_value_heads", c.num_key_value_heads)->capture_default_str();
  app.add_option("--head_dim", c.head_dim, "0 = hidden_size / num_attention_heads");
  app.add_option("--max_position_embeddings", c.max_position_embeddings)->capture_default_str();
  app.add_option("--rope_theta", c.rope.theta)->capture_default_str();
  app.add_option("--tie_word_embeddings", c.tie_word_embeddings)->capture_default_str();
  app.add_option("--seed", seed)->capture_default_str();
  app.add_option("--initializer_range", std_dev)->capture_default_str();
  std::string dtype = "float32";
  bool fast_init = false;
  app.add_option("--dtype", dtype, "dtype of the safetensors tensors (bfloat16: half the size)")
      ->check(CLI::IsMember({"float32", "bfloat16"}))->capture_default_str();
  app.add_option("--fast_init", fast_init,
                 "counter-based parallel init (OpenMP), written tensor by tensor without the "
                 "model in memory; other values than the default mt19937 sequence")
      ->capture_default_str();
  std::string weights = "stored";
  app.add_option("--weights", weights,
                 "stored: write model.safetensors; on_load: write only config.json and the "
                 "seed (ftune_random_init.json), and ftune makes the --fast_init weights when "
                 "it loads the model (for benchmarks of models larger than the disk; other "
                 "tools cannot load such a directory)")
      ->check(CLI::IsMember({"stored", "on_load"}))->capture_default_str();
  std::vector<std::string> argv_rev(args.rbegin(), args.rend());
  try {
    app.parse(argv_rev);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (c.head_dim == 0) c.head_dim = c.hidden_size / c.num_attention_heads;
  c.attention_bias = c.model_type == "qwen2";
  c.qk_norm = c.model_type == "qwen3";
  c.rope.type = rope_type;
  const ftune::DType st_dtype = dtype == "bfloat16" ? ftune::DType::BF16 : ftune::DType::F32;
  const auto layout = ftune::BaseWeights::layout(c);
  const size_t params = ftune::BaseWeights::layout_size(layout);
  if (weights == "on_load") {
    ftune::save_random_on_load_model(out, c, seed, std_dev);
    std::cout << "wrote " << out << " (" << params << " parameters, made on load)\n";
    return 0;
  }
  if (fast_init) {
    ftune::save_random_hf_model(out, c, seed, std_dev, st_dtype);
  } else {
    // The default keeps the serial mt19937 values existing models and tests were made with.
    ftune::BaseWeights w;
    w.allocate(c);
    ftune::init_random_weights(w, seed, std_dev);
    ftune::save_hf_model(out, w, st_dtype);
  }
  std::cout << "wrote " << out << " (" << params << " parameters)\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::cout << kUsage;
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version") {
    std::cout << "ftune " << FTUNE_VERSION << "\n";
    return 0;
  }
  const std::string cmd = args[0];
  args.erase(args.begin());
  try {
    if (cmd == "train") return cmd_train(args);
    if (cmd == "init-model") return cmd_init_model(args);
    if (cmd == "tokenize") return ftune::run_tokenize_command(args);
    if (cmd == "doctor") return ftune::run_doctor(args);
    if (cmd == "export") return ftune::run_export_command(args);
    if (cmd == "generate") return ftune::run_generate_command(args);
  } catch (const ftune::ConfigError& e) {
    std::cerr << "ftune: configuration error:\n" << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "\nftune: error: " << e.what() << "\n";
    return 1;
  }
  std::cerr << "ftune: unknown command '" << cmd << "'\n\n" << kUsage;
  return 2;
}
