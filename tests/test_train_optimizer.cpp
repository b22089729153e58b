// The host optimizer's pieces: the blocked sum of squares (exact enough, and the same bits
// for any thread count), AdamW applied in pieces = applied whole, and ZeroAdamW's phased step
// (begin_step / update in chunks / end_step, as the CUDA offload runner drives it) = step(),
// bit for bit, with clipping active and a decay mask, for every stage on one rank.
#include <doctest/doctest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "ftune/dist/communicator.hpp"
#include "ftune/train/optimizer.hpp"
#include "ftune/train/zero_optimizer.hpp"

using namespace ftune;

namespace {

std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("sum_of_squares: accurate, and the same bits for any thread count") {
  for (size_t n : {size_t{0}, size_t{1}, size_t{65535}, size_t{65536}, size_t{300001}}) {
    CAPTURE(n);
    const std::vector<float> x = randn(n, n + 1);
    long double ref = 0;
    for (float v : x) ref += static_cast<long double>(v) * v;
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    const double one = sum_of_squares(x);
    omp_set_num_threads(3);
    const double three = sum_of_squares(x);
    omp_set_num_threads(threads);
    CHECK(std::memcmp(&one, &three, sizeof(double)) == 0);
    if (n) CHECK(std::fabs(one - static_cast<double>(ref)) / static_cast<double>(ref) < 1e-13);
    CHECK(global_grad_norm(x) == std::sqrt(one));
  }
}

TEST_CASE("AdamW applied in pieces equals AdamW applied whole") {
  const size_t n = 1000;
  AdamWHyper h;
  h.weight_decay = 0.1;
  std::vector<uint8_t> decays(n);
  for (size_t i = 0; i < n; ++i) decays[i] = i % 7 != 0;
  std::vector<float> whole = randn(n, 1), pieces = whole;
  AdamWState s;
  s.resize(n);
  std::vector<float> m(n, 0.0f), v(n, 0.0f);
  for (int64_t step = 1; step <= 3; ++step) {
    const std::vector<float> g = randn(n, 10 + step, 0.01f);
    adamw_step(whole, g, s, 1e-3, h, decays);
    for (size_t lo = 0; lo < n; lo += 333) {
      const size_t len = std::min<size_t>(333, n - lo);
      adamw_update(std::span<float>(pieces).subspan(lo, len),
                   std::span<const float>(g).subspan(lo, len), std::span<float>(m).subspan(lo, len),
                   std::span<float>(v).subspan(lo, len), step, 1e-3, h,
                   std::span<const uint8_t>(decays).subspan(lo, len));
    }
  }
  CHECK(s.step == 3);
  CHECK(same_bits(whole, pieces));
  CHECK(same_bits(s.m, m));
  CHECK(same_bits(s.v, v));
}

TEST_CASE("ZeroAdamW: begin_step + chunked update + end_step = step(), every stage") {
  auto comm = make_single_rank_communicator();
  const size_t n = 10007;
  std::vector<uint8_t> decays(n);
  for (size_t i = 0; i < n; ++i) decays[i] = i % 5 != 0;
  for (int stage : {0, 1, 2, 3}) {
    CAPTURE(stage);
    AdamWHyper h;
    h.weight_decay = 0.05;
    ZeroAdamW a(n, stage, *comm, h), b(n, stage, *comm, h);
    a.set_decay_mask(decays);
    b.set_decay_mask(decays);
    CHECK_FALSE(b.gathers());
    std::vector<float> pa = randn(n, 3), pb = pa;
    for (int step = 0; step < 3; ++step) {
      std::vector<float> ga = randn(n, 20 + step), gb = ga;  // norm ~100: clipping active
      const double na = a.step(pa, ga, 2e-3, 1.0);
      const double nb = b.begin_step(gb, 1.0);
      for (size_t lo = 0; lo < n; lo += 4096) b.update(pb, lo, std::min(n, lo + 4096), 2e-3);
      b.end_step(pb);
      CHECK(na == nb);
      CHECK(na > 1.0);
    }
    CHECK(same_bits(pa, pb));
    // A range outside the rank's shard is refused.
    std::vector<float> g = randn(n, 99);
    b.begin_step(g, 1.0);
    CHECK_THROWS(b.update(pb, 0, n + 1, 1e-3));
  }
}

TEST_CASE("ZeroAdamW: a streamed step (norm from block sums, gradient in chunks) = step()") {
  auto comm = make_single_rank_communicator();
  const size_t n = 200003;  // three sum-of-squares blocks and a ragged fourth
  std::vector<uint8_t> decays(n);
  for (size_t i = 0; i < n; ++i) decays[i] = i % 3 != 0;
  for (int stage : {0, 2}) {
    for (double max_norm : {1.0, 0.0}) {  // clipping active, and off
      CAPTURE(stage);
      CAPTURE(max_norm);
      AdamWHyper h;
      h.weight_decay = 0.05;
      ZeroAdamW a(n, stage, *comm, h), b(n, stage, *comm, h);
      a.set_decay_mask(decays);
      b.set_decay_mask(decays);
      std::vector<float> pa = randn(n, 5), pb = pa;
      for (int step = 0; step < 3; ++step) {
        std::vector<float> ga = randn(n, 40 + step), gb = ga;
        // The block sums as the GPU forms them (cuda::sum_of_squares_blocks), summed in order.
        std::vector<double> blocks;
        for (size_t lo = 0; lo < n; lo += kSumOfSquaresBlock) {
          double ss = 0;
          for (size_t i = lo; i < std::min(n, lo + kSumOfSquaresBlock); ++i)
            ss += static_cast<double>(gb[i]) * gb[i];
          blocks.push_back(ss);
        }
        CHECK(sum_in_order(blocks) == sum_of_squares(gb));
        const double na = a.step(pa, ga, 2e-3, max_norm);
        const double nb = b.begin_streamed_step(sum_in_order(blocks), max_norm);
        for (size_t lo = 0; lo < n; lo += 70000) {
          const size_t len = std::min<size_t>(70000, n - lo);
          b.update_streamed(pb, lo, std::span<float>(gb).subspan(lo, len), 2e-3);
        }
        CHECK(na == nb);
      }
      CHECK(same_bits(pa, pb));
      std::vector<float> g(10);
      CHECK_THROWS(b.update_streamed(pb, n - 5, g, 1e-3));  // past the end
    }
  }
}
