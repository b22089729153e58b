// Full fine-tuning on the CPU backend (see full_finetune.hpp).
#include "ftune/train/full_finetune.hpp"

#include <algorithm>
#include <filesystem>
#include <stdexcept>

#include "ftune/io/hf_model.hpp"
#include "ftune/train/commands.hpp"  // save_hf_model_sharded

namespace fs = std::filesystem;

namespace ftune {

LoraAdapter full_model_shape(const ModelConfig& c) {
  LoraAdapter a;
  a.model = c;
  a.spec.rank = 0;
  a.spec.targets.fill(false);
  a.slot_of.assign(c.num_hidden_layers * kNumProj, -1);
  return a;
}

LoraAdapter full_model_as_adapter(const BaseWeights& w) {
  LoraAdapter a = full_model_shape(w.cfg);
  a.params = w.storage;
  return a;
}

LoraAdapter full_model_as_adapter(BaseWeights&& w) {
  LoraAdapter a = full_model_shape(w.cfg);
  a.params = std::move(w.storage);
  const ModelConfig c = w.cfg;
  w = BaseWeights{};
  w.cfg = c;
  return a;
}

std::vector<uint8_t> full_finetune_decay_mask(const ModelConfig& c) {
  const std::vector<BaseWeights::Entry> entries = BaseWeights::layout(c);
  std::vector<uint8_t> mask(BaseWeights::layout_size(entries), 1);
  for (const BaseWeights::Entry& e : entries) {
    // HF's forbidden name patterns: "bias", "layernorm", "rmsnorm", "norm", "_norm".
    const bool exempt = e.name.find("bias") != std::string::npos ||
                        e.name.find("norm") != std::string::npos;
    if (exempt) std::fill_n(mask.begin() + e.offset, e.numel(), uint8_t{0});
  }
  return mask;
}

FullFineTuneBackend::FullFineTuneBackend(BaseWeights& weights, bool gradient_checkpointing)
    : w_(weights), model_(weights, gradient_checkpointing) {}

void FullFineTuneBackend::take(const LoraAdapter& params) {
  if (params.params.size() != w_.storage.size())
    throw std::logic_error("full fine-tuning: parameter vector does not match the model");
  std::copy(params.params.begin(), params.params.end(), w_.storage.begin());
}

LossSum FullFineTuneBackend::forward_backward(const MicroBatch& mb, const LoraAdapter& params,
                                              float* grads, float loss_scale, uint64_t) {
  take(params);
  return model_.forward_backward_full(mb, grads, loss_scale);
}

LossSum FullFineTuneBackend::forward_loss(const MicroBatch& mb, const LoraAdapter& params) {
  take(params);
  return model_.forward_loss(mb, params);  // no slots: the base model's loss
}

void save_full_model(const std::string& dir, const ModelConfig& c, LoraAdapter& params,
                     const std::string& model_dir) {
  // The writer wants named views: lend it the vector, and take it back even when it throws.
  struct Lend {
    LoraAdapter& p;
    BaseWeights w;
    ~Lend() { p.params = std::move(w.storage); }
  } lend{params, BaseWeights::adopt(c, std::move(params.params))};
  // fp32 (the trained values as they are), split like save_pretrained past 5 GB.
  save_hf_model_sharded(dir, lend.w, int64_t(5) * 1000 * 1000 * 1000);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "tokenizer.model", "generation_config.json"}) {
    const fs::path src = fs::path(model_dir) / f;
    if (fs::is_regular_file(src))
      fs::copy_file(src, fs::path(dir) / f, fs::copy_options::overwrite_existing);
  }
}

void load_full_model(const std::string& dir, const ModelConfig& c, LoraAdapter& params) {
  const std::vector<BaseWeights::Entry> entries = BaseWeights::layout(c);
  const size_t n = BaseWeights::layout_size(entries);
  std::vector<float>().swap(params.params);
  BaseWeights saved = load_base_weights(dir, c);
  if (saved.storage.size() != n)
    throw std::runtime_error("checkpoint model '" + dir + "' does not match the model's size");
  params.params = std::move(saved.storage);
}

}  // namespace ftune
