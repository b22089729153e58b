// Training from a random-on-load model directory (`init-model --weights on_load`: weights
// made when loaded, no safetensors) is training from the same weights stored: losses and
// adapters are bit-identical on the CPU backend, with bf16 and quantised weights; a
// checkpoint of one resumes on the other (same model fingerprint), and a quantised run's
// checkpoint is refused by an unquantised resume.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>

#include "ftune/io/hf_model.hpp"
#include "ftune/train/trainer.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;

namespace {

std::string setup(const std::string& name) {
  const std::string root = ftune::test::scratch(name);
  const ftune::ModelConfig c = ftune::test::qwen2_tiny_config();
  ftune::save_random_hf_model(root + "/stored", c, 8, 0.05);
  ftune::save_random_on_load_model(root + "/on_load", c, 8, 0.05);
  fs::create_directories(root + "/data");
  std::ofstream f(root + "/data/train.jsonl");
  for (int i = 0; i < 16; ++i) {
    f << "{\"input_ids\": [";
    for (int t = 0; t < 5 + i % 6; ++t) f << (t ? "," : "") << (i * 7 + t * 13) % 64;
    f << "]}\n";
  }
  return root;
}

ftune::TrainConfig config(const std::string& root, const std::string& model,
                          const std::string& out) {
  ftune::TrainConfig c;
  c.model_name_or_path = root + "/" + model;
  c.train_file_dir = {root + "/data"};
  c.output_dir = root + "/" + out;
  c.overwrite_output_dir = true;
  c.device = "cpu";
  c.learning_rate = 1e-2;
  c.lr_scheduler_type = "constant";  // a 2-step run then resumed follows the 4-step one
  c.lora_rank = 4;
  c.lora_alpha = 8;
  c.lora_dropout = 0.1;
  c.per_device_train_batch_size = 2;
  c.max_steps = 4;
  c.shuffle = false;
  c.validation_split_percentage = 0;
  c.save_steps = 2;
  return c;
}

}  // namespace

TEST_CASE("LoRA on a random-on-load model equals LoRA on the same model stored") {
  const std::string root = setup("ws_train");
  for (int bits : {0, 8, 4}) {
    CAPTURE(bits);
    ftune::TrainConfig a = config(root, "stored", "out_stored"), b = config(root, "on_load", "out_on_load");
    a.load_in_8bit = b.load_in_8bit = bits == 8;
    a.load_in_4bit = b.load_in_4bit = bits == 4;
    const ftune::TrainResult ra = ftune::run_training(a), rb = ftune::run_training(b);
    REQUIRE(ra.losses.size() == 4);
    CHECK(ra.losses == rb.losses);
    CHECK(ra.adapter.params == rb.adapter.params);
    CHECK(ra.losses.back() < ra.losses.front());
  }
}

TEST_CASE("checkpoints: the fingerprint is the weights', whatever their source; quantised differs") {
  const std::string root = setup("ws_resume");
  ftune::TrainConfig full = config(root, "stored", "full");
  const ftune::TrainResult want = ftune::run_training(full);
  // Train 2 steps on the random-on-load copy, resume the stored one from its checkpoint.
  ftune::TrainConfig first = config(root, "on_load", "split");
  first.max_steps = 2;
  (void)ftune::run_training(first);
  ftune::TrainConfig second = config(root, "stored", "split");
  second.resume_from_checkpoint = "latest";
  const ftune::TrainResult got = ftune::run_training(second);
  CHECK(got.adapter.params == want.adapter.params);

  ftune::TrainConfig quant = config(root, "stored", "quant");
  quant.max_steps = 2;
  quant.load_in_8bit = true;
  (void)ftune::run_training(quant);
  ftune::TrainConfig resume = config(root, "stored", "quant");
  resume.resume_from_checkpoint = "latest";
  const std::string e = ftune::test::error_of([&] { (void)ftune::run_training(resume); });
  CHECK(e.find("different model") != std::string::npos);
  CHECK(e.find("int8") != std::string::npos);
}
