#pragma once
// model module: folding a LoRA adapter into the base weights (PEFT's merge_and_unload):
// W' = W + scale * B A for every slot, scale = alpha / r (alpha / sqrt(r) with rslora).
// The merged model computes what base + adapter computes (up to fp32 rounding), without the
// adapter: `ftune export --merge` writes it, `ftune generate` runs it.
#include "ftune/model/lora.hpp"
#include "ftune/model/weights.hpp"

namespace ftune {

// Adds scale * B A to every projection the adapter targets, in place. Throws when the
// adapter was built for a model of other sizes, or the weights do not own their tensors.
void merge_lora(BaseWeights& w, const LoraAdapter& a);

}  // namespace ftune
