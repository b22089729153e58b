#include "ftune/model/batch.hpp"

#include <algorithm>
#include <stdexcept>

namespace ftune {

int64_t MicroBatch::num_targets() const {
  return std::count_if(targets.begin(), targets.end(), [](int32_t t) { return t >= 0; });
}

int32_t MicroBatch::max_position() const {
  return positions.empty() ? 0 : *std::max_element(positions.begin(), positions.end());
}

MicroBatch make_micro_batch(const std::vector<const Example*>& examples) {
  MicroBatch mb;
  mb.seq_start.push_back(0);
  for (const Example* e : examples) {
    const size_t T = e->input_ids.size();
    if (e->labels.size() != T) throw std::runtime_error("example labels/input_ids length differ");
    for (size_t t = 0; t < T; ++t) {
      mb.tokens.push_back(e->input_ids[t]);
      mb.positions.push_back(static_cast<int32_t>(t));
      mb.targets.push_back(t + 1 < T ? e->labels[t + 1] : -100);
    }
    mb.seq_start.push_back(static_cast<int64_t>(mb.tokens.size()));
  }
  return mb;
}

}  // namespace ftune
