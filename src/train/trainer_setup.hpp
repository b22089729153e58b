#pragma once
// train module, private to src/train: what run_training (trainer.cpp) does before its loop
// and around it, in the order it does it. Every function here that touches files or other
// ranks is collective: it runs on every rank, and an error on one is raised on all
// (on_all_ranks), so no rank waits in a collective for one that already failed.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ftune/config/train_config.hpp"
#include "ftune/data/dataset.hpp"
#include "ftune/dist/communicator.hpp"
#include "ftune/model/backend.hpp"
#include "ftune/model/lora.hpp"
#include "ftune/model/weight_source.hpp"
#include "ftune/train/checkpoint.hpp"
#include "ftune/train/data_stream.hpp"
#include "ftune/train/step_runner.hpp"
#include "ftune/train/trainer.hpp"

namespace ftune::train_detail {

// Runs fn on every rank; if it throws anywhere, every rank throws the first error (with the
// rank named), so no rank is left waiting in a collective for one that already failed.
template <typename F>
void on_all_ranks(Communicator& comm, F&& fn) {
  std::string err;
  try {
    fn();
  } catch (const std::exception& e) {
    err = e.what();
    if (err.empty()) err = "unknown error";
  }
  if (comm.size() == 1) {
    if (!err.empty()) throw CollectiveError(err);
    return;
  }
  const std::vector<std::string> errs = comm.all_gather_strings(err);
  for (size_t r = 0; r < errs.size(); ++r)
    if (!errs[r].empty()) throw CollectiveError("rank " + std::to_string(r) + ": " + errs[r]);
}

struct EvalSet {
  std::string name;
  std::vector<Example> examples;
};

struct Run {
  const TrainConfig& cfg;
  Communicator& comm;
  bool root;
  ModelConfig mc;
  std::unique_ptr<WeightSource> source;  // the base weights, read tensor by tensor
  BaseWeights weights;  // the same in host memory, fp32: only where the CPU computes with them
  bool on_cuda = false;
  std::vector<Example> train;
  std::vector<EvalSet> evals;
  CheckpointIdentity identity;
};

using Say = std::function<void(const std::string&)>;  // rank 0's progress messages

// The model config, its base weights (and their host copy where needed) and the adapter to
// train: a fresh PEFT-initialised one, init_adapter, or (full fine-tuning) the whole model.
// Refuses an output_dir that already holds a product, unless told to overwrite or resume.
void load_model_and_adapter(Run& run, LoraAdapter& adapter);
// Train and validation sets on every rank. With a cache_dir, rank 0 tokenizes and writes the
// cache while the others wait, then they read it.
void load_data(Run& run, const Say& say);
// run.identity (what checkpoints are checked against), then the check that every rank runs
// the same ftune, configuration, model and data.
void identify_run(Run& run, const LoraAdapter& adapter);

// The backend (none for ZeRO-3 full fine-tuning on the CPU) and the step runner that keeps
// the parameters and optimizer state where the backend computes.
struct Runner {
  std::unique_ptr<TrainBackend> backend;
  std::unique_ptr<StepRunner> opt;
};
Runner make_runner(Run& run, LoraAdapter& adapter);
// ZeRO-3 full fine-tuning: each rank's step runner keeps its range of the parameters, so the
// host's whole vector exists only around saves and resumes; release_full_vector drops it.
inline bool shards_parameters(const TrainConfig& cfg) {
  return !cfg.use_peft && cfg.zero_stage == 3;
}
void release_full_vector(const Run& run, LoraAdapter& adapter);

// cfg.resume_from_checkpoint ("latest" or a directory): parameters, optimizer shards
// (resharded to this world), data position, losses so far. Returns the step to continue
// from and the metrics log written so far.
struct Resumed {
  int64_t step = 0;
  std::string metrics_jsonl;
};
Resumed resume_run(Run& run, LoraAdapter& adapter, StepRunner& opt, MicroBatchStream& stream,
                   TrainResult& result, const Say& say);

// The start-of-run banner: world, model, what trains, device, data, memory placement.
std::string describe_run(const Run& run, const LoraAdapter& adapter, const Runner& runner,
                         size_t num_params, int64_t total_steps);

// Writes output_dir/checkpoint-<step> (a .tmp directory renamed when complete). Brings the
// current parameters to the host adapter first.
void save_checkpoint(Run& run, LoraAdapter& adapter, StepRunner& opt, const TrainerState& state);

}  // namespace ftune::train_detail
