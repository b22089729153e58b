#pragma once
// Helpers shared by tests: paths to the source tree, ../shared and a scratch dir.
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <string>

#include "ftune/model/model_config.hpp"

namespace ftune::test {
inline std::string source_dir() { return FTUNE_SOURCE_DIR; }
inline std::string shared_dir() {
  if (const char* e = std::getenv("FTUNE_SHARED_DIR")) return e;
  return FTUNE_SHARED_DIR;
}
inline bool have_shared() { return std::filesystem::exists(shared_dir() + "/data"); }
inline std::string ftune_bin() { return FTUNE_BIN; }
// A fresh, empty scratch directory for one test.
inline std::string scratch(const std::string& name) {
  std::filesystem::path p = std::filesystem::path(FTUNE_TEST_TMP) / name;
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}
// The message of the exception f throws ("" when it does not throw).
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// The shape of ../shared's llama_tiny: hidden 64, inter 160, heads 4 / kv 2, head_dim 16,
// 2 layers, vocab 384.
inline ModelConfig llama_tiny_config() {
  ModelConfig m;
  m.model_type = "llama";
  m.vocab_size = 384;
  m.hidden_size = 64;
  m.intermediate_size = 160;
  m.num_hidden_layers = 2;
  m.num_attention_heads = 4;
  m.num_key_value_heads = 2;
  m.head_dim = 16;
  m.max_position_embeddings = 256;
  return m;
}

// A tiny Qwen2-style decoder for trainer tests: q/k/v biases and tied embeddings, the
// awkward cases (hidden 32, 2 layers, heads 4 / kv 2 of 8, intermediate 48, vocab 64).
inline ModelConfig qwen2_tiny_config() {
  ModelConfig c;
  c.model_type = "qwen2";
  c.vocab_size = 64;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 128;
  c.attention_bias = true;
  c.tie_word_embeddings = true;
  return c;
}
}  // namespace ftune::test
