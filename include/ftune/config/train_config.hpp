#pragma once
// config module: owns TrainConfig, the one resolved set of training parameters.
// Names follow the seed script (HF TrainingArguments / MedicalGPT) so that a user's
// existing flags carry over unchanged. Parsing lives in config/parse.hpp.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ftune {

struct TrainConfig {
  // --- model / data locations
  std::string model_name_or_path;          // HF model directory
  std::string tokenizer_name_or_path;      // defaults to model_name_or_path
  std::vector<std::string> train_file_dir;       // comma-separated list on the CLI
  std::vector<std::string> validation_file_dir;  // comma-separated list on the CLI
  std::string output_dir = "outputs-ftune";
  std::string init_adapter;                // PEFT adapter directory to start from
  std::string cache_dir;
  std::string template_name = "vicuna";
  int64_t model_max_length = 2048;
  int64_t max_train_samples = -1;          // -1 = all
  int64_t max_eval_samples = -1;
  int64_t validation_split_percentage = 1;
  int preprocessing_num_workers = 1;
  int dataloader_num_workers = 0;
  bool shuffle = true;
  bool train_on_inputs = false;
  bool packing = false;
  bool skip_bad_examples = false;

  // --- LoRA
  bool use_peft = true;
  int lora_rank = 8;
  double lora_alpha = 16.0;
  double lora_dropout = 0.05;
  std::vector<std::string> target_modules = {"all"};
  bool use_rslora = false;

  // --- optimisation
  double learning_rate = 2e-5;
  double num_train_epochs = 1.0;
  int64_t max_steps = -1;                  // > 0 overrides num_train_epochs
  int per_device_train_batch_size = 1;
  int per_device_eval_batch_size = 1;
  int gradient_accumulation_steps = 8;
  double warmup_ratio = 0.0;
  int64_t warmup_steps = 0;                // > 0 overrides warmup_ratio
  double weight_decay = 0.0;
  std::string lr_scheduler_type = "linear"; // constant | linear | cosine (with warmup)
  double max_grad_norm = 1.0;              // <= 0 disables clipping
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_epsilon = 1e-8;
  int64_t seed = 42;

  // --- numerics / memory
  bool bf16 = true;
  bool fp16 = false;
  bool flash_attn = true;
  bool gradient_checkpointing = false;
  bool selective_recompute = false;        // checkpointing also keeps x_mid (CUDA)
  bool load_in_8bit = false;
  bool load_in_4bit = false;
  int zero_stage = 0;                      // DeepSpeed-equivalent ZeRO stage
  std::string offload_optimizer = "none";  // none | cpu
  std::string offload_param = "none";      // none | cpu
  std::string device = "auto";             // auto | cpu | cuda
  int num_threads = 0;                     // CPU backend threads; 0 = all cores

  // --- logging / saving
  int64_t logging_steps = 1;
  int64_t save_steps = 0;                  // 0 = no intermediate checkpoints
  int64_t save_total_limit = -1;           // -1 = keep all
  bool save_only_model = false;            // checkpoints without optimizer state
  int64_t eval_steps = 0;                  // 0 = evaluate only at the end
  std::string resume_from_checkpoint;      // "" | "latest" | PATH
  std::string report_to = "none";
  bool overwrite_output_dir = false;
};

}  // namespace ftune
