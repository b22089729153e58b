// Checkpoints of a single-rank run: layout (HDF5 + PEFT copy + COMPLETE), pruning,
// bit-identical resume, and refusal of checkpoints from another model or LoRA config.
#include <doctest/doctest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "ftune/io/hf_model.hpp"
#include "ftune/io/safetensors.hpp"
#include "ftune/model/weights.hpp"
#include "ftune/train/checkpoint.hpp"
#include "ftune/train/trainer.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;

namespace {

std::string tiny_model(const std::string& dir, uint64_t seed) {
  ftune::BaseWeights w;
  w.allocate(ftune::test::qwen2_tiny_config());
  ftune::init_random_weights(w, seed, 0.1);
  ftune::save_hf_model(dir, w);
  return dir;
}

ftune::TrainConfig config(const std::string& root, const std::string& out) {
  ftune::TrainConfig c;
  c.model_name_or_path = root + "/model";
  c.train_file_dir = {root + "/data"};
  c.output_dir = out;
  c.overwrite_output_dir = true;
  c.device = "cpu";  // exact comparisons: the fp32 reference backend even where a GPU exists
  c.lora_rank = 4;
  c.lora_alpha = 8;
  c.lora_dropout = 0.1;
  c.learning_rate = 0.01;
  c.lr_scheduler_type = "cosine";
  c.warmup_steps = 2;
  c.per_device_train_batch_size = 2;
  c.gradient_accumulation_steps = 2;
  c.max_steps = 7;
  c.weight_decay = 0.01;
  return c;
}

std::string setup(const std::string& name) {
  const std::string root = ftune::test::scratch(name);
  tiny_model(root + "/model", 1);
  fs::create_directories(root + "/data");
  std::ofstream f(root + "/data/train.jsonl");
  for (int i = 0; i < 40; ++i) {
    f << "{\"input_ids\": [";
    for (int t = 0; t < 6 + i % 9; ++t) f << (t ? "," : "") << (3 + (i * 7 + t * 13) % 60);
    f << "]}\n";
  }
  return root;
}

}  // namespace

TEST_CASE("checkpoint layout, pruning and h5dump") {
  const std::string root = setup("ckpt_layout");
  ftune::TrainConfig c = config(root, root + "/out");
  c.save_steps = 2;
  c.save_total_limit = 2;
  ftune::run_training(c);
  // Saved at 2, 4, 6 and at the end (7); the limit keeps the newest two.
  CHECK_FALSE(fs::exists(root + "/out/checkpoint-2"));
  CHECK_FALSE(fs::exists(root + "/out/checkpoint-4"));
  for (const char* step : {"6", "7"}) {
    const fs::path d = fs::path(root) / "out" / ("checkpoint-" + std::string(step));
    CAPTURE(d);
    CHECK(fs::exists(d / "COMPLETE"));
    CHECK(fs::exists(d / "adapter.h5"));
    CHECK(fs::exists(d / "trainer_state.h5"));
    CHECK(fs::exists(d / "optimizer-rank-0-of-1.h5"));
    CHECK(fs::exists(d / "adapter/adapter_config.json"));
    ftune::SafetensorsFile peft((d / "adapter/adapter_model.safetensors").string());
    CHECK(peft.names().size() == 2 * 7 * 2);
    if (std::system("command -v h5dump >/dev/null 2>&1") == 0) {
      for (const char* f : {"adapter.h5", "trainer_state.h5", "optimizer-rank-0-of-1.h5"}) {
        const std::string cmd = "h5dump -H '" + (d / f).string() + "' >/dev/null 2>&1";
        CHECK_MESSAGE(std::system(cmd.c_str()) == 0, "h5dump cannot read " << (d / f));
      }
    } else {
      MESSAGE("h5dump not installed: HDF5 readability not checked");
    }
  }
  CHECK(ftune::find_latest_checkpoint(root + "/out").value() == root + "/out/checkpoint-7");
  CHECK(ftune::read_trainer_state_h5(root + "/out/checkpoint-7/trainer_state.h5").step == 7);
}

TEST_CASE("resume is bit-identical to the uninterrupted run") {
  const std::string root = setup("ckpt_resume");
  ftune::TrainConfig c = config(root, root + "/full");
  c.save_steps = 3;
  const ftune::TrainResult full = ftune::run_training(c);

  ftune::TrainConfig r = config(root, root + "/resumed");
  r.resume_from_checkpoint = root + "/full/checkpoint-3";
  const ftune::TrainResult res = ftune::run_training(r);
  REQUIRE(res.losses.size() == full.losses.size());
  for (size_t i = 0; i < full.losses.size(); ++i) CHECK(res.losses[i] == full.losses[i]);
  CHECK(std::memcmp(res.adapter.params.data(), full.adapter.params.data(),
                    full.adapter.params.size() * sizeof(float)) == 0);

  SUBCASE("\"latest\" in the run's own output_dir") {
    ftune::TrainConfig l = config(root, root + "/full");
    l.max_steps = 9;
    l.resume_from_checkpoint = "latest";
    const ftune::TrainResult more = ftune::run_training(l);
    CHECK(more.losses.size() == 9);
    CHECK(more.losses[6] == full.losses[6]);
  }
}

TEST_CASE("incompatible checkpoints are refused with the reason") {
  const std::string root = setup("ckpt_refuse");
  ftune::TrainConfig c = config(root, root + "/out");
  c.save_steps = 3;
  ftune::run_training(c);
  const std::string ckpt = root + "/out/checkpoint-3";

  SUBCASE("another LoRA rank") {
    ftune::TrainConfig r = config(root, root + "/r2");
    r.lora_rank = 8;
    r.resume_from_checkpoint = ckpt;
    CHECK_THROWS_WITH_AS(ftune::run_training(r), doctest::Contains("r 4 (checkpoint) vs 8"),
                         std::runtime_error);
  }
  SUBCASE("another model") {
    tiny_model(root + "/other_model", 2);
    ftune::TrainConfig r = config(root, root + "/r3");
    r.model_name_or_path = root + "/other_model";
    r.resume_from_checkpoint = ckpt;
    CHECK_THROWS_WITH_AS(ftune::run_training(r), doctest::Contains("model"), std::runtime_error);
  }
  SUBCASE("no checkpoint for \"latest\"") {
    ftune::TrainConfig r = config(root, root + "/empty");
    r.resume_from_checkpoint = "latest";
    CHECK_THROWS_WITH_AS(ftune::run_training(r), doctest::Contains("no complete checkpoint"),
                         std::runtime_error);
  }
  SUBCASE("a half-written checkpoint is ignored") {
    fs::create_directories(root + "/out/checkpoint-99.tmp");
    fs::create_directories(root + "/out/checkpoint-98");  // renamed but no COMPLETE
    CHECK(ftune::find_latest_checkpoint(root + "/out").value() == root + "/out/checkpoint-7");
  }
}
