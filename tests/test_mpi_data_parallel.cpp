// Data parallelism on 2 ranks (run under mpirun -np 2): the same global batch gives the same
// run as 1 rank, for ZeRO stages 0, 1, 2 and 3 (frozen layers sharded); optimizer state per
// rank halves with stages 1/2; a 2-rank checkpoint resumes bit-identically on 2 ranks and re-shards onto 1 rank.
// ZeRO-3 full fine-tuning (the trained weights sharded): bit-identical to ZeRO-2, resumable,
// about 1/N of the state per rank, and an empty micro-batch on one rank keeps step.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ftune/dist/communicator.hpp"
#include "ftune/io/safetensors.hpp"
#include "ftune/model/weights.hpp"
#include "ftune/train/full_finetune.hpp"
#include "ftune/train/step_runner.hpp"
#include "ftune/train/trainer.hpp"
#include "ftune/train/zero_optimizer.hpp"
#include "reference_run.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;

namespace {

ftune::Communicator& world() {
  static std::unique_ptr<ftune::Communicator> comm = ftune::bootstrap();
  return *comm;
}

// A PEFT reference run's hyper-parameters (run.json), by default our qwen2_tiny fixture:
// 2 examples per micro-batch, 2 micro-batches per step on one rank.
ftune::TrainConfig fixture_config(const std::string& out, int gas,
                                  fs::path dir = fs::path(ftune::test::source_dir()) /
                                                 "tests/fixtures/qwen2_tiny") {
  ftune::TrainConfig c = ftune::test::reference_run_config(dir, out);
  c.lora_dropout = 0.1;  // dropout masks must follow the global micro-batch, not the rank
  c.gradient_accumulation_steps = gas;
  c.shuffle = true;
  c.logging_steps = 1;
  return c;
}

// Max abs difference over max abs value, across all adapter parameters.
double adapter_rel_diff(const ftune::LoraAdapter& a, const ftune::LoraAdapter& b) {
  REQUIRE(a.params.size() == b.params.size());
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.params.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::fabs(a.params[i] - b.params[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(a.params[i])));
  }
  return diff / scale;
}

std::string rank_dir(const std::string& name) {
  // One scratch dir shared by the ranks of a run (rank 0 writes it), made before any rank uses it.
  static int calls = 0;
  const std::string d = std::string(FTUNE_TEST_TMP) + "/mpi_dp/" + name + "_" + std::to_string(calls++);
  if (world().rank() == 0) {
    fs::remove_all(d);
    fs::create_directories(d);
  }
  world().barrier();
  return d;
}

}  // namespace

TEST_CASE("2 ranks give the same run as 1 rank with the same global batch (ZeRO 0/1/2)") {
  REQUIRE(world().size() == 2);
  const ftune::TrainResult one = ftune::run_training(fixture_config(rank_dir("single") + "/r" +
                                                     std::to_string(world().rank()), 2));
  for (int stage : {0, 1, 2}) {
    CAPTURE(stage);
    ftune::TrainConfig c = fixture_config(rank_dir("dp" + std::to_string(stage)), 1);
    c.zero_stage = stage;
    const ftune::TrainResult two = ftune::run_training(c, world());
    REQUIRE(two.losses.size() == one.losses.size());
    for (size_t i = 0; i < one.losses.size(); ++i)
      CHECK(std::fabs(two.losses[i] - one.losses[i]) / one.losses[i] < 1e-5);
    const double d = adapter_rel_diff(two.adapter, one.adapter);
    MESSAGE("zero_stage " << stage << ": adapter relative difference 2 ranks vs 1 rank = " << d);
    CHECK(d < 1e-5);
    // Ranks hold identical adapters (parameters are gathered / all-reduced identically).
    const std::string mine(reinterpret_cast<const char*>(two.adapter.params.data()),
                           two.adapter.params.size() * sizeof(float));
    const auto all = world().all_gather_strings(mine);
    CHECK(all[0] == all[1]);
  }
}

TEST_CASE("2 ranks vs 1 rank on the shared llama_tiny reference data") {
  const fs::path ref = fs::path(ftune::test::shared_dir()) / "data/reference/llama_tiny";
  if (!fs::exists(ref)) {
    MESSAGE("skipped: ../shared is absent");
    return;
  }
  ftune::TrainConfig c1 = fixture_config(rank_dir("ref1") + "/r" + std::to_string(world().rank()), 2, ref);
  c1.lora_dropout = 0;
  c1.shuffle = false;
  const ftune::TrainResult one = ftune::run_training(c1);
  ftune::TrainConfig c2 = fixture_config(rank_dir("ref2"), 1, ref);
  c2.lora_dropout = 0;
  c2.shuffle = false;
  const ftune::TrainResult two = ftune::run_training(c2, world());
  for (size_t i = 0; i < one.losses.size(); ++i)
    CHECK(std::fabs(two.losses[i] - one.losses[i]) / one.losses[i] < 1e-5);
  const double d = adapter_rel_diff(two.adapter, one.adapter);
  MESSAGE("llama_tiny: adapter relative difference 2 ranks vs 1 rank = " << d);
  CHECK(d < 1e-5);
}

