#include "ftune/train/data_stream.hpp"

#include <random>
#include <stdexcept>

namespace ftune {

std::vector<int64_t> epoch_order(int64_t n, bool shuffle, int64_t seed, int64_t epoch) {
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  if (!shuffle) return order;
  std::mt19937_64 rng(static_cast<uint64_t>(seed) * 1000003ull + static_cast<uint64_t>(epoch));
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

MicroBatchStream::MicroBatchStream(const std::vector<Example>& data, int mbs, bool shuffle,
                                   int64_t seed, int64_t pack_length)
    : data_(data), mbs_(mbs), shuffle_(shuffle), seed_(seed), pack_length_(pack_length) {
  if (data_.empty()) throw std::runtime_error("the training set is empty");
  start_epoch(0);
}

void MicroBatchStream::start_epoch(int64_t epoch) {
  const std::vector<int64_t> order =
      epoch_order(static_cast<int64_t>(data_.size()), shuffle_, seed_, epoch);
  seqs_.clear();
  int64_t used = 0;
  for (int64_t i : order) {
    const int64_t len = static_cast<int64_t>(data_[i].input_ids.size());
    if (seqs_.empty() || pack_length_ <= 0 || used + len > pack_length_) {
      seqs_.push_back({});
      used = 0;
    }
    seqs_.back().push_back(i);
    used += len;
  }
}

int64_t MicroBatchStream::micro_per_epoch() const {
  // Packing is deterministic per epoch but its count can vary with the shuffle: the first
  // epoch's count stands for all (used for epoch numbers and the HF-style step count).
  return (static_cast<int64_t>(seqs_.size()) + mbs_ - 1) / mbs_;
}

MicroBatch MicroBatchStream::next() {
  if (cur_.pos >= static_cast<int64_t>(seqs_.size())) {
    ++cur_.epoch;
    cur_.pos = 0;
    start_epoch(cur_.epoch);
  }
  std::vector<const Example*> ex;
  for (int i = 0; i < mbs_ && cur_.pos < static_cast<int64_t>(seqs_.size()); ++i)
    for (int64_t e : seqs_[cur_.pos++]) ex.push_back(&data_[e]);
  ++cur_.consumed;
  return make_micro_batch(ex);
}

void MicroBatchStream::restore(const StreamCursor& c) {
  if (c.epoch < 0 || c.pos < 0) throw std::runtime_error("checkpoint data cursor is invalid");
  start_epoch(c.epoch);
  if (c.pos > static_cast<int64_t>(seqs_.size()))
    throw std::runtime_error("checkpoint data cursor does not fit this dataset");
  cur_ = c;
}

}  // namespace ftune
