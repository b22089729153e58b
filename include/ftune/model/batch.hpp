#pragma once
// model module: one micro-batch as the model sees it. Sequences are packed back to back
// (varlen, like flash-attention's cu_seqlens) instead of right-padded: with causal attention
// and no labels on padding, right padding changes nothing for the real tokens, so dropping
// the pads gives the same losses and gradients with less work.
#include <cstdint>
#include <vector>

namespace ftune {

struct Example {
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;  // same length; -100 = no loss on this position
};

struct MicroBatch {
  std::vector<int32_t> tokens;     // [N] all sequences concatenated
  std::vector<int32_t> positions;  // [N] restart at 0 for every sequence
  std::vector<int32_t> targets;    // [N] label of the NEXT position (HF's shift), -100 = none
  std::vector<int64_t> seq_start;  // [num_seqs + 1] offsets into tokens
  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
  int64_t num_seqs() const { return static_cast<int64_t>(seq_start.size()) - 1; }
  int64_t num_targets() const;     // positions that carry a loss
  int32_t max_position() const;
};

// Packs examples into a micro-batch, shifting labels by one as HF's causal-LM loss does.
MicroBatch make_micro_batch(const std::vector<const Example*>& examples);

}  // namespace ftune
