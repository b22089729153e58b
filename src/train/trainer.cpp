// The training loop on the CPU reference backend.
#include "ftune/train/trainer.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

#include "ftune/config/parse.hpp"
#include "ftune/data/pretokenized.hpp"
#include "ftune/io/hf_model.hpp"
#include "ftune/io/peft.hpp"
#include "ftune/model/transformer_cpu.hpp"
#include "ftune/train/metrics.hpp"
#include "ftune/train/optimizer.hpp"
#include "ftune/train/schedule.hpp"

namespace fs = std::filesystem;

namespace ftune {

namespace {

using Clock = std::chrono::steady_clock;

// Example order of an epoch: file order, or a Fisher-Yates shuffle seeded by (seed, epoch),
// written out here so the order is the same with every standard library.
std::vector<int64_t> epoch_order(int64_t n, bool shuffle, int64_t seed, int64_t epoch) {
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  if (!shuffle) return order;
  std::mt19937_64 rng(static_cast<uint64_t>(seed) * 1000003ull + static_cast<uint64_t>(epoch));
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

// An endless stream of micro-batches over the epochs; a micro-batch never spans two epochs.
class MicroBatchStream {
 public:
  MicroBatchStream(const std::vector<Example>& data, int mbs, bool shuffle, int64_t seed)
      : data_(data), mbs_(mbs), shuffle_(shuffle), seed_(seed) {
    order_ = epoch_order(n(), shuffle_, seed_, 0);
  }
  int64_t micro_per_epoch() const { return (n() + mbs_ - 1) / mbs_; }
  double epoch() const { return static_cast<double>(consumed_) / micro_per_epoch(); }
  int64_t consumed() const { return consumed_; }
  MicroBatch next() {
    if (pos_ >= n()) {
      ++epoch_;
      pos_ = 0;
      order_ = epoch_order(n(), shuffle_, seed_, epoch_);
    }
    std::vector<const Example*> ex;
    for (int i = 0; i < mbs_ && pos_ < n(); ++i) ex.push_back(&data_[order_[pos_++]]);
    ++consumed_;
    return make_micro_batch(ex);
  }

 private:
  int64_t n() const { return static_cast<int64_t>(data_.size()); }
  const std::vector<Example>& data_;
  int mbs_;
  bool shuffle_;
  int64_t seed_, epoch_ = 0, pos_ = 0, consumed_ = 0;
  std::vector<int64_t> order_;
};

uint64_t micro_seed(int64_t seed, int64_t micro_index) {
  uint64_t z = static_cast<uint64_t>(seed) * 0xD1B54A32D192ED03ull + static_cast<uint64_t>(micro_index);
  z = (z ^ (z >> 29)) * 0xBF58476D1CE4E5B9ull;
  return z ^ (z >> 32);
}

struct EvalSet {
  std::string name;
  std::vector<Example> examples;
};

// Mean token loss of the adapter over a dataset (no dropout).
std::pair<double, int64_t> evaluate(CpuTransformer& model, const LoraAdapter& a,
                                    const std::vector<Example>& data, int batch) {
  double sum = 0;
  int64_t count = 0;
  for (size_t i = 0; i < data.size(); i += batch) {
    std::vector<const Example*> ex;
    for (size_t j = i; j < std::min(data.size(), i + batch); ++j) ex.push_back(&data[j]);
    LossSum ls = model.forward_loss(make_micro_batch(ex), a);
    sum += ls.loss_sum;
    count += ls.num_targets;
  }
  return {count > 0 ? sum / count : NAN, count};
}

void prune_checkpoints(const std::string& out_dir, int64_t keep) {
  if (keep <= 0) return;
  std::vector<std::pair<int64_t, fs::path>> ckpts;
  for (const auto& e : fs::directory_iterator(out_dir)) {
    const std::string name = e.path().filename().string();
    if (e.is_directory() && name.rfind("checkpoint-", 0) == 0)
      ckpts.push_back({std::stoll(name.substr(11)), e.path()});
  }
  std::sort(ckpts.begin(), ckpts.end());
  for (size_t i = 0; i + keep < ckpts.size(); ++i) fs::remove_all(ckpts[i].second);
}

}  // namespace

TrainResult run_training(const TrainConfig& cfg) {
  validate_train_config(cfg);
  const auto t_start = Clock::now();
  if (cfg.num_threads > 0) omp_set_num_threads(cfg.num_threads);
  ProgressLine progress;

  // ---- output directory: refuse to overwrite a finished run unless asked.
  // Nothing is written there until the model and data have loaded without error.
  if (fs::exists(fs::path(cfg.output_dir) / "adapter") && !cfg.overwrite_output_dir)
    throw std::runtime_error("output_dir '" + cfg.output_dir +
                             "' already holds an adapter; set overwrite_output_dir = true or "
                             "choose another output_dir");

  // ---- model and adapter
  const ModelConfig mc = load_model_config(cfg.model_name_or_path);
  const BaseWeights weights = load_base_weights(cfg.model_name_or_path, mc);
  LoraSpec spec;
  spec.rank = cfg.lora_rank;
  spec.alpha = cfg.lora_alpha;
  spec.dropout = cfg.lora_dropout;
  spec.use_rslora = cfg.use_rslora;
  spec.targets = LoraSpec::parse_targets(cfg.target_modules);
  TrainResult result;
  LoraAdapter& adapter = result.adapter;
  adapter.allocate(mc, spec);
  if (cfg.init_adapter.empty())
    adapter.init_peft_default(static_cast<uint64_t>(cfg.seed));
  else
    load_peft_adapter(cfg.init_adapter, adapter);

  // ---- data
  PretokenizedOptions popt;
  popt.max_length = cfg.model_max_length;
  popt.max_samples = cfg.max_train_samples;
  const std::vector<Example> train = read_pretokenized(cfg.train_file_dir, popt);
  if (train.empty()) throw std::runtime_error("the training set is empty");
  std::vector<EvalSet> evals;
  for (const std::string& d : cfg.validation_file_dir) {
    PretokenizedOptions eopt = popt;
    eopt.max_samples = cfg.max_eval_samples;
    evals.push_back({fs::path(d).filename().string(), read_pretokenized({d}, eopt)});
  }

  fs::create_directories(cfg.output_dir);
  {
    std::ofstream f(fs::path(cfg.output_dir) / "ftune_config.toml");
    f << train_config_to_toml(cfg);
    if (!f) throw std::runtime_error("cannot write to output_dir '" + cfg.output_dir + "'");
  }

  MicroBatchStream stream(train, cfg.per_device_train_batch_size, cfg.shuffle, cfg.seed);
  const int gas = cfg.gradient_accumulation_steps;
  int64_t total_steps = cfg.max_steps;
  if (total_steps <= 0) {
    // HF Trainer: update steps per epoch = max(micro-batches // gas, 1).
    const int64_t per_epoch = std::max<int64_t>(stream.micro_per_epoch() / gas, 1);
    total_steps = static_cast<int64_t>(std::ceil(cfg.num_train_epochs * per_epoch));
  }
  LrSchedule sched{cfg.lr_scheduler_type, cfg.learning_rate,
                   resolve_warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, total_steps),
                   total_steps};

