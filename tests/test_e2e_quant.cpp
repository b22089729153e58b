// load_in_8bit / load_in_4bit on the CPU reference backend: training runs on the int8 round trip of the
// projection weights (not silently on the fp32 ones: the losses differ), and the loss curve
// stays within the 2% of the fp32-weight run on a PEFT reference fixture.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>

#include "ftune/train/trainer.hpp"
#include "reference_run.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;

TEST_CASE("load_in_8bit trains on int8 projections within 2% of fp32 weights") {
  const fs::path dir = fs::path(ftune::test::source_dir()) / "tests/fixtures/llama_rslora";
  ftune::TrainConfig plain = ftune::test::reference_run_config(dir, ftune::test::scratch("e2e_q8_plain"));
  ftune::TrainConfig q8 = plain;
  q8.output_dir = ftune::test::scratch("e2e_q8");
  q8.load_in_8bit = true;
  const ftune::TrainResult a = ftune::run_training(plain);
  const ftune::TrainResult b = ftune::run_training(q8);
  REQUIRE(a.losses.size() == b.losses.size());
  double gap = 0;
  for (size_t i = 0; i < a.losses.size(); ++i)
    gap = std::max(gap, std::fabs(b.losses[i] - a.losses[i]) / a.losses[i]);
  MESSAGE("int8 vs fp32 projection weights, worst relative loss gap " << gap);
  CHECK(gap > 0);      // the weights really changed
  CHECK(gap < 2e-2);
  CHECK(b.losses.back() < b.losses.front());
}

TEST_CASE("load_in_4bit (NF4) trains on 4-bit projections") {
  const fs::path dir = fs::path(ftune::test::source_dir()) / "tests/fixtures/llama_rslora";
  ftune::TrainConfig plain = ftune::test::reference_run_config(dir, ftune::test::scratch("e2e_q4_plain"));
  ftune::TrainConfig q4 = plain;
  q4.output_dir = ftune::test::scratch("e2e_q4");
  q4.load_in_4bit = true;
  const ftune::TrainResult a = ftune::run_training(plain);
  const ftune::TrainResult b = ftune::run_training(q4);
  REQUIRE(a.losses.size() == b.losses.size());
  double gap = 0;
  for (size_t i = 0; i < a.losses.size(); ++i)
    gap = std::max(gap, std::fabs(b.losses[i] - a.losses[i]) / a.losses[i]);
  MESSAGE("NF4 vs fp32 projection weights, worst relative loss gap " << gap);
  CHECK(gap > 0);
  CHECK(gap < 5e-2);  // 4 bits move a random-init model's losses more than 8 do
  CHECK(b.losses.back() < b.losses.front());
}
