#pragma once
// train module: the training loop. main() -> run_training() -> Trainer::step() ->
// CpuTransformer::forward_backward() -> kernels. Owns data order, gradient accumulation,
// clipping, the optimizer, logging, evaluation and saving.
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "ftune/config/train_config.hpp"
#include "ftune/dist/communicator.hpp"
#include "ftune/model/backend.hpp"
#include "ftune/model/lora.hpp"
#include "ftune/model/weight_source.hpp"

namespace ftune {

// An error that every rank raised together (setup, checkpoint I/O): ranks can exit cleanly
// instead of aborting the job.
struct CollectiveError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct TrainResult {
  std::vector<double> losses;      // per optimizer step (before its update)
  std::vector<double> grad_norms;  // pre-clip global norm per step
  std::vector<double> lrs;         // learning rate used per step
  std::vector<double> eval_losses; // final evaluation per validation dir (if any)
  LoraAdapter adapter;             // final adapter
  int64_t tokens = 0;              // input tokens processed
  double seconds = 0;
};

// Runs a whole training job as configured (validated first); rank 0 writes output_dir.
// Throws std::runtime_error / ConfigError with a message for the user on bad input; a
// failure during setup on any rank is raised on every rank (with the rank named).
TrainResult run_training(const TrainConfig& cfg, Communicator& comm);
// A single-rank run (tests, tools).
TrainResult run_training(const TrainConfig& cfg);

// Whether cfg.device ("auto", "cpu", "cuda") picks the CUDA backend on this host; throws
// for "cuda" where there is no GPU or no CUDA build.
bool uses_cuda_backend(const TrainConfig& cfg, const WorldInfo& world);
// The backend for cfg.device on this rank (GPU = local rank). The CUDA backend reads
// `source` tensor by tensor; the CPU backend computes with `weights` (the materialised
// source; may be null when the CUDA backend is picked, or with zero_stage = 3, where each
// rank reads its shards of the layers from `source` and gathers them over `comm`).
// Collective with zero_stage = 3 and more than one rank.
std::unique_ptr<TrainBackend> make_backend(const TrainConfig& cfg, const WeightSource& source,
                                           const BaseWeights* weights, Communicator& comm);
// Whether the run's host process needs the fp32 model materialised (the CPU backend without
// ZeRO-3, or full fine-tuning, which trains and saves it).
bool needs_host_weights(const TrainConfig& cfg, bool on_cuda);

}  // namespace ftune