  CpuTransformer model(weights, cfg.gradient_checkpointing);
  std::vector<float> grads(adapter.params.size());
  AdamWState opt;
  opt.resize(adapter.params.size());
  const AdamWHyper hyper{cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay};
  MetricsLog metrics((fs::path(cfg.output_dir) / "metrics.jsonl").string());

  {
    std::ostringstream s;
    s << "[ftune] model " << mc.model_type << " (" << mc.num_hidden_layers << " layers, hidden "
      << mc.hidden_size << ", vocab " << mc.vocab_size << "), LoRA r=" << spec.rank
      << " alpha=" << spec.alpha << " on " << adapter.slots.size() << " projections ("
      << adapter.params.size() << " trainable parameters)\n"
      << "[ftune] device cpu, " << omp_get_max_threads() << " threads; " << train.size()
      << " examples, " << total_steps << " steps of " << cfg.per_device_train_batch_size << " x "
      << gas << " sequences";
    progress.message(s.str());
  }

  auto run_eval = [&](int64_t step) {
    result.eval_losses.clear();
    for (const EvalSet& e : evals) {
      auto [loss, n] = evaluate(model, adapter, e.examples, cfg.per_device_eval_batch_size);
      metrics.log_eval(step, evals.size() > 1 ? "eval_" + e.name : "eval", loss, n);
      result.eval_losses.push_back(loss);
      std::ostringstream s;
      s << "[ftune] step " << step << " eval " << e.name << ": loss " << loss << ", ppl "
        << std::exp(loss);
      progress.message(s.str());
    }
  };

