// The training loop: data-parallel over the ranks of `comm`, on either backend (the step
// runner keeps the adapter and optimizer where the backend computes: see step_runner.hpp).
// One optimizer step = gradient_accumulation_steps x world_size micro-batches of the global
// stream; rank r runs micro-batches r, r + N, ... of it, so N ranks compute the same step as
// one rank with N times the accumulation. Setup, resume and saves: trainer_setup.cpp.
#include "ftune/train/trainer.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "ftune/config/parse.hpp"
#include "ftune/io/hf_model.hpp"
#include "ftune/io/peft.hpp"
#if FTUNE_HAVE_CUDA
#include "ftune/kernels/cuda_device.hpp"
#endif
#include "ftune/train/full_finetune.hpp"
#include "ftune/train/metrics.hpp"
#include "ftune/train/schedule.hpp"
#include "trainer_setup.hpp"

namespace fs = std::filesystem;

namespace ftune {
namespace {
using namespace train_detail;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

uint64_t micro_seed(int64_t seed, int64_t micro_index) {
  uint64_t z = static_cast<uint64_t>(seed) * 0xD1B54A32D192ED03ull + static_cast<uint64_t>(micro_index);
  z = (z ^ (z >> 29)) * 0xBF58476D1CE4E5B9ull;
  return z ^ (z >> 32);
}

// Mean token loss over a dataset; ranks split the examples and sum (loss, count). With
// lockstep (ZeRO-3: every forward gathers the layers with the other ranks) every rank runs
// as many forwards as the rank with the most examples, the missing ones empty.
std::pair<double, int64_t> evaluate(StepRunner& model, const std::vector<Example>& data,
                                    int batch, Communicator& comm, bool lockstep) {
  double acc[2] = {0, 0};  // loss sum, token count
  std::vector<const Example*> mine;
  for (size_t i = comm.rank(); i < data.size(); i += comm.size()) mine.push_back(&data[i]);
  const size_t most = (data.size() + comm.size() - 1) / comm.size();
  const size_t forwards = ((lockstep ? most : mine.size()) + batch - 1) / batch;
  for (size_t f = 0; f < forwards; ++f) {
    const size_t i = std::min(mine.size(), f * batch);
    std::vector<const Example*> ex(mine.begin() + i, mine.begin() + std::min(mine.size(), i + batch));
    LossSum ls = model.evaluate(make_micro_batch(ex));
    acc[0] += ls.loss_sum;
    acc[1] += static_cast<double>(ls.num_targets);
  }
  if (comm.size() > 1) comm.all_reduce_sum(std::span<double>(acc, 2));
  return {acc[1] > 0 ? acc[0] / acc[1] : NAN, static_cast<int64_t>(acc[1])};
}

}  // namespace

TrainResult run_training(const TrainConfig& cfg) {
  auto comm = make_single_rank_communicator();
  return run_training(cfg, *comm);
}

TrainResult run_training(const TrainConfig& cfg, Communicator& comm) {
  validate_train_config(cfg);
  const auto t_start = Clock::now();
  if (cfg.num_threads > 0) omp_set_num_threads(cfg.num_threads);
  Run run{cfg, comm, comm.rank() == 0, {}, {}, {}, false, {}, {}, {}};
  ProgressLine progress;
  auto say = [&](const std::string& s) { if (run.root) progress.message(s); };
  TrainResult result;
  LoraAdapter& adapter = result.adapter;

  // ---- load everything on every rank before writing anything anywhere.
  load_model_and_adapter(run, adapter);
  load_data(run, say);
  identify_run(run, adapter);

  // ---- schedule
  const int gas = cfg.gradient_accumulation_steps;
  const int world = comm.size();
  const int micro_per_step = gas * world;
  MicroBatchStream stream(run.train, cfg.per_device_train_batch_size, cfg.shuffle, cfg.seed,
                          cfg.packing ? cfg.model_max_length : 0);
  int64_t total_steps = cfg.max_steps;
  if (total_steps <= 0) {
    // HF Trainer: update steps per epoch = max(micro-batches per epoch // (gas x ranks), 1).
    const int64_t per_epoch = std::max<int64_t>(stream.micro_per_epoch() / micro_per_step, 1);
    total_steps = static_cast<int64_t>(std::ceil(cfg.num_train_epochs * per_epoch));
  }
  const LrSchedule sched{cfg.lr_scheduler_type, cfg.learning_rate,
                         resolve_warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, total_steps),
                         total_steps};
  // ---- backend and step runner
  Runner runner = make_runner(run, adapter);
  StepRunner& opt = *runner.opt;
  const size_t num_params = adapter.params.size();
  release_full_vector(run, adapter);

  // ---- resume
  const Resumed resumed = resume_run(run, adapter, opt, stream, result, say);
  const int64_t start_step = resumed.step;

  // ---- outputs: rank 0 writes them, now that everything loaded.
  std::unique_ptr<MetricsLog> metrics;
  on_all_ranks(comm, [&] {
    if (!run.root) return;
    fs::create_directories(cfg.output_dir);
    std::ofstream f(fs::path(cfg.output_dir) / "ftune_config.toml");
    f << train_config_to_toml(cfg);
    if (!f) throw std::runtime_error("cannot write to output_dir '" + cfg.output_dir + "'");
    metrics = std::make_unique<MetricsLog>((fs::path(cfg.output_dir) / "metrics.jsonl").string(),
                                           resumed.metrics_jsonl);
  });
  say(describe_run(run, adapter, runner, num_params, total_steps));

