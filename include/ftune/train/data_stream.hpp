#pragma once
// train module: the order in which examples become micro-batches. Deterministic from
// (seed, epoch), with a cursor that checkpoints save and resume restores exactly.
#include <cstdint>
#include <vector>

#include "ftune/model/batch.hpp"

namespace ftune {

// Example order of an epoch: file order, or a Fisher-Yates shuffle seeded by (seed, epoch),
// written out here so the order is the same with every standard library.
std::vector<int64_t> epoch_order(int64_t n, bool shuffle, int64_t seed, int64_t epoch);

struct StreamCursor {
  int64_t epoch = 0, pos = 0, consumed = 0;
};

// An endless stream of micro-batches over the epochs; a micro-batch never spans two epochs.
class MicroBatchStream {
 public:
  MicroBatchStream(const std::vector<Example>& data, int examples_per_micro, bool shuffle,
                   int64_t seed);
  int64_t micro_per_epoch() const;
  double epoch() const { return static_cast<double>(cur_.consumed) / micro_per_epoch(); }
  MicroBatch next();
  StreamCursor cursor() const { return cur_; }
  void restore(const StreamCursor& c);

 private:
  const std::vector<Example>& data_;
  int mbs_;
  bool shuffle_;
  int64_t seed_;
  StreamCursor cur_;
  std::vector<int64_t> order_;
};

}  // namespace ftune
