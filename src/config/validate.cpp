// validate_train_config: value ranges, allowed values, and features not implemented yet.
#include <string>
#include <vector>

#include "ftune/config/parse.hpp"
#include "params.hpp"

namespace ftune {

namespace {

using NotYetTest = bool (*)(const TrainConfig&);
struct NotYet {
  const char* key;
  NotYetTest requested;  // true when the config asks for the missing feature
  const char* plan;
};

// ============================================================================
// Parameters the parser accepts but the engine does not implement yet. They are
// rejected here, never silently ignored. When a feature lands, delete its line
// (and its case in tests/test_config_validate.cpp).
// ============================================================================
const NotYet kNotYetSupported[] = {
    {"use_peft", [](const TrainConfig& c) {
       return !c.use_peft && (c.load_in_8bit || c.load_in_4bit); },
     "full fine-tuning of quantised base weights is not planned (QLoRA trains adapters): "
     "set use_peft = true"},
    {"use_peft", [](const TrainConfig& c) { return !c.use_peft && !c.init_adapter.empty(); },
     "init_adapter with full fine-tuning is not planned (it starts a LoRA run): clear it"},
    {"fp16", [](const TrainConfig& c) { return c.fp16; },
     "fp16 mixed precision is planned; use fp16 = false (bf16 is supported)"},
    {"report_to", [](const TrainConfig& c) { return c.report_to != "none"; },
     "only metrics.jsonl (plot it with tools/plot_metrics.py) is written; use report_to = \"none\""},
};

std::string show(const std::string& key, const TrainConfig& c) {
  return key + " = " + config::format_value(*config::find_param(key), c);
}

}  // namespace

void validate_train_config(const TrainConfig& c) {
  std::vector<std::string> errors;
  auto need = [&](bool ok, const std::string& key, const std::string& rule) {
    if (!ok) errors.push_back(show(key, c) + " is out of range: " + rule);
  };

  if (c.model_name_or_path.empty())
    errors.push_back("model_name_or_path is required (the Hugging Face model directory)");
  if (c.train_file_dir.empty())
    errors.push_back("train_file_dir is required (one or more training data directories)");

  need(c.model_max_length >= 2, "model_max_length", "must be >= 2");
  need(c.max_train_samples >= -1, "max_train_samples", "must be -1 (all) or >= 0");
  need(c.max_eval_samples >= -1, "max_eval_samples", "must be -1 (all) or >= 0");
  need(c.validation_split_percentage >= 0 && c.validation_split_percentage <= 100,
       "validation_split_percentage", "must be in [0, 100]");
  need(c.preprocessing_num_workers >= 1, "preprocessing_num_workers", "must be >= 1");
  need(c.dataloader_num_workers >= 0, "dataloader_num_workers", "must be >= 0");

  need(c.lora_rank > 0, "lora_rank", "must be > 0");
  need(c.lora_alpha > 0, "lora_alpha", "must be > 0");
  need(c.lora_dropout >= 0 && c.lora_dropout < 1, "lora_dropout", "must be in [0, 1)");
  if (c.target_modules.empty()) errors.push_back("target_modules must name at least one module");
  if (c.load_in_8bit && c.load_in_4bit)
    errors.push_back("load_in_8bit and load_in_4bit are both true: choose one");
  if (c.selective_recompute && !c.gradient_checkpointing)
    errors.push_back("selective_recompute = true needs gradient_checkpointing = true (it "
                     "chooses what the checkpointed recompute keeps)");

  need(c.learning_rate >= 0, "learning_rate", "must be >= 0");
  need(c.num_train_epochs > 0 || c.max_steps > 0, "num_train_epochs",
       "must be > 0 (or set max_steps > 0)");
  need(c.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be >= 1");
  need(c.per_device_eval_batch_size >= 1, "per_device_eval_batch_size", "must be >= 1");
  need(c.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1");
  need(c.warmup_ratio >= 0 && c.warmup_ratio <= 1, "warmup_ratio", "must be in [0, 1]");
  need(c.warmup_steps >= 0, "warmup_steps", "must be >= 0");
  need(c.weight_decay >= 0, "weight_decay", "must be >= 0");
  need(c.adam_beta1 >= 0 && c.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)");
  need(c.adam_beta2 >= 0 && c.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)");
  need(c.adam_epsilon > 0, "adam_epsilon", "must be > 0");

  need(c.num_threads >= 0, "num_threads", "must be >= 0 (0 = all cores)");

  need(c.logging_steps >= 1, "logging_steps", "must be >= 1");
  need(c.save_steps >= 0, "save_steps", "must be >= 0");
  need(c.save_total_limit == -1 || c.save_total_limit >= 1, "save_total_limit",
       "must be -1 (keep all) or >= 1");
  need(c.eval_steps >= 0, "eval_steps", "must be >= 0");

  // Enumerations (lr_scheduler_type, zero_stage, device, offload_*) come from the table.
  for (const config::Param& p : config::params()) {
    if (config::value_allowed(p, c)) continue;
    std::string list;
    for (const auto& ch : p.choices) list += (list.empty() ? "" : ", ") + ch;
    errors.push_back(show(p.name, c) + " is not one of: " + list);
  }

  for (const NotYet& n : kNotYetSupported)
    if (n.requested(c) && config::value_allowed(*config::find_param(n.key), c))
      errors.push_back(show(n.key, c) + " is not yet supported: " + n.plan);

  if (errors.empty()) return;
  std::string msg;
  for (const auto& e : errors) msg += (msg.empty() ? "" : "\n") + e;
  throw ConfigError(msg);
}

}  // namespace ftune
