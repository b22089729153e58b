// Full fine-tuning (use_peft = false) through the trainer on the CPU backend: the first
// optimizer step equals AdamW applied by hand to forward_backward_full's gradient, with and
// without HF's weight-decay exemptions (so the
// loss normalisation, accumulation and optimizer wiring are the LoRA path's), every tensor
// trains, the output is an HF model directory that loads, checkpoints resume bit-identically,
// and an existing model in output_dir is not overwritten without overwrite_output_dir.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "ftune/data/dataset.hpp"
#include "ftune/io/hf_model.hpp"
#include "ftune/model/transformer_cpu.hpp"
#include "ftune/model/weights.hpp"
#include "ftune/train/data_stream.hpp"
#include "ftune/train/full_finetune.hpp"
#include "ftune/train/trainer.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;

namespace {

std::string setup(const std::string& name) {
  const std::string root = ftune::test::scratch(name);
  ftune::BaseWeights w;
  w.allocate(ftune::test::qwen2_tiny_config());
  ftune::init_random_weights(w, 3, 0.1);
  ftune::save_hf_model(root + "/model", w);
  fs::create_directories(root + "/data");
  std::ofstream f(root + "/data/train.jsonl");
  for (int i = 0; i < 24; ++i) {
    f << "{\"input_ids\": [";
    for (int t = 0; t < 6 + i % 7; ++t) f << (t ? "," : "") << (i * 5 + t * 11) % 64;
    f << "]}\n";
  }
  return root;
}

ftune::TrainConfig config(const std::string& root, const std::string& out) {
  ftune::TrainConfig c;
  c.model_name_or_path = root + "/model";
  c.train_file_dir = {root + "/data"};
  c.output_dir = out;
  c.overwrite_output_dir = true;
  c.device = "cpu";
  c.use_peft = false;
  c.learning_rate = 1e-3;
  c.lr_scheduler_type = "constant";
  c.per_device_train_batch_size = 2;
  c.gradient_accumulation_steps = 2;
  c.max_steps = 6;
  c.shuffle = false;
  c.validation_split_percentage = 0;
  c.max_grad_norm = 0;  // no clipping: the hand-made step below is plain AdamW
  return c;
}

}  // namespace

TEST_CASE("full fine-tuning: the first step is AdamW on forward_backward_full's gradient") {
  const std::string root = setup("fullft_step");
  for (double wd : {0.0, 0.1}) {
    CAPTURE(wd);
    ftune::TrainConfig c = config(root, root + "/out");
    c.max_steps = 1;
    c.weight_decay = wd;
    ftune::run_training(c);

    // By hand: the step's two micro-batches, loss normalised by their label count, one AdamW
    // step from zero moments (bias-corrected: m^ = g, v^ = g^2), weight decay on all but
    // biases and norm weights (HF's Trainer).
    ftune::BaseWeights w = ftune::load_base_weights(root + "/model");
    ftune::DatasetOptions o;
    o.dirs = c.train_file_dir;
    o.max_length = c.model_max_length;
    const std::vector<ftune::Example> data = ftune::load_dataset(o);
    ftune::MicroBatchStream stream(data, c.per_device_train_batch_size, false, c.seed);
    const ftune::MicroBatch m0 = stream.next(), m1 = stream.next();
    const float scale = 1.f / static_cast<float>(m0.num_targets() + m1.num_targets());
    std::vector<float> g(w.storage.size(), 0.f);
    ftune::CpuTransformer model(w, false);
    model.forward_backward_full(m0, g.data(), scale);
    model.forward_backward_full(m1, g.data(), scale);
    std::vector<double> decay(g.size(), 1.0);
    for (const auto& e : ftune::BaseWeights::layout(w.cfg))
      if (e.name.find("bias") == std::string::npos && e.name.find("norm") == std::string::npos)
        std::fill_n(decay.begin() + e.offset, e.numel(), 1.0 - c.learning_rate * wd);
    const ftune::BaseWeights got = ftune::load_base_weights(root + "/out/model");
    REQUIRE(got.storage.size() == w.storage.size());
    size_t bad = 0, moved = 0, with_grad = 0;
    for (size_t i = 0; i < g.size(); ++i) {
      const double gi = g[i];
      const double want =
          w.storage[i] * decay[i] - c.learning_rate * gi / (std::abs(gi) + c.adam_epsilon);
      bad += std::abs(got.storage[i] - want) > 1e-6 * (std::abs(want) + 1e-3);
      moved += got.storage[i] != w.storage[i];
      with_grad += gi != 0.0;
    }
    CHECK(bad == 0);
    // Every weight with a gradient moved (embedding rows of unseen tokens have none).
    if (wd == 0) CHECK(moved == with_grad);
    CHECK(with_grad > g.size() * 9 / 10);
  }
}