TEST_CASE("ranks split the validation set and get the single-rank eval loss") {
  ftune::TrainConfig c1 = fixture_config(rank_dir("ev1") + "/r" + std::to_string(world().rank()), 2);
  c1.validation_file_dir = c1.train_file_dir;  // 32 examples: an odd split would show
  c1.max_eval_samples = 31;
  c1.per_device_eval_batch_size = 3;
  const ftune::TrainResult one = ftune::run_training(c1);
  ftune::TrainConfig c2 = c1;
  c2.output_dir = rank_dir("ev2");
  c2.gradient_accumulation_steps = 1;
  const ftune::TrainResult two = ftune::run_training(c2, world());
  REQUIRE(one.eval_losses.size() == 1);
  REQUIRE(two.eval_losses.size() == 1);
  MESSAGE("eval loss 1 rank " << one.eval_losses[0] << ", 2 ranks " << two.eval_losses[0]);
  CHECK(std::fabs(one.eval_losses[0] - two.eval_losses[0]) / one.eval_losses[0] < 1e-6);
}

TEST_CASE("ZeRO-3 (layers sharded, gathered per layer): 2 ranks = 1 rank, evaluation included") {
  REQUIRE(world().size() == 2);
  // An odd validation split (31 examples, batches of 3): rank 0 runs 6 forwards, rank 1 5
  // real ones and an empty one, so the layer gathers stay in step.
  auto configure = [](ftune::TrainConfig c) {
    c.validation_file_dir = c.train_file_dir;
    c.max_eval_samples = 31;
    c.per_device_eval_batch_size = 3;
    c.eval_steps = 1;
    return c;
  };
  for (bool ckpt : {false, true}) {
    CAPTURE(ckpt);
    ftune::TrainConfig c1 = configure(fixture_config(rank_dir("z3one") + "/r" + std::to_string(world().rank()), 2));
    c1.gradient_checkpointing = ckpt;
    const ftune::TrainResult one = ftune::run_training(c1);
    ftune::TrainConfig c3 = configure(fixture_config(rank_dir("z3two"), 1));
    c3.gradient_checkpointing = ckpt;
    c3.zero_stage = 3;
    const ftune::TrainResult three = ftune::run_training(c3, world());
    REQUIRE(three.losses.size() == one.losses.size());
    for (size_t i = 0; i < one.losses.size(); ++i)
      CHECK(std::fabs(three.losses[i] - one.losses[i]) / one.losses[i] < 1e-5);
    const double d = adapter_rel_diff(three.adapter, one.adapter);
    MESSAGE("zero_stage 3, checkpointing " << ckpt << ": adapter relative difference 2 ranks vs 1 rank = " << d);
    CHECK(d < 1e-5);
    REQUIRE(three.eval_losses.size() == 1);
    CHECK(std::fabs(three.eval_losses[0] - one.eval_losses[0]) / one.eval_losses[0] < 1e-6);
  }
}

TEST_CASE("full fine-tuning (use_peft = false): 2 ranks = 1 rank, ZeRO 0 and 2") {
  REQUIRE(world().size() == 2);
  auto full_ft = [](ftune::TrainConfig c) {
    c.use_peft = false;
    c.weight_decay = 0;
    c.init_adapter.clear();
    c.learning_rate = 1e-3;
    return c;
  };
  const ftune::TrainResult one = ftune::run_training(full_ft(fixture_config(
      rank_dir("full_single") + "/r" + std::to_string(world().rank()), 2)));
  for (int stage : {0, 2}) {
    CAPTURE(stage);
    ftune::TrainConfig c = full_ft(fixture_config(rank_dir("full_dp" + std::to_string(stage)), 1));
    c.zero_stage = stage;
    const ftune::TrainResult two = ftune::run_training(c, world());
    REQUIRE(two.losses.size() == one.losses.size());
    for (size_t i = 0; i < one.losses.size(); ++i)
      CHECK(std::fabs(two.losses[i] - one.losses[i]) / one.losses[i] < 1e-5);
    // Not bit-identical as LoRA is: tensors with several contributions per micro-batch (the
    // tied embedding, lm_head chunks) sum them in another order across ranks (~1e-6).
    const double d = adapter_rel_diff(two.adapter, one.adapter);  // the whole model here
    MESSAGE("full fine-tuning, zero_stage " << stage << ": model relative difference " << d);
    CHECK(d < 1e-5);
  }
}

