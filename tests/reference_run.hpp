#pragma once
// The configuration of a finished PEFT reference run (a directory with run.json, model/,
// data/ and init_adapter/, as in ../shared/data/reference/llama_tiny and tests/fixtures/*),
// shared by the tests that replay those runs on the CPU, on several ranks and on the GPU.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

#include "ftune/config/train_config.hpp"

namespace ftune::test {

inline nlohmann::json read_json_file(const std::filesystem::path& p) {
  std::ifstream f(p);
  if (!f) throw std::runtime_error("cannot open " + p.string());
  return nlohmann::json::parse(f);
}

// Every hyper-parameter of the run, on the CPU reference backend, nothing held out.
inline TrainConfig reference_run_config(const std::filesystem::path& dir, const std::string& out) {
  const nlohmann::json run = read_json_file(dir / "run.json");
  TrainConfig c;
  c.model_name_or_path = (dir / "model").string();
  c.train_file_dir = {(dir / "data").string()};
  c.init_adapter = (dir / "init_adapter").string();
  c.output_dir = out;
  c.overwrite_output_dir = true;
  c.device = "cpu";  // exact comparisons: the fp32 reference backend even where a GPU exists
  c.validation_split_percentage = 0;  // the reference runs hold nothing out
  c.lora_rank = run["r"];
  c.lora_alpha = run["alpha"];
  c.lora_dropout = run["lora_dropout"];
  c.use_rslora = run.value("use_rslora", false);
  c.target_modules = run["target_modules"].get<std::vector<std::string>>();
  c.per_device_train_batch_size = run["mbs"];
  c.gradient_accumulation_steps = run["gas"];
  c.max_steps = run["steps"];
  c.learning_rate = run["lr"];
  c.weight_decay = run["wd"];
  c.max_grad_norm = run["clip"];
  c.seed = run["seed"];
  c.shuffle = run["shuffle"];
  c.lr_scheduler_type = run["lr_scheduler_type"];
  c.warmup_steps = run["warmup_steps"];
  c.adam_beta1 = run["adam_beta1"];
  c.adam_beta2 = run["adam_beta2"];
  c.adam_epsilon = run["adam_epsilon"];
  return c;
}

}  // namespace ftune::test
