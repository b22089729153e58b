// Exactness against PEFT: reproduce finished PEFT runs (shared llama_tiny and our own
// fixtures under tests/fixtures) step by step: every loss and every adapter tensor within
// 1e-4 relative error. Each fixture's run.json holds the run's hyper-parameters.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ftune/config/train_config.hpp"
#include "ftune/io/safetensors.hpp"
#include "ftune/train/trainer.hpp"
#include "reference_run.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json read_json(const fs::path& p) { return ftune::test::read_json_file(p); }

ftune::TrainConfig config_from_run(const fs::path& dir, const std::string& out) {
  ftune::TrainConfig c = ftune::test::reference_run_config(dir, out);
  c.bf16 = false;  // the CPU backend is fp32 either way; say so explicitly
  return c;
}

double rel_err(double got, double want) {
  return std::fabs(got - want) / std::max(std::fabs(want), 1e-12);
}

// Runs the fixture and checks losses (and grad norms / lrs when recorded) and the adapter.
void check_fixture(const fs::path& dir, const std::string& name, bool gradient_checkpointing) {
  ftune::TrainConfig cfg = config_from_run(dir, ftune::test::scratch("ref_" + name));
  cfg.gradient_checkpointing = gradient_checkpointing;
  const ftune::TrainResult r = ftune::run_training(cfg);

  const auto want_losses = read_json(dir / "expected/losses.json").get<std::vector<double>>();
  REQUIRE(r.losses.size() == want_losses.size());
  for (size_t i = 0; i < want_losses.size(); ++i) {
    INFO(name << " step " << i + 1 << ": ftune " << r.losses[i] << " PEFT " << want_losses[i]);
    CHECK(rel_err(r.losses[i], want_losses[i]) < 1e-4);
  }
  if (fs::exists(dir / "expected/grad_norms.json")) {
    const auto want = read_json(dir / "expected/grad_norms.json").get<std::vector<double>>();
    for (size_t i = 0; i < want.size(); ++i) {
      INFO(name << " grad norm step " << i + 1 << ": " << r.grad_norms[i] << " vs " << want[i]);
      CHECK(rel_err(r.grad_norms[i], want[i]) < 1e-4);
    }
  }
  if (fs::exists(dir / "expected/lrs.json")) {
    const auto want = read_json(dir / "expected/lrs.json").get<std::vector<double>>();
    for (size_t i = 0; i < want.size(); ++i) CHECK(rel_err(r.lrs[i], want[i]) < 1e-9);
  }

  // Every tensor of the written PEFT adapter against PEFT's.
  ftune::SafetensorsFile want((dir / "expected/peft/adapter_model.safetensors").string());
  ftune::SafetensorsFile got(cfg.output_dir + "/adapter/adapter_model.safetensors");
  CHECK(got.names().size() == want.names().size());
  double worst = 0;
  std::string worst_name;
  for (const std::string& key : want.names()) {
    REQUIRE_MESSAGE(got.has(key), "ftune's adapter lacks " << key);
    const auto& info = want.info(key);
    std::vector<float> a(info.numel()), b(info.numel());
    want.read_f32(key, info.shape, a.data());
    got.read_f32(key, info.shape, b.data());
    // Relative error of the tensor (max abs diff over max abs value): element-wise
    // relative error is meaningless for entries that are ~0.
    double diff = 0, scale = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      diff = std::max(diff, static_cast<double>(std::fabs(a[i] - b[i])));
      scale = std::max(scale, static_cast<double>(std::fabs(a[i])));
    }
    const double e = diff / std::max(scale, 1e-12);
    if (e > worst) { worst = e; worst_name = key; }
  }
  MESSAGE(name << ": worst adapter tensor relative error " << worst << " (" << worst_name << ")");
  CHECK(worst < 1e-4);
}

}  // namespace

TEST_CASE("reproduces the shared PEFT reference run llama_tiny") {
  if (!ftune::test::have_shared()) {
    MESSAGE("skipped: ../shared is absent");
    return;
  }
  const fs::path dir = fs::path(ftune::test::shared_dir()) / "data/reference/llama_tiny";
  check_fixture(dir, "llama_tiny", false);
}

TEST_CASE("gradient checkpointing gives the same run") {
  if (!ftune::test::have_shared()) {
    MESSAGE("skipped: ../shared is absent");
    return;
  }
  const fs::path dir = fs::path(ftune::test::shared_dir()) / "data/reference/llama_tiny";
  check_fixture(dir, "llama_tiny_ckpt", true);
}

TEST_CASE("reproduces the committed PEFT fixtures (tests/fixtures)") {
  const fs::path root = fs::path(ftune::test::source_dir()) / "tests/fixtures";
  int found = 0;
  for (const auto& e : fs::directory_iterator(root)) {
    if (!fs::exists(e.path() / "run.json")) continue;
    ++found;
    SUBCASE(e.path().filename().string().c_str()) {
      check_fixture(e.path(), e.path().filename().string(), false);
    }
  }
  CHECK_MESSAGE(found >= 2, "expected at least two committed fixtures in " << root);
}
