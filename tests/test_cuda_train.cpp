// The CUDA backend through the whole trainer: the PEFT reference runs (our fixtures and, when
// present, ../shared's llama_tiny) reproduced on the GPU within bf16 tolerances. Skips
// without a GPU.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ftune/io/safetensors.hpp"
#include "ftune/kernels/cuda_device.hpp"
#include "ftune/train/trainer.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;

namespace {

nlohmann::json read_json(const fs::path& p) {
  std::ifstream f(p);
  return nlohmann::json::parse(f);
}

// bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 2e-3 per value); losses average
// thousands of such terms, so 1e-2 leaves margin. Adapter tensors move by ~lr per Adam step and
// Adam's normalisation amplifies noise in small gradients, so the adapter is held to 5e-2 of
// each tensor's largest entry.
void check_on_gpu(const fs::path& dir, const std::string& name) {
  const auto run = read_json(dir / "run.json");
  ftune::TrainConfig c;
  c.model_name_or_path = (dir / "model").string();
  c.train_file_dir = {(dir / "data").string()};
  c.init_adapter = (dir / "init_adapter").string();
  c.output_dir = ftune::test::scratch("cuda_train_" + name);
  c.overwrite_output_dir = true;
  c.validation_split_percentage = 0;
  c.device = "cuda";
  c.lora_rank = run["r"];
  c.lora_alpha = run["alpha"];
  c.lora_dropout = run["lora_dropout"];
  c.use_rslora = run.value("use_rslora", false);
  c.target_modules = run["target_modules"].get<std::vector<std::string>>();
  c.per_device_train_batch_size = run["mbs"];
  c.gradient_accumulation_steps = run["gas"];
  c.max_steps = run["steps"];
  c.learning_rate = run["lr"];
  c.weight_decay = run["wd"];
  c.max_grad_norm = run["clip"];
  c.shuffle = run["shuffle"];
  c.lr_scheduler_type = run["lr_scheduler_type"];
  c.warmup_steps = run["warmup_steps"];
  const ftune::TrainResult r = ftune::run_training(c);
  const auto want = read_json(dir / "expected/losses.json").get<std::vector<double>>();
  REQUIRE(r.losses.size() == want.size());
  double worst_loss = 0;
  for (size_t i = 0; i < want.size(); ++i)
    worst_loss = std::max(worst_loss, std::fabs(r.losses[i] - want[i]) / want[i]);
  ftune::SafetensorsFile ref((dir / "expected/peft/adapter_model.safetensors").string());
  ftune::SafetensorsFile got(c.output_dir + "/adapter/adapter_model.safetensors");
  double worst = 0;
  for (const std::string& key : ref.names()) {
    const auto& info = ref.info(key);
    std::vector<float> a(info.numel()), b(info.numel());
    ref.read_f32(key, info.shape, a.data());
    got.read_f32(key, info.shape, b.data());
    double diff = 0, scale = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      diff = std::max(diff, static_cast<double>(std::fabs(a[i] - b[i])));
      scale = std::max(scale, static_cast<double>(std::fabs(a[i])));
    }
    worst = std::max(worst, diff / scale);
  }
  MESSAGE(name << " on " << ftune::cuda::device_description(0) << ": worst loss rel error "
               << worst_loss << ", worst adapter tensor rel error " << worst);
  CHECK(worst_loss < 1e-2);
  CHECK(worst < 5e-2);
}

}  // namespace

TEST_CASE("PEFT reference runs reproduced by the CUDA backend") {
  if (ftune::cuda::cuda_device_count() == 0) {
    MESSAGE("skipped: no GPU");
    return;
  }
  const fs::path fixtures = fs::path(ftune::test::source_dir()) / "tests/fixtures";
  for (const char* name : {"qwen2_tiny", "llama_rslora", "qwen3_tiny"}) check_on_gpu(fixtures / name, name);
  const fs::path shared = fs::path(ftune::test::shared_dir()) / "data/reference/llama_tiny";
  if (fs::exists(shared)) check_on_gpu(shared, "llama_tiny");
  else MESSAGE("../shared absent: llama_tiny not checked");
}
