#pragma once
// model module: the architecture description of a Llama/Qwen/Mistral-family decoder,
// read from an HF config.json by io/hf_model.hpp.
#include <cstdint>
#include <string>

namespace ftune {

struct RopeConfig {
  std::string type = "default";  // default | linear | llama3
  double theta = 10000.0;
  double factor = 1.0;           // linear, llama3
  double low_freq_factor = 1.0;  // llama3
  double high_freq_factor = 4.0; // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3
};

struct ModelConfig {
  std::string model_type;        // llama | qwen2 | qwen3 | mistral
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  bool attention_bias = false;   // q/k/v biases (qwen2 always; llama when set)
  bool qk_norm = false;          // per-head RMSNorm on q and k before RoPE (qwen3)
  int64_t bos_token_id = -1, eos_token_id = -1, pad_token_id = -1;
  // Mistral-style sliding-window attention (-1 = none). Not implemented as a mask: it changes
  // nothing while sequences are no longer than the window, so the trainer requires
  // model_max_length <= sliding_window.
  int64_t sliding_window = -1;
  RopeConfig rope;

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
};

}  // namespace ftune
