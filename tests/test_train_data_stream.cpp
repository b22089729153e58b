// The micro-batch stream: every example once per epoch, deterministic shuffles, packing
// within the length budget, and an exactly restorable cursor.
#include <doctest/doctest.h>

#include <algorithm>
#include <map>

#include "ftune/train/data_stream.hpp"

namespace {

std::vector<ftune::Example> make_data(int n) {
  std::vector<ftune::Example> d(n);
  for (int i = 0; i < n; ++i) {
    // The first token is the example's index, so batches can be traced back.
    d[i].input_ids.assign(3 + (i * 5) % 11, 7);
    d[i].input_ids[0] = i;
    d[i].labels = d[i].input_ids;
  }
  return d;
}

// Example indices of a micro-batch (first token of each packed sequence).
std::vector<int> ids_of(const ftune::MicroBatch& mb) {
  std::vector<int> out;
  for (int64_t s = 0; s < mb.num_seqs(); ++s) out.push_back(mb.tokens[mb.seq_start[s]]);
  return out;
}

}  // namespace

TEST_CASE("each epoch visits every example once; shuffles are seeded and differ per epoch") {
  const auto data = make_data(23);
  ftune::MicroBatchStream s(data, 4, true, 11);
  CHECK(s.micro_per_epoch() == 6);
  std::vector<std::vector<int>> epochs(2);
  for (int e = 0; e < 2; ++e)
    for (int m = 0; m < 6; ++m)
      for (int id : ids_of(s.next())) epochs[e].push_back(id);
  for (auto ep : epochs) {
    std::sort(ep.begin(), ep.end());
    for (int i = 0; i < 23; ++i) CHECK(ep[i] == i);
  }
  CHECK(epochs[0] != epochs[1]);
  ftune::MicroBatchStream again(data, 4, true, 11);
  std::vector<int> first;
  for (int m = 0; m < 6; ++m)
    for (int id : ids_of(again.next())) first.push_back(id);
  CHECK(first == epochs[0]);
  ftune::MicroBatchStream plain(data, 4, false, 11);
  CHECK(ids_of(plain.next()) == std::vector<int>{0, 1, 2, 3});
}

TEST_CASE("packing fills sequences up to the length budget without splitting examples") {
  const auto data = make_data(40);
  const int64_t budget = 24;
  ftune::MicroBatchStream s(data, 2, true, 3, budget);
  std::map<int, int> seen;
  int64_t micro = s.micro_per_epoch();
  CHECK(micro < 20);  // fewer micro-batches than without packing (40 / 2)
  for (int64_t m = 0; m < micro; ++m) {
    const ftune::MicroBatch mb = s.next();
    for (int id : ids_of(mb)) ++seen[id];
    // Positions restart for every example; a pack never exceeds the budget.
    int64_t pack_tokens = 0;
    for (int64_t q = 0; q < mb.num_seqs(); ++q) {
      CHECK(mb.positions[mb.seq_start[q]] == 0);
      pack_tokens += mb.seq_start[q + 1] - mb.seq_start[q];
    }
    CHECK(pack_tokens <= 2 * budget);
  }
  CHECK(seen.size() == 40);
  for (auto [id, n] : seen) CHECK(n == 1);
}

TEST_CASE("a restored cursor continues the same stream") {
  const auto data = make_data(17);
  for (int64_t pack : {0, 20}) {
    CAPTURE(pack);
    ftune::MicroBatchStream a(data, 3, true, 5, pack);
    for (int i = 0; i < 9; ++i) a.next();
    const ftune::StreamCursor c = a.cursor();
    ftune::MicroBatchStream b(data, 3, true, 5, pack);
    b.restore(c);
    for (int i = 0; i < 12; ++i) CHECK(ids_of(a.next()) == ids_of(b.next()));
  }
}