TEST_CASE("optimizer state per rank falls as 1/N with ZeRO 1 and 2") {
  const size_t n = 1000001;
  ftune::ZeroAdamW s0(n, 0, world(), {}), s1(n, 1, world(), {}), s2(n, 2, world(), {});
  MESSAGE("optimizer bytes per rank: stage 0 " << s0.state_bytes() << ", stage 1 " << s1.state_bytes()
                                               << ", stage 2 " << s2.state_bytes());
  CHECK(s0.state_bytes() == 3 * n * sizeof(float));
  CHECK(s1.state_bytes() <= (s0.state_bytes() / 2) + 3 * sizeof(float));
  CHECK(s2.state_bytes() == s1.state_bytes());
}

TEST_CASE("resume: bit-identical on the same world size, re-sharded onto 1 rank") {
  for (int stage : {0, 2, 3}) {
    CAPTURE(stage);
    // Uninterrupted 2-rank run that also saves checkpoint-4.
    ftune::TrainConfig full = fixture_config(rank_dir("full"), 1);
    full.zero_stage = stage;
    full.save_steps = 4;
    const ftune::TrainResult a = ftune::run_training(full, world());
    const std::string ckpt = full.output_dir + "/checkpoint-4";
    REQUIRE(fs::exists(ckpt + "/COMPLETE"));

    // Resume it on 2 ranks from step 4: every loss and parameter bit-identical.
    ftune::TrainConfig res = fixture_config(rank_dir("resumed"), 1);
    res.zero_stage = stage;
    res.resume_from_checkpoint = ckpt;
    const ftune::TrainResult b = ftune::run_training(res, world());
    REQUIRE(b.losses.size() == a.losses.size());
    for (size_t i = 0; i < a.losses.size(); ++i) CHECK(b.losses[i] == a.losses[i]);
    CHECK(std::memcmp(a.adapter.params.data(), b.adapter.params.data(),
                      a.adapter.params.size() * sizeof(float)) == 0);

    // Resume the 2-rank checkpoint on 1 rank (twice the accumulation): within 1e-6.
    ftune::TrainConfig solo = fixture_config(rank_dir("solo") + "/r" + std::to_string(world().rank()), 2);
    solo.zero_stage = stage;
    solo.resume_from_checkpoint = ckpt;
    const ftune::TrainResult c = ftune::run_training(solo);
    const double d = adapter_rel_diff(c.adapter, a.adapter);
    MESSAGE("zero_stage " << stage << ": 2 ranks -> 1 rank resume, adapter relative difference " << d);
    CHECK(d < 1e-6);
  }
}

