#pragma once
// model module: what load_in_8bit / load_in_4bit do to a model. The decoder's projection
// weights (q, k, v, o, gate, up, down) become int8 per output channel, or NF4 with
// double-quantised block scales (kernels/cpu_quant.hpp); embeddings,
// lm_head, norms and biases stay as they are (bitsandbytes' choice too). The CPU reference
// backend trains on the dequantised values; the CUDA backend keeps the int8 matrices on the
// device and dequantises one layer at a time into bf16 (transformer_cuda.hpp).
// Both round trips are idempotent (quantising the result again gives the same codes), so
// the CUDA backend's own quantisation of the round-tripped weights reproduces them.
#include "ftune/model/weights.hpp"

namespace ftune {

// Replaces every projection weight by its int8 round trip q * scale, in place. Idempotent.
void apply_int8_roundtrip(BaseWeights& w);
// The same with the NF4 round trip (load_in_4bit).
void apply_nf4_roundtrip(BaseWeights& w);
// One layer's projections (views that may point anywhere writable): bits 8 = int8, 4 = NF4,
// 0 = nothing. For code that holds a layer at a time (ZeRO-3's shards).
void apply_quant_roundtrip(const ModelConfig& c, LayerWeights& L, int bits);

}  // namespace ftune
