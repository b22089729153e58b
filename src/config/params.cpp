// The parameter table: one line per TrainConfig field, grouped as in `ftune train --help`.
#include "params.hpp"

namespace ftune::config {

namespace {
// Name and member from one token, so a field's name is never spelled twice.
#define FIELD(f) #f, &TrainConfig::f
using G = Group;

const std::vector<Param> kParams = {
    // --- model / data
    {FIELD(model_name_or_path), G::ModelData,
     "Hugging Face model directory (config.json, *.safetensors, tokenizer); required"},
    {FIELD(tokenizer_name_or_path), G::ModelData,
     "Tokenizer directory; empty = model_name_or_path"},
    {FIELD(train_file_dir), G::ModelData, "Training data directories; required"},
    {FIELD(validation_file_dir), G::ModelData,
     "Validation data directories; empty = hold out validation_split_percentage"},
    {FIELD(output_dir), G::ModelData, "Where adapters, checkpoints and the resolved config go"},
    {FIELD(init_adapter), G::ModelData, "PEFT adapter directory to start from; empty = fresh"},
    {FIELD(cache_dir), G::ModelData, "Cache directory for preprocessed data; empty = none"},
    {FIELD(template_name), G::ModelData, "Chat template used to format conversations"},
    {FIELD(model_max_length), G::ModelData, "Maximum tokens per example (longer are truncated)"},
    {FIELD(max_train_samples), G::ModelData, "Use at most N training examples; -1 = all"},
    {FIELD(max_eval_samples), G::ModelData, "Use at most N validation examples; -1 = all"},
    {FIELD(validation_split_percentage), G::ModelData,
     "Percent of training data held out when validation_file_dir is empty"},
    {FIELD(preprocessing_num_workers), G::ModelData, "Threads used for tokenisation"},
    {FIELD(dataloader_num_workers), G::ModelData,
     "Background data-loading threads; 0 = load in the main thread"},
    {FIELD(shuffle), G::ModelData, "Shuffle training examples each epoch"},
    {FIELD(train_on_inputs), G::ModelData, "Also compute the loss on prompt tokens"},
    {FIELD(packing), G::ModelData, "Pack several examples into one sequence"},
    {FIELD(skip_bad_examples), G::ModelData, "Skip malformed examples instead of failing"},

    // --- LoRA
    {FIELD(use_peft), G::Lora, "Train LoRA adapters (false = full fine-tuning)"},
    {FIELD(lora_rank), G::Lora, "LoRA rank r"},
    {FIELD(lora_alpha), G::Lora, "LoRA alpha; adapter scale = alpha / r"},
    {FIELD(lora_dropout), G::Lora, "Dropout applied to the LoRA input"},
    {FIELD(target_modules), G::Lora,
     "Modules to adapt, e.g. q_proj,v_proj; all = every linear layer"},
    {FIELD(use_rslora), G::Lora, "Rank-stabilised LoRA: scale = alpha / sqrt(r)"},

    // --- optimisation
    {FIELD(learning_rate), G::Optim, "Peak learning rate (AdamW)"},
    {FIELD(num_train_epochs), G::Optim, "Passes over the training data"},
    {FIELD(max_steps), G::Optim, "Total optimiser steps; > 0 overrides num_train_epochs"},
    {FIELD(per_device_train_batch_size), G::Optim, "Training examples per micro-batch"},
    {FIELD(per_device_eval_batch_size), G::Optim, "Validation examples per batch"},
    {FIELD(gradient_accumulation_steps), G::Optim, "Micro-batches per optimiser step"},
    {FIELD(warmup_ratio), G::Optim, "Fraction of total steps used for linear warmup"},
    {FIELD(warmup_steps), G::Optim, "Warmup steps; > 0 overrides warmup_ratio"},
    {FIELD(weight_decay), G::Optim, "AdamW decoupled weight decay"},
    {FIELD(lr_scheduler_type),
     G::Optim,
     "Learning-rate schedule",
     {"constant", "constant_with_warmup", "linear", "cosine"}},
    {FIELD(max_grad_norm), G::Optim, "Gradient clipping norm; <= 0 disables clipping"},
    {FIELD(adam_beta1), G::Optim, "AdamW beta1"},
    {FIELD(adam_beta2), G::Optim, "AdamW beta2"},
    {FIELD(adam_epsilon), G::Optim, "AdamW epsilon"},
    {FIELD(seed), G::Optim, "Random seed (data order, LoRA init, dropout)"},

    // --- numerics / memory
    {FIELD(bf16), G::Numerics, "bfloat16 compute where supported (the CPU backend uses fp32)"},
    {FIELD(fp16), G::Numerics, "float16 mixed precision"},
    {FIELD(flash_attn), G::Numerics, "Fused flash attention (CUDA backend)"},
    {FIELD(gradient_checkpointing), G::Numerics,
     "Recompute activations in the backward pass to save memory"},
    {FIELD(selective_recompute), G::Numerics,
     "With gradient_checkpointing (CUDA backend): also keep each layer's residual after "
     "attention (one [tokens, hidden] bf16 tensor per layer) so the recompute skips the "
     "attention output projection; faster, more memory"},
    {FIELD(load_in_8bit), G::Numerics, "Load base weights quantised to 8 bits"},
    {FIELD(load_in_4bit), G::Numerics, "Load base weights quantised to 4 bits (QLoRA)"},
    {FIELD(zero_stage),
     G::Numerics,
     "ZeRO sharding stage (DeepSpeed-equivalent)",
     {"0", "1", "2", "3"}},
    {FIELD(offload_optimizer), G::Numerics, "Offload optimiser state", {"none", "cpu"}},
    {FIELD(offload_param), G::Numerics, "Offload base weights", {"none", "cpu"}},
    {FIELD(device), G::Numerics, "Compute device", {"auto", "cpu", "cuda"}},
    {FIELD(num_threads), G::Numerics, "CPU backend threads; 0 = all cores"},

    // --- logging / saving
    {FIELD(logging_steps), G::Logging, "Log every N optimiser steps"},
    {FIELD(save_steps), G::Logging, "Checkpoint every N steps; 0 = only the final adapter"},
    {FIELD(save_total_limit), G::Logging, "Keep at most N checkpoints; -1 = keep all"},
    {FIELD(save_only_model), G::Logging,
     "Checkpoints hold the adapter (or model) and trainer state, no optimizer state: not "
     "resumable; the final save is output_dir's adapter/model alone"},
    {FIELD(eval_steps), G::Logging, "Evaluate every N steps; 0 = only at the end"},
    {FIELD(resume_from_checkpoint), G::Logging,
     "Resume from \"latest\" or a checkpoint path; empty = start fresh"},
    {FIELD(report_to), G::Logging, "Metrics sink"},
    {FIELD(overwrite_output_dir), G::Logging, "Allow writing into a non-empty output_dir"},
};
#undef FIELD
}  // namespace

const std::vector<Param>& params() { return kParams; }

const Param* find_param(std::string_view name) {
  for (const Param& p : kParams)
    if (name == p.name) return &p;
  return nullptr;
}

std::vector<std::string> param_names() {
  std::vector<std::string> out;
  for (const Param& p : kParams) out.emplace_back(p.name);
  return out;
}

}  // namespace ftune::config