TEST_CASE("ZeRO-3 full fine-tuning (trained weights sharded): = ZeRO-2 bit for bit, = 1 rank") {
  REQUIRE(world().size() == 2);
  auto full_ft = [](ftune::TrainConfig c) {
    c.use_peft = false;
    c.weight_decay = 0.01;  // the decay mask's owned slice is exercised too
    c.init_adapter.clear();
    c.learning_rate = 1e-3;
    c.validation_file_dir = c.train_file_dir;  // an odd split: one rank runs an empty batch
    c.max_eval_samples = 31;
    c.per_device_eval_batch_size = 3;
    c.eval_steps = 2;
    return c;
  };
  const ftune::TrainResult one = ftune::run_training(full_ft(fixture_config(
      rank_dir("z3full_single") + "/r" + std::to_string(world().rank()), 2)));
  for (bool ckpt : {true, false}) {
    CAPTURE(ckpt);
    ftune::TrainConfig c2 = full_ft(fixture_config(rank_dir("z3full_s2"), 1));
    c2.zero_stage = 2;
    c2.gradient_checkpointing = ckpt;
    const ftune::TrainResult two = ftune::run_training(c2, world());
    ftune::TrainConfig c3 = c2;
    c3.output_dir = rank_dir("z3full_s3");
    c3.zero_stage = 3;
    const ftune::TrainResult three = ftune::run_training(c3, world());
    // One micro-batch per rank per step: each block's gradient is the same two-term sum as
    // ZeRO-2's reduce-scatter, so the runs agree exactly.
    CHECK(three.losses == two.losses);
    CHECK(three.eval_losses == two.eval_losses);
    REQUIRE(three.adapter.params.size() == two.adapter.params.size());
    CHECK(std::memcmp(three.adapter.params.data(), two.adapter.params.data(),
                      two.adapter.params.size() * sizeof(float)) == 0);
    const double d = adapter_rel_diff(three.adapter, one.adapter);
    MESSAGE("ZeRO-3 full fine-tuning, checkpointing " << ckpt << ": model vs 1 rank " << d);
    CHECK(d < 1e-5);
    REQUIRE(three.eval_losses.size() == one.eval_losses.size());
    for (size_t i = 0; i < one.eval_losses.size(); ++i)
      CHECK(std::fabs(three.eval_losses[i] - one.eval_losses[i]) / one.eval_losses[i] < 1e-5);
  }

  // Resume a ZeRO-3 checkpoint: on 2 ranks bit-identically, and re-sharded onto 1 rank at
  // stage 0 (the optimizer files are ZeRO-1/2's).
  ftune::TrainConfig full = full_ft(fixture_config(rank_dir("z3full_ck"), 1));
  full.zero_stage = 3;
  full.save_steps = 4;
  full.eval_steps = 0;
  full.validation_file_dir.clear();
  const ftune::TrainResult a = ftune::run_training(full, world());
  const std::string ck = full.output_dir + "/checkpoint-4";
  REQUIRE(fs::exists(ck + "/COMPLETE"));
  ftune::TrainConfig res = full;
  res.output_dir = rank_dir("z3full_res");
  res.resume_from_checkpoint = ck;
  const ftune::TrainResult b = ftune::run_training(res, world());
  CHECK(b.losses == a.losses);
  CHECK(std::memcmp(a.adapter.params.data(), b.adapter.params.data(),
                    a.adapter.params.size() * sizeof(float)) == 0);
  ftune::TrainConfig solo = full;
  solo.output_dir = rank_dir("z3full_solo") + "/r" + std::to_string(world().rank());
  solo.gradient_accumulation_steps = 2;
  solo.zero_stage = 0;
  solo.resume_from_checkpoint = ck;
  const ftune::TrainResult c = ftune::run_training(solo);
  const double d = adapter_rel_diff(c.adapter, a.adapter);
  MESSAGE("ZeRO-3 full fine-tuning: 2 ranks -> 1 rank (stage 0) resume, model difference " << d);
  CHECK(d < 1e-5);
}

TEST_CASE("ZeRO-3 full fine-tuning: per-rank model and optimizer state are about 1/N") {
  ftune::ModelConfig cfg = ftune::test::qwen2_tiny_config();
  cfg.num_hidden_layers = 8;  // layers dominate, as in real models
  cfg.vocab_size = 64;
  ftune::BaseWeights w;
  w.allocate(cfg);
  ftune::init_random_weights(w, 5, 0.1);
  const size_t n = w.storage.size();
  const ftune::LoraAdapter full = ftune::full_model_as_adapter(w);
  const auto runner = ftune::make_zero3_full_step_runner(full, world(), {}, true);
  const size_t model = ftune::zero3_full_bytes(*runner), state = runner->state_bytes();
  MESSAGE("ZeRO-3 full fine-tuning, " << n << " parameters: this rank holds " << model
          << " bytes of model state and " << state << " of optimizer state; unsharded: "
          << 3 * n * sizeof(float) << " + " << 3 * n * sizeof(float));
  CHECK(state <= 3 * (n / 2 + 1) * sizeof(float));
  // Shard (params + grads) plus one layer, the embedding table and the tail, each with its
  // gradient scratch; unsharded: the model, its gradient and the trainer's copy.
  CHECK(model < 3 * n * sizeof(float) / 2);
  CHECK(runner->owned().size() <= n / 2 + 1);

  // An empty micro-batch on one rank still joins every gather and flush: rank 0 trains on a
  // batch while rank 1 has none, and the step equals one rank's full fine-tuning step on it.
  ftune::Example ex;
  for (int t = 0; t < 9; ++t) ex.input_ids.push_back((7 * t + 3) % 64);
  ex.labels = ex.input_ids;
  const ftune::MicroBatch batch = ftune::make_micro_batch({&ex}), none;
  const ftune::LossSum got = runner->accumulate(world().rank() == 0 ? batch : none, 0.1f, 0);
  runner->step(1e-3, 0.0);
  ftune::LoraAdapter after = full;
  runner->params_to_host(after);
  auto solo = ftune::make_single_rank_communicator();
  const auto ref = ftune::make_zero3_full_step_runner(full, *solo, {}, true);
  const ftune::LossSum want = ref->accumulate(batch, 0.1f, 0);
  ref->step(1e-3, 0.0);
  ftune::LoraAdapter expect = full;
  ref->params_to_host(expect);
  if (world().rank() == 0) CHECK(got.loss_sum == want.loss_sum);
  CHECK(std::memcmp(after.params.data(), expect.params.data(), n * sizeof(float)) == 0);
  CHECK(after.params != full.params);
}
