#pragma once
// io module: Hugging Face model directories (config.json + safetensors) to and from
// ModelConfig/BaseWeights.
#include <string>

#include "ftune/model/model_config.hpp"
#include "ftune/model/weights.hpp"

namespace ftune {

// Parses dir/config.json. Supports model_type llama, mistral, qwen2, qwen3; RoPE from
// rope_theta + rope_scaling (older files) or rope_parameters (transformers 5), types
// default/linear/llama3. Anything unsupported throws with the file and key named.
ModelConfig load_model_config(const std::string& dir);

// Loads every weight into fp32 (from f32/bf16/f16), sharded or not. Throws on a
// missing tensor or shape mismatch, naming the tensor and file.
BaseWeights load_base_weights(const std::string& dir);
BaseWeights load_base_weights(const std::string& dir, const ModelConfig& cfg);

// Writes an HF model directory (config.json + model.safetensors, fp32); used by
// `ftune init-model` and tests.
void save_hf_model(const std::string& dir, const BaseWeights& w);
std::string model_config_to_json(const ModelConfig& c);
}  // namespace ftune
