#pragma once
// train module: HDF5 checkpoints. output_dir/checkpoint-STEP/ holds
//   adapter.h5              LoRA tensors by PEFT name, LoRA/model config as attributes
//   optimizer-rank-R-of-N.h5  Adam moments, fp32 master weights and step of rank R's shard
//   trainer_state.h5        step, epoch, data cursor, RNG state, metrics so far
//   adapter/                a PEFT-format copy of the adapter
//   COMPLETE                written last: a directory without it is not a checkpoint
// Saving is atomic: files go to checkpoint-STEP.tmp/, are fsynced, then the directory is
// renamed. The functions here are rank-local; the trainer sequences them with barriers.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ftune/model/lora.hpp"

namespace ftune {

// Identity of a run, checked on resume: a checkpoint from another model, LoRA config or
// incompatible format is refused with the differing field named.
struct CheckpointIdentity {
  std::string format_version = "1";  // bumped when the layout changes incompatibly
  std::string ftune_version;
  std::string model_fingerprint;     // model config + weight file identity
  std::string lora_fingerprint;      // rank, alpha, rslora, targets
  int64_t num_params = 0;            // LoRA parameter count
};

struct OptimizerShard {
  int rank = 0, world_size = 1;
  uint64_t begin = 0, end = 0;       // range of the flat parameter vector held here
  int64_t step = 0;                  // AdamW step count
  std::vector<float> m, v, master;   // each end - begin values
};

struct TrainerState {
  int64_t step = 0;                  // optimizer steps done
  int64_t data_epoch = 0, data_pos = 0, data_consumed = 0;  // micro-batch stream cursor
  uint64_t seed = 0;
  int64_t world_size = 1;
  int64_t tokens = 0;
  std::string metrics_jsonl;         // the metrics.jsonl lines written so far
  std::vector<double> losses;        // per step so far
};

std::string checkpoint_dir_name(int64_t step);  // "checkpoint-STEP"

// Writers. Each creates or overwrites its file inside `dir` (the .tmp directory).
void write_adapter_h5(const std::string& path, const LoraAdapter& a, const CheckpointIdentity& id);
void write_optimizer_shard_h5(const std::string& path, const OptimizerShard& s,
                              const CheckpointIdentity& id);
void write_trainer_state_h5(const std::string& path, const TrainerState& s);
std::string optimizer_shard_file(int rank, int world_size);  // "optimizer-rank-R-of-N.h5"

// Rank 0, after every rank wrote: fsync all files of tmp_dir, rename it to final_dir
// (replacing nothing: final_dir must not exist), write COMPLETE, fsync the parent.
void finalize_checkpoint(const std::string& tmp_dir, const std::string& final_dir);

// Newest complete checkpoint-* in output_dir, or nullopt. Incomplete ones are ignored.
std::optional<std::string> find_latest_checkpoint(const std::string& output_dir);
// Repairs what a save killed while replacing an existing step leaves (the trainer moves a
// complete checkpoint-STEP aside to checkpoint-STEP.old until the new one is complete):
// a .old whose checkpoint-STEP is complete is removed; otherwise a complete .old is renamed
// back, replacing an incomplete checkpoint-STEP. Rank 0 only, before anyone reads the dir.
void recover_checkpoints(const std::string& output_dir);
// Removes the oldest complete checkpoints beyond `keep` (keep <= 0: keep all), and any
// stale *.tmp directories left by a killed save.
void prune_checkpoints(const std::string& output_dir, int64_t keep);

// Readers. Throw with the file and field named on any mismatch with `expect`.
void read_adapter_h5(const std::string& path, LoraAdapter& a, const CheckpointIdentity& expect);
// Reassembles the shard [begin, end) for the new world size from however many shard files
// the checkpoint holds (re-sharding on a world-size change).
OptimizerShard read_optimizer_resharded(const std::string& dir, uint64_t begin, uint64_t end,
                                        const CheckpointIdentity& expect);
TrainerState read_trainer_state_h5(const std::string& path);

}  // namespace ftune