TEST_CASE("full fine-tuning: loss falls, HF directory out, resume bit-identical") {
  const std::string root = setup("fullft_run");
  ftune::TrainConfig c = config(root, root + "/full");
  c.lr_scheduler_type = "cosine";
  c.warmup_steps = 1;
  c.max_grad_norm = 1.0;
  const ftune::TrainResult full = ftune::run_training(c);
  REQUIRE(full.losses.size() == 6);
  CHECK(full.losses.back() < full.losses.front());
  for (const char* f : {"config.json", "model.safetensors"})
    CHECK(fs::exists(fs::path(root) / "full/model" / f));
  CHECK_FALSE(fs::exists(fs::path(root) / "full/adapter"));
  CHECK(fs::exists(fs::path(root) / "full/checkpoint-6/model/model.safetensors"));
  const ftune::BaseWeights trained = ftune::load_base_weights(root + "/full/model");
  CHECK(trained.cfg.tie_word_embeddings);

  // Resume from step 3 to 6: the same weights, bit for bit. (The cosine schedule depends on
  // max_steps, so the interrupted run is one of 6 steps with a checkpoint at 3 whose later
  // outputs are then removed.)
  ftune::TrainConfig a = config(root, root + "/resumed");
  a.lr_scheduler_type = c.lr_scheduler_type;
  a.warmup_steps = c.warmup_steps;
  a.max_grad_norm = c.max_grad_norm;
  a.save_steps = 3;
  ftune::run_training(a);
  fs::remove_all(fs::path(root) / "resumed/checkpoint-6");
  fs::remove_all(fs::path(root) / "resumed/model");
  ftune::TrainConfig b = a;
  b.resume_from_checkpoint = "latest";
  b.overwrite_output_dir = false;
  const ftune::TrainResult resumed = ftune::run_training(b);
  const ftune::BaseWeights again = ftune::load_base_weights(root + "/resumed/model");
  REQUIRE(again.storage.size() == trained.storage.size());
  CHECK(std::memcmp(again.storage.data(), trained.storage.data(),
                    trained.storage.size() * sizeof(float)) == 0);
  CHECK(resumed.losses == full.losses);

  // A finished full fine-tuning output is not overwritten by a new run by accident.
  ftune::TrainConfig d = config(root, root + "/full");
  d.overwrite_output_dir = false;
  CHECK_THROWS_WITH_AS(ftune::run_training(d), doctest::Contains("already holds a model"),
                       std::runtime_error);
}

TEST_CASE("save_only_model: checkpoints without optimizer state, the same model, no resume") {
  const std::string root = setup("fullft_save_only");
  ftune::TrainConfig c = config(root, root + "/with_state");
  c.save_steps = 3;
  const ftune::TrainResult with_state = ftune::run_training(c);
  ftune::TrainConfig s = config(root, root + "/model_only");
  s.save_steps = 3;
  s.save_only_model = true;
  const ftune::TrainResult model_only = ftune::run_training(s);
  CHECK(model_only.losses == with_state.losses);
  const fs::path ck = fs::path(root) / "model_only/checkpoint-3";
  CHECK(fs::exists(ck / "COMPLETE"));
  CHECK(fs::exists(ck / "model/model.safetensors"));
  CHECK(fs::exists(ck / "trainer_state.h5"));
  CHECK_FALSE(fs::exists(ck / "optimizer-rank-0-of-1.h5"));
  // No final checkpoint: output_dir/model is the final save.
  CHECK_FALSE(fs::exists(fs::path(root) / "model_only/checkpoint-6"));
  CHECK(fs::exists(fs::path(root) / "with_state/checkpoint-6/optimizer-rank-0-of-1.h5"));
  const ftune::BaseWeights a = ftune::load_base_weights(root + "/model_only/model");
  const ftune::BaseWeights b = ftune::load_base_weights(root + "/with_state/model");
  REQUIRE(a.storage.size() == b.storage.size());
  CHECK(std::memcmp(a.storage.data(), b.storage.data(), a.storage.size() * sizeof(float)) == 0);
  // The step-3 model is the one the full checkpoint holds.
  const ftune::BaseWeights a3 = ftune::load_base_weights((ck / "model").string());
  const ftune::BaseWeights b3 = ftune::load_base_weights(root + "/with_state/checkpoint-3/model");
  CHECK(std::memcmp(a3.storage.data(), b3.storage.data(), a3.storage.size() * sizeof(float)) == 0);
  // Resuming it says why it cannot.
  ftune::TrainConfig r = s;
  r.resume_from_checkpoint = ck.string();
  CHECK_THROWS_WITH_AS(ftune::run_training(r), doctest::Contains("save_only_model"),
                       std::runtime_error);
}