  auto run_eval = [&](int64_t step) {
    result.eval_losses.clear();
    for (const EvalSet& e : run.evals) {
      auto [loss, n] = evaluate(opt, e.examples, cfg.per_device_eval_batch_size, comm,
                                cfg.zero_stage == 3);
      if (metrics) metrics->log_eval(step, run.evals.size() > 1 ? "eval_" + e.name : "eval", loss, n);
      result.eval_losses.push_back(loss);
      std::ostringstream s;
      s << "[ftune] step " << step << " eval " << e.name << ": loss " << loss << ", ppl "
        << std::exp(loss);
      say(s.str());
    }
  };
  auto trainer_state = [&](int64_t done) {
    TrainerState st;
    st.step = done;
    const StreamCursor c = stream.cursor();
    st.data_epoch = c.epoch;
    st.data_pos = c.pos;
    st.data_consumed = c.consumed;
    st.seed = static_cast<uint64_t>(cfg.seed);
    st.world_size = world;
    st.tokens = result.tokens;
    st.losses = result.losses;
    if (metrics) st.metrics_jsonl = metrics->contents();
    return st;
  };

  // ---- the loop
  double window_loss = 0;
  int64_t window_steps = 0, window_tokens = 0;
  auto window_start = Clock::now();
  for (int64_t step = start_step; step < total_steps; ++step) {
    // Every rank forms the whole step (cheap: packing ids) so each knows the global
    // label-token count, the step's loss normaliser, without communicating.
    const int64_t first_micro = stream.cursor().consumed;
    std::vector<MicroBatch> micro;
    int64_t targets = 0, step_tokens = 0;
    for (int i = 0; i < micro_per_step; ++i) {
      micro.push_back(stream.next());
      targets += micro.back().num_targets();
      step_tokens += micro.back().num_tokens();
    }
    double loss_sum = 0;
    if (targets > 0)
      for (int i = comm.rank(); i < micro_per_step; i += world)
        loss_sum += opt.accumulate(micro[i], 1.0f / static_cast<float>(targets),
                                   micro_seed(cfg.seed, first_micro + i)).loss_sum;
    if (world > 1) comm.all_reduce_sum(std::span<double>(&loss_sum, 1));
    const double lr = sched.at(step);
    double loss = NAN, norm = 0;
    if (targets == 0) {
      say("[ftune] warning: step " + std::to_string(step + 1) + " has no label tokens; no update");
    } else {
      loss = loss_sum / static_cast<double>(targets);
      norm = opt.step(lr, cfg.max_grad_norm);
    }
    result.losses.push_back(loss);
    result.grad_norms.push_back(norm);
    result.lrs.push_back(lr);
    result.tokens += step_tokens;
    window_tokens += step_tokens;
    if (std::isfinite(loss)) {
      window_loss += loss;
      ++window_steps;
    }

    const int64_t done = step + 1;
    if (done % cfg.logging_steps == 0 || done == total_steps) {
      const double window_s = seconds_since(window_start);
      StepReport r;
      r.step = done;
      r.total_steps = total_steps;
      r.epoch = stream.epoch();
      r.loss = window_steps ? window_loss / window_steps : NAN;
      r.lr = lr;
      r.grad_norm = norm;
      r.tokens = result.tokens;
      r.tokens_per_s = window_s > 0 ? window_tokens / window_s : 0;
      r.elapsed_s = seconds_since(t_start);
#if FTUNE_HAVE_CUDA
      // Device memory is allocated only by the CUDA backend: none means a CPU run.
      if (const size_t peak = cuda::device_bytes_peak(); peak > 0) {
        r.peak_gpu_mem_gib = static_cast<double>(peak) / (1ull << 30);
        cuda::reset_device_bytes_peak();
      }
#endif
      if (metrics) metrics->log_step(r);
      if (run.root) progress.update(r);
      window_loss = 0;
      window_steps = window_tokens = 0;
      window_start = Clock::now();
    }
    if (cfg.eval_steps > 0 && done % cfg.eval_steps == 0 && done != total_steps) {
      run_eval(done);
      window_start = Clock::now();  // evaluation time is not training throughput
    }
    if (cfg.save_steps > 0 && done % cfg.save_steps == 0 && done != total_steps) {
      save_checkpoint(run, adapter, opt, trainer_state(done));
      release_full_vector(run, adapter);
    }
  }
  if (run.root) progress.finish();
  if (!run.evals.empty()) run_eval(total_steps);

  // ---- final outputs: a checkpoint (resumable) and the PEFT adapter (full fine-tuning: the
  // HF model directory output_dir/model). save_only_model: the checkpoint would repeat the
  // adapter/model without what makes it resumable (an 8B model's optimizer state is 96 GB).
  opt.params_to_host(adapter);
  if (start_step < total_steps && !cfg.save_only_model)
    save_checkpoint(run, adapter, opt, trainer_state(total_steps));
  const std::string product_dir =
      (fs::path(cfg.output_dir) / (cfg.use_peft ? "adapter" : "model")).string();
  on_all_ranks(comm, [&] {
    if (!run.root) return;
    if (cfg.use_peft)
      save_peft_adapter(product_dir, adapter, cfg.model_name_or_path);
    else
      save_full_model(product_dir, run.mc, adapter, cfg.model_name_or_path);
  });
  result.seconds = seconds_since(t_start);
  {
    std::ostringstream s;
    s << "[ftune] done: " << total_steps << " steps in " << format_duration(result.seconds)
      << ", final loss " << (result.losses.empty() ? NAN : result.losses.back())
      << "; " << (cfg.use_peft ? "adapter" : "model") << " written to " << product_dir;
    say(s.str());
  }
  return result;
}

}  // namespace ftune