  double window_loss = 0;
  int64_t window_steps = 0, window_tokens = 0;
  auto window_start = Clock::now();
  for (int64_t step = 0; step < total_steps; ++step) {
    std::vector<MicroBatch> micro;
    int64_t targets = 0;
    for (int i = 0; i < gas; ++i) {
      micro.push_back(stream.next());
      targets += micro.back().num_targets();
    }
    // The step's loss is the sum over its label tokens divided by their count, so every
    // micro-batch is scaled by the step's total count, not its own.
    std::fill(grads.begin(), grads.end(), 0.0f);
    double loss_sum = 0;
    const int64_t first_micro = stream.consumed() - gas;
    for (int i = 0; i < gas; ++i) {
      window_tokens += micro[i].num_tokens();
      result.tokens += micro[i].num_tokens();
      if (targets == 0) continue;
      LossSum ls = model.forward_backward(micro[i], adapter, grads.data(),
                                          1.0f / static_cast<float>(targets),
                                          micro_seed(cfg.seed, first_micro + i));
      loss_sum += ls.loss_sum;
    }
    const double lr = sched.at(step);
    double loss = NAN, norm = 0;
    if (targets == 0) {
      progress.message("[ftune] warning: step " + std::to_string(step + 1) +
                       " has no label tokens; no update");
    } else {
      loss = loss_sum / static_cast<double>(targets);
      norm = clip_grad_norm(grads, cfg.max_grad_norm);
      adamw_step(adapter.params, grads, opt, lr, hyper);
    }
    result.losses.push_back(loss);
    result.grad_norms.push_back(norm);
    result.lrs.push_back(lr);
    if (std::isfinite(loss)) {
      window_loss += loss;
      ++window_steps;
    }

    const int64_t done = step + 1;
    if (done % cfg.logging_steps == 0 || done == total_steps) {
      const double window_s = std::chrono::duration<double>(Clock::now() - window_start).count();
      StepReport r;
      r.step = done;
      r.total_steps = total_steps;
      r.epoch = stream.epoch();
      r.loss = window_steps ? window_loss / window_steps : NAN;
      r.lr = lr;
      r.grad_norm = norm;
      r.tokens = result.tokens;
      r.tokens_per_s = window_s > 0 ? window_tokens / window_s : 0;
      r.elapsed_s = std::chrono::duration<double>(Clock::now() - t_start).count();
      metrics.log_step(r);
      progress.update(r);
      window_loss = 0;
      window_steps = window_tokens = 0;
      window_start = Clock::now();
    }
    if (cfg.eval_steps > 0 && done % cfg.eval_steps == 0 && done != total_steps) {
      run_eval(done);
      window_start = Clock::now();  // evaluation time is not training throughput
    }
    if (cfg.save_steps > 0 && done % cfg.save_steps == 0 && done != total_steps) {
      save_peft_adapter((fs::path(cfg.output_dir) / ("checkpoint-" + std::to_string(done))).string(),
                        adapter, cfg.model_name_or_path);
      prune_checkpoints(cfg.output_dir, cfg.save_total_limit);
    }
  }
  progress.finish();
  if (!evals.empty()) run_eval(total_steps);

  const std::string adapter_dir = (fs::path(cfg.output_dir) / "adapter").string();
  save_peft_adapter(adapter_dir, adapter, cfg.model_name_or_path);
  result.seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  {
    std::ostringstream s;
    s << "[ftune] done: " << total_steps << " steps in " << format_duration(result.seconds)
      << ", final loss " << result.losses.back() << "; adapter written to " << adapter_dir;
    progress.message(s.str());
  }
  return result;
}

}  // namespace ftune
