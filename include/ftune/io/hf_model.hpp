#pragma once
// io module: Hugging Face model directories (config.json + safetensors) to and from
// ModelConfig/BaseWeights.
#include <memory>
#include <string>

#include "ftune/io/safetensors.hpp"
#include "ftune/model/model_config.hpp"
#include "ftune/model/weight_source.hpp"
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
// The same weights read tensor by tensor, without the model in memory (the CUDA backend
// converts them as they come). Checks every tensor's presence, shape and dtype on opening.
// A directory `ftune init-model --weights on_load` wrote (config.json and
// ftune_random_init.json, no safetensors) gives its random init (RandomWeightSource):
// models too large for the disk can be benchmarked.
std::unique_ptr<WeightSource> open_base_weights(const std::string& dir, const ModelConfig& cfg);

// Writes an HF model directory (config.json + model.safetensors) with the tensors stored as
// dtype: F32, or BF16 (rounded to nearest even, converted slice by slice while writing, so
// no second copy of the model is made); config.json's torch_dtype says which. Used by
// `ftune init-model` and tests.
void save_hf_model(const std::string& dir, const BaseWeights& w, DType dtype = DType::F32);
// The directory save_hf_model would write for weights made by init_random_weights_fast,
// generated tensor slice by tensor slice while writing: memory stays a few MB whatever the
// model size (`ftune init-model --fast_init true`).
void save_random_hf_model(const std::string& dir, const ModelConfig& c, uint64_t seed,
                          double std, DType dtype = DType::F32);
// config.json + ftune_random_init.json (seed, std): the model save_random_hf_model would write,
// with its weights generated on load instead of stored. Only ftune reads such a directory.
void save_random_on_load_model(const std::string& dir, const ModelConfig& c, uint64_t seed,
                               double std);
std::string model_config_to_json(const ModelConfig& c, DType dtype = DType::F32);
}  // namespace ftune
