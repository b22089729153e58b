#pragma once
// model module: what load_in_8bit does to a model. The decoder's projection weights (q, k, v,
// o, gate, up, down) become int8 per output channel (kernels/cpu_quant.hpp); embeddings,
// lm_head, norms and biases stay as they are (bitsandbytes' choice too). The CPU reference
// backend trains on the dequantised values; the CUDA backend keeps the int8 matrices on the
// device and dequantises one layer at a time into bf16 (transformer_cuda.hpp).
#include "ftune/model/weights.hpp"

namespace ftune {

// Replaces every projection weight by its int8 round trip q * scale, in place. Idempotent.
void apply_int8_roundtrip(BaseWeights& w);

}  // namespace ftune