TEST_CASE("BaseWeights::adopt lends a vector the views; full_model_as_adapter moves without a copy") {
  const ftune::ModelConfig cfg = ftune::test::qwen2_tiny_config();  // biases, tied embeddings
  ftune::BaseWeights w;
  w.allocate(cfg);
  ftune::init_random_weights(w, 11, 0.1);
  const std::vector<float> values = w.storage;
  const float* buffer = w.storage.data();
  ftune::LoraAdapter moved = ftune::full_model_as_adapter(std::move(w));
  CHECK(moved.params.data() == buffer);  // the same buffer, not a copy
  CHECK(w.storage.empty());
  CHECK(moved.params == values);
  CHECK(moved.slots.empty());
  ftune::BaseWeights lent = ftune::BaseWeights::adopt(cfg, std::move(moved.params));
  CHECK(lent.storage.data() == buffer);
  ftune::BaseWeights fresh;
  fresh.allocate(cfg);
  // Every view sits where allocate() puts it.
  auto at = [](const ftune::BaseWeights& b, const float* p) { return p ? p - b.storage.data() : -1; };
  CHECK(at(lent, lent.embed) == at(fresh, fresh.embed));
  CHECK(at(lent, lent.lm_head) == at(fresh, fresh.lm_head));
  CHECK(at(lent, lent.final_norm) == at(fresh, fresh.final_norm));
  for (size_t l = 0; l < fresh.layers.size(); ++l) {
    CHECK(at(lent, lent.layers[l].input_norm) == at(fresh, fresh.layers[l].input_norm));
    CHECK(at(lent, lent.layers[l].post_norm) == at(fresh, fresh.layers[l].post_norm));
    for (int p = 0; p < ftune::kNumProj; ++p) {
      CHECK(at(lent, lent.layers[l].w[p]) == at(fresh, fresh.layers[l].w[p]));
      CHECK(at(lent, lent.layers[l].b[p]) == at(fresh, fresh.layers[l].b[p]));
    }
  }
  std::vector<float> short_vector(10);
  CHECK_THROWS_AS(ftune::BaseWeights::adopt(cfg, std::move(short_vector)), std::logic_error);
  CHECK(short_vector.size() == 10);  // not taken when refused
}

TEST_CASE("zero_stage = 3 full fine-tuning on one rank: the stage-0 run, the model saved whole") {
  const std::string root = setup("fullft_zero3");
  ftune::TrainConfig c0 = config(root, root + "/stage0");
  c0.max_grad_norm = 1.0;
  c0.weight_decay = 0.01;
  const ftune::TrainResult a = ftune::run_training(c0);
  ftune::TrainConfig c3 = c0;
  c3.output_dir = root + "/stage3";
  c3.zero_stage = 3;
  c3.save_steps = 3;
  const ftune::TrainResult b = ftune::run_training(c3);
  REQUIRE(b.losses.size() == a.losses.size());
  // Gradient accumulation sums each block's micro-batch gradients in another order (flushed
  // per micro-batch, not summed in one buffer): not bit for bit, within fp32 rounding.
  for (size_t i = 0; i < a.losses.size(); ++i)
    CHECK(std::fabs(b.losses[i] - a.losses[i]) / a.losses[i] < 1e-6);
  const ftune::BaseWeights wa = ftune::load_base_weights(root + "/stage0/model");
  const ftune::BaseWeights wb = ftune::load_base_weights(root + "/stage3/model");
  REQUIRE(wa.storage.size() == wb.storage.size());
  double diff = 0, scale = 0;
  for (size_t i = 0; i < wa.storage.size(); ++i) {
    diff = std::max(diff, double(std::fabs(wa.storage[i] - wb.storage[i])));
    scale = std::max(scale, double(std::fabs(wa.storage[i])));
  }
  MESSAGE("zero_stage 3 vs 0, full fine-tuning, one rank: model max difference / max " << diff / scale);
  CHECK(diff / scale < 1e-6);
  CHECK(fs::exists(fs::path(root) / "stage3/checkpoint-3/optimizer-rank-0-of-1.h5"));
  // Its checkpoint resumes at stage 0 (the optimizer files are stage 1/2's format).
  ftune::TrainConfig r = c0;
  r.output_dir = root + "/resumed";
  r.resume_from_checkpoint = root + "/stage3/checkpoint-3";
  const ftune::TrainResult c = ftune::run_training(r);
  for (size_t i = 0; i < a.losses.size(); ++i)
    CHECK(std::fabs(c.losses[i] - a.losses[i]) / a.losses[i] < 1e-6);
}
