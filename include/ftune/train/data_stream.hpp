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
// A micro-batch holds `sequences_per_micro` sequences. Without packing a sequence is one
// example; with packing (pack_length > 0) it is a run of consecutive examples (in epoch
// order) whose lengths add up to at most pack_length. Packed examples stay separate
// sequences for the model: positions restart and attention never crosses them.
class MicroBatchStream {
 public:
  MicroBatchStream(const std::vector<Example>& data, int sequences_per_micro, bool shuffle,
                   int64_t seed, int64_t pack_length = 0);
  int64_t micro_per_epoch() const;
  double epoch() const { return static_cast<double>(cur_.consumed) / micro_per_epoch(); }
  MicroBatch next();
  StreamCursor cursor() const { return cur_; }
  void restore(const StreamCursor& c);

 private:
  void start_epoch(int64_t epoch);
  const std::vector<Example>& data_;
  int mbs_;
  bool shuffle_;
  int64_t seed_, pack_length_;
  StreamCursor cur_;                       // pos counts sequences (packs) of the epoch
  std::vector<std::vector<int64_t>> seqs_; // this epoch's sequences: example indices
};

}  // namespace ftune
