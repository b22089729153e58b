// load_in_8bit / load_in_4bit on the GPU: the dequantisation kernels equal the CPU's q * scale rounded once
// to bf16 (bit for bit, on ragged and 16-byte shapes), and training with int8 projections on
// the CUDA backend follows the CPU reference trained on the same int8 round trip within the
// bf16 tolerances of test_cuda_train.cpp, holding less device memory than bf16 weights.
// Skips without a GPU.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <vector>

#include "cuda_test_util.hpp"
#include "ftune/kernels/cpu_quant.hpp"
#include "ftune/kernels/cuda_quant.hpp"
#include "ftune/train/trainer.hpp"
#include "reference_run.hpp"
#include "test_util.hpp"

using namespace ftune::test::cuda;
namespace fs = std::filesystem;

TEST_CASE("cuda: int8 row dequantisation is bit-identical to the CPU's, rounded to bf16") {
  REQUIRE_GPU();
  std::mt19937 rng(9);
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {3, 13}, {64, 256}, {513, 1032}}) {
    std::normal_distribution<float> nd(0.f, 0.02f);
    std::vector<float> w(rows * cols), ref(rows * cols), scale(rows);
    for (auto& x : w) x = nd(rng);
    std::vector<int8_t> q(w.size());
    ftune::cpu::quantize_int8_rows(q.data(), scale.data(), w.data(), rows, cols);
    ftune::cpu::dequantize_int8_rows(ref.data(), q.data(), scale.data(), rows, cols);
    auto dq = cu::to_device(q);
    auto ds = cu::to_device(scale);
    cu::DeviceBuffer out(rows * cols * 2);
    cu::dequantize_int8_rows(out.as<cu::bf16>(), dq.as<int8_t>(), ds.as<float>(), rows, cols, nullptr);
    CHECK(mismatches(down(out, rows * cols), rounded(ref)) == 0);
  }
}

TEST_CASE("cuda: NF4 dequantisation is bit-identical to the CPU's, rounded to bf16") {
  REQUIRE_GPU();
  std::mt19937 rng(10);
  for (int64_t n : {int64_t(1), int64_t(13), int64_t(64 * 256 + 8), int64_t(1 << 20)}) {
    std::normal_distribution<float> nd(0.f, 0.02f);
    std::vector<float> w(n), ref(n);
    for (auto& x : w) x = nd(rng);
    std::vector<uint8_t> packed((n + 1) / 2), absq(ftune::cpu::nf4_blocks(n));
    std::vector<float> scale(ftune::cpu::nf4_groups(n));
    ftune::cpu::quantize_nf4(packed.data(), absq.data(), scale.data(), w.data(), n);
    ftune::cpu::dequantize_nf4(ref.data(), packed.data(), absq.data(), scale.data(), n);
    auto dp = cu::to_device(packed);
    auto da = cu::to_device(absq);
    auto ds = cu::to_device(scale);
    cu::DeviceBuffer out(n * 2);
    cu::dequantize_nf4(out.as<cu::bf16>(), dp.as<uint8_t>(), da.as<uint8_t>(), ds.as<float>(), n, nullptr);
    CHECK(mismatches(down(out, n), rounded(ref)) == 0);
  }
}

TEST_CASE("cuda: load_in_4bit training follows the CPU reference on the same NF4 weights") {
  REQUIRE_GPU();
  const fs::path dir = fs::path(ftune::test::source_dir()) / "tests/fixtures/qwen2_tiny";
  ftune::TrainConfig cpu_cfg = ftune::test::reference_run_config(dir, ftune::test::scratch("q4_cpu"));
  cpu_cfg.load_in_4bit = true;
  ftune::TrainConfig gpu_cfg = cpu_cfg;
  gpu_cfg.output_dir = ftune::test::scratch("q4_gpu");
  gpu_cfg.device = "cuda";
  const ftune::TrainResult c = ftune::run_training(cpu_cfg);
  const ftune::TrainResult g = ftune::run_training(gpu_cfg);
  REQUIRE(c.losses.size() == g.losses.size());
  double worst = 0;
  for (size_t i = 0; i < c.losses.size(); ++i)
    worst = std::max(worst, std::fabs(g.losses[i] - c.losses[i]) / c.losses[i]);
  MESSAGE("NF4 on " << cu::device_description(0) << ": CUDA vs CPU losses " << worst);
  CHECK(worst < 1e-2);
}

TEST_CASE("cuda: load_in_8bit training follows the CPU reference on the same int8 weights") {
  REQUIRE_GPU();
  const fs::path dir = fs::path(ftune::test::source_dir()) / "tests/fixtures/qwen2_tiny";
  ftune::TrainConfig cpu_cfg = ftune::test::reference_run_config(dir, ftune::test::scratch("q8_cpu"));
  cpu_cfg.load_in_8bit = true;
  ftune::TrainConfig gpu_cfg = cpu_cfg;
  gpu_cfg.output_dir = ftune::test::scratch("q8_gpu");
  gpu_cfg.device = "cuda";
  const ftune::TrainResult c = ftune::run_training(cpu_cfg);
  const ftune::TrainResult g = ftune::run_training(gpu_cfg);
  ftune::TrainConfig plain = cpu_cfg;
  plain.load_in_8bit = false;
  plain.output_dir = ftune::test::scratch("q8_plain");
  const ftune::TrainResult p = ftune::run_training(plain);
  REQUIRE(c.losses.size() == g.losses.size());
  double worst = 0, gap = 0;
  for (size_t i = 0; i < c.losses.size(); ++i) {
    worst = std::max(worst, std::fabs(g.losses[i] - c.losses[i]) / c.losses[i]);
    gap = std::max(gap, std::fabs(c.losses[i] - p.losses[i]) / p.losses[i]);
  }
  MESSAGE("int8 on " << cu::device_description(0) << ": CUDA vs CPU losses " << worst
                     << "; int8 vs fp32 weights (CPU) " << gap);
  CHECK(worst < 1e-2);
  CHECK(gap < 2e-2);  // the 8-bit loss-gap target
}
