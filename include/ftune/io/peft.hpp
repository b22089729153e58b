#pragma once
// io module: PEFT adapter directories (adapter_config.json + adapter_model.safetensors).
#include <string>

#include "ftune/model/lora.hpp"

namespace ftune {

// Writes dir/adapter_config.json and dir/adapter_model.safetensors (fp32) so that
// peft.PeftModel.from_pretrained loads them unchanged. Written atomically (temp dir, rename).
void save_peft_adapter(const std::string& dir, const LoraAdapter& a,
                       const std::string& base_model_name_or_path);

// Reads a PEFT adapter directory into `a`, which must already be allocated for the
// run's model and LoRA spec. A rank, alpha, target set or shape that differs from the run
// is refused with the key named.
void load_peft_adapter(const std::string& dir, LoraAdapter& a);

}  // namespace ftune
