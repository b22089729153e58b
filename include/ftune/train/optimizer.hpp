#pragma once
// train module: AdamW with decoupled weight decay (torch.optim.AdamW semantics) and
// global gradient-norm clipping (torch.nn.utils.clip_grad_norm_), over flat fp32 spans.
#include <cstdint>
#include <span>
#include <vector>

namespace ftune {

struct AdamWHyper {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};

struct AdamWState {
  int64_t step = 0;        // optimizer steps taken
  std::vector<float> m;    // first moment
  std::vector<float> v;    // second moment
  void resize(size_t n) { m.assign(n, 0.0f); v.assign(n, 0.0f); }
};

// One AdamW update of params given grads at learning rate lr (state.step is advanced).
// decays (empty: all): weight decay applies to params[i] only where decays[i] != 0 (HF
// exempts biases and norm weights in full fine-tuning).
void adamw_step(std::span<float> params, std::span<const float> grads, AdamWState& state,
                double lr, const AdamWHyper& h, std::span<const uint8_t> decays = {});
// The same update for elements of a vector whose moments are m, v (same length as params),
// at optimizer step `step` (1-based; the caller counts): a step may be applied in pieces.
// grad_scale multiplies each gradient first (in fp32: the clipping coefficient, the same
// bits as scale_in_place before the update); copy_to (empty, or params' length) also
// receives the updated values (the offload runner's upload staging), in the same pass.
void adamw_update(std::span<float> params, std::span<const float> grads, std::span<float> m,
                  std::span<float> v, int64_t step, double lr, const AdamWHyper& h,
                  std::span<const uint8_t> decays = {}, float grad_scale = 1.0f,
                  std::span<float> copy_to = {});

// Sum of squares in double, in fixed blocks of kSumOfSquaresBlock elements: each block's
// squares added in order from 0.0 (no fused multiply-add), then the block sums in order.
// The same bits for any thread count (the blocks run in parallel), and for the GPU's
// cuda::sum_of_squares_blocks followed by sum_in_order.
inline constexpr size_t kSumOfSquaresBlock = size_t{1} << 16;
double sum_of_squares(std::span<const float> x);
double sum_in_order(std::span<const double> block_sums);
// L2 norm of all gradients (computed in double, as sum_of_squares).
double global_grad_norm(std::span<const float> grads);
// x *= coef, in parallel.
void scale_in_place(std::span<float> x, float coef);

// clip_grad_norm_'s coefficient, max_norm / (norm + 1e-6), as the fp32 factor applied to
// every gradient; 1 when it would not shrink them or max_norm <= 0 (no clipping).
float clip_coefficient(double norm, double max_norm);
// Scales grads so their norm is at most max_norm, as clip_grad_norm_ does
// (coef = max_norm / (norm + 1e-6), applied when < 1). Returns the pre-clip norm.
double clip_grad_norm(std::span<float> grads, double max_norm);

}  // namespace ftune
