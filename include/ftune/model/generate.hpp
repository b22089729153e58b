#pragma once
// model module: text generation on the CPU. CpuGenerator runs the decoder forward for
// inference only (no activations kept, no LoRA path: merge the adapter into the weights
// first with merge_lora, which is exact up to fp32 rounding) with a per-layer KV cache, so
// each new token costs one row through the model; positions continue across feed() calls.
// Sampling follows HF generate: temperature, then top-k, then top-p (nucleus).
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "ftune/model/weights.hpp"

namespace ftune {

struct SamplingParams {
  double temperature = 0.0;  // <= 0: greedy (argmax, lowest id on ties)
  double top_p = 1.0;        // keep the smallest set of tokens whose probability reaches top_p
  int64_t top_k = 0;         // keep the k most likely tokens; 0 = all
  uint64_t seed = 0;
};

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  SamplingParams sampling;
  std::vector<int32_t> stop_ids;  // eos ids: generation ends when one is drawn (not returned)
  int64_t vocab_limit = -1;       // > 0: never draw ids >= this (model vocab padded past the
                                  // tokenizer's, whose decoder would refuse them)
};

// The next token from logits[0..V). rng is used only when sampling.
int32_t pick_token(const float* logits, int64_t V, const SamplingParams& p, std::mt19937_64& rng);

class CpuGenerator {
 public:
  // `w` must outlive the generator.
  explicit CpuGenerator(const BaseWeights& w);
  ~CpuGenerator();
  CpuGenerator(const CpuGenerator&) = delete;
  CpuGenerator& operator=(const CpuGenerator&) = delete;

  void reset();                  // forgets the cache: the next token is at position 0
  int64_t num_cached() const;    // tokens in the cache = position of the next token
  // Runs `tokens` at positions num_cached().., appends their keys/values to the cache and
  // returns the logits [vocab_size] of the last one (valid until the next call).
  const std::vector<float>& feed(const std::vector<int32_t>& tokens);

  // reset(), feed(prompt), then up to max_new_tokens draws, each fed back one at a time.
  // Returns the new tokens (no prompt, no stop token). on_token (optional) sees each new
  // token and returns false to end early (the token is kept).
  std::vector<int32_t> generate(const std::vector<int32_t>& prompt, const GenerateOptions& o,
                                const std::function<bool(int32_t)>& on_token = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The logits of the last token of `tokens` from one pass over the whole sequence in a fresh
// generator (no cache reuse): the reference the cached decoding is tested against.
std::vector<float> last_token_logits(const BaseWeights& w, const std::vector<int32_t>& tokens);

}  // namespace ftune
