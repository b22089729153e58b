#pragma once
// train module: full fine-tuning (use_peft = false). The trainable vector is the whole base
// model in BaseWeights::storage order (tied embeddings once). So that the trainer's step
// runners, ZeRO stages and optimizer shards serve it unchanged, it travels as the params of
// a LoraAdapter without slots (full_model_as_adapter). On the CPU FullFineTuneBackend
// computes its gradient with CpuTransformer::forward_backward_full; the CUDA backend has its
// own full fine-tuning mode (CudaTransformer::FullFineTuning); ZeRO-3 has its own runners
// (step_runner.hpp). Saving and loading the HF model directory are here.
#include <cstdint>
#include <string>
#include <vector>

#include "ftune/model/backend.hpp"
#include "ftune/model/lora.hpp"
#include "ftune/model/transformer_cpu.hpp"
#include "ftune/model/weights.hpp"

namespace ftune {

// The full model's adapter shape: rank 0, no slots, no values (what step runners that keep
// only a shard of the vector pass to the backend).
LoraAdapter full_model_shape(const ModelConfig& c);
// full_model_shape with params = a copy of w.storage.
LoraAdapter full_model_as_adapter(const BaseWeights& w);
// The same without the copy: w.storage moves into params and w keeps only its config (the
// CUDA backend computes from its own bf16 copy, so host memory holds the model once).
LoraAdapter full_model_as_adapter(BaseWeights&& w);
// 1 where AdamW's weight decay applies, per parameter of the layout: as HF's Trainer
// (get_decay_parameter_names), every tensor but biases and norm weights.
std::vector<uint8_t> full_finetune_decay_mask(const ModelConfig& c);

class FullFineTuneBackend final : public TrainBackend {
 public:
  // weights must outlive the backend; each micro-step first copies the trainer's parameter
  // vector into them (one pass over the model: small next to the step's compute).
  FullFineTuneBackend(BaseWeights& weights, bool gradient_checkpointing);
  std::string name() const override { return "cpu (full fine-tuning)"; }
  // grads: laid out like weights.storage. dropout_seed unused (the models have no dropout).
  LossSum forward_backward(const MicroBatch& mb, const LoraAdapter& params, float* grads,
                           float loss_scale, uint64_t dropout_seed) override;
  LossSum forward_loss(const MicroBatch& mb, const LoraAdapter& params) override;

 private:
  void take(const LoraAdapter& params);
  BaseWeights& w_;
  CpuTransformer model_;
};

// Writes the current parameters as an HF model directory (config.json + fp32
// model.safetensors, or 5 GB shards with model.safetensors.index.json) into dir, with the
// tokenizer files of model_dir copied beside them so transformers loads it as it is.
// params.params is lent to the writer (BaseWeights::adopt) and back, not copied.
void save_full_model(const std::string& dir, const ModelConfig& c, LoraAdapter& params,
                     const std::string& model_dir);
// Reads a directory save_full_model wrote into params (shape checked against c). The old
// values are released first, so host memory holds the model once while reading.
void load_full_model(const std::string& dir, const ModelConfig& c, LoraAdapter& params);

}  // namespace ftune
