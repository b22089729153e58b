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
                                   int64_t seed)
    : data_(data), mbs_(mbs), shuffle_(shuffle), seed_(seed) {
  if (data_.empty()) throw std::runtime_error("the training set is empty");
  order_ = epoch_order(static_cast<int64_t>(data_.size()), shuffle_, seed_, 0);
}

int64_t MicroBatchStream::micro_per_epoch() const {
  return (static_cast<int64_t>(data_.size()) + mbs_ - 1) / mbs_;
}

MicroBatch MicroBatchStream::next() {
  const int64_t n = static_cast<int64_t>(data_.size());
  if (cur_.pos >= n) {
    ++cur_.epoch;
    cur_.pos = 0;
    order_ = epoch_order(n, shuffle_, seed_, cur_.epoch);
  }
  std::vector<const Example*> ex;
  for (int i = 0; i < mbs_ && cur_.pos < n; ++i) ex.push_back(&data_[order_[cur_.pos++]]);
  ++cur_.consumed;
  return make_micro_batch(ex);
}

void MicroBatchStream::restore(const StreamCursor& c) {
  if (c.pos < 0 || c.pos > static_cast<int64_t>(data_.size()) || c.epoch < 0)
    throw std::runtime_error("checkpoint data cursor does not fit this dataset");
  cur_ = c;
  order_ = epoch_order(static_cast<int64_t>(data_.size()), shuffle_, seed_, cur_.epoch);
}

}  // namespace ftune
