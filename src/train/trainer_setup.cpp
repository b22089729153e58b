// What run_training does before its loop and around it (trainer_setup.hpp): loading the
// model, adapter and data on every rank, checking that the ranks agree, building the backend
// and step runner, resuming, the banner, and checkpoint saves.
#include "trainer_setup.hpp"

#include <omp.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "ftune/config/parse.hpp"
#include "ftune/data/tokenizer.hpp"
#include "ftune/io/hf_model.hpp"
#include "ftune/io/peft.hpp"
#include "ftune/model/quantize.hpp"
#include "ftune/model/transformer_cpu.hpp"
#include "ftune/model/zero3_weights.hpp"
#if FTUNE_HAVE_CUDA
#include "ftune/dist/nccl.hpp"
#include "ftune/kernels/cuda_device.hpp"
#include "ftune/model/transformer_cuda.hpp"
#endif
#include "ftune/train/full_finetune.hpp"

namespace fs = std::filesystem;

namespace ftune {

bool uses_cuda_backend(const TrainConfig& cfg, const WorldInfo& world) {
#if FTUNE_HAVE_CUDA
  const int gpus = cuda::cuda_device_count();
  if (cfg.device == "cuda" && gpus == 0)
    throw std::runtime_error("device = \"cuda\" but no GPU is visible on " + world.host +
                             " (check the driver and CUDA_VISIBLE_DEVICES)");
  return cfg.device == "cuda" || (cfg.device == "auto" && gpus > 0);
#else
  if (cfg.device == "cuda")
    throw std::runtime_error("device = \"cuda\": this ftune was built without the CUDA backend "
                             "(nvcc was not found when CMake configured it)");
  return false;
#endif
}

std::unique_ptr<TrainBackend> make_backend(const TrainConfig& cfg, const WeightSource& source,
                                           const BaseWeights* weights, Communicator& comm) {
  const WorldInfo& world = comm.world();
  const int quant_bits = cfg.load_in_8bit ? 8 : cfg.load_in_4bit ? 4 : 0;
#if FTUNE_HAVE_CUDA
  if (uses_cuda_backend(cfg, world)) {
    std::optional<CudaTransformer::LayerSharding> zero3;
    if (cfg.zero_stage == 3) {
      zero3.emplace();
      zero3->rank = comm.rank();
      zero3->size = comm.size();
      if (comm.size() > 1) {
        // The layer gathers get their own NCCL communicator (the step runner's carries the
        // gradients on the compute stream; these run on the streamer's side stream).
        std::shared_ptr<NcclCommunicator> nccl = NcclCommunicator::create(comm);
        zero3->all_gather = [nccl](const void* send, void* recv, size_t bytes,
                                   cuda::stream_t stream) {
          nccl->all_gather_bytes(send, recv, bytes, stream);
        };
      }
    }
    auto gpu = std::make_unique<CudaTransformer>(
        source, cfg.gradient_checkpointing, cfg.flash_attn,
        world.local_rank % cuda::cuda_device_count(),  // GPU = local rank
        quant_bits, cfg.offload_param == "cpu", zero3 ? &*zero3 : nullptr);
    gpu->set_selective_recompute(cfg.selective_recompute);
    return gpu;
  }
#else
  (void)uses_cuda_backend(cfg, world);
#endif
  if (cfg.zero_stage == 3 && cfg.use_peft) {
    ShardGather gather = [&comm](int, std::span<const float> shard, std::span<float> full) {
      comm.all_gather(shard, full);
    };
    return std::make_unique<CpuTransformer>(
        std::make_unique<Zero3Weights>(source, comm.rank(), comm.size(), gather, quant_bits),
        cfg.gradient_checkpointing);
  }
  if (!weights)
    throw std::logic_error("make_backend: the CPU backend needs the weights materialised");
  return std::make_unique<CpuTransformer>(*weights, cfg.gradient_checkpointing);
}

bool needs_host_weights(const TrainConfig& cfg, bool on_cuda) {
  if (!cfg.use_peft) return true;
  return !on_cuda && cfg.zero_stage != 3;
}

namespace train_detail {
namespace {

// use_peft = false on a GPU: the CUDA backend reads the model from the step runner's
// parameter copy (the adapter holds the whole model), so it is built from the config alone.
std::unique_ptr<TrainBackend> make_full_finetune_cuda_backend(const TrainConfig& cfg,
                                                              const ModelConfig& mc,
                                                              const WorldInfo& world) {
#if FTUNE_HAVE_CUDA
  auto gpu = std::make_unique<CudaTransformer>(mc, cfg.gradient_checkpointing, cfg.flash_attn,
                                               world.local_rank % cuda::cuda_device_count(),
                                               CudaTransformer::FullFineTuning{});
  gpu->set_selective_recompute(cfg.selective_recompute);
  return gpu;
#else
  (void)cfg, (void)mc, (void)world;
  throw std::logic_error("full fine-tuning on CUDA in a build without CUDA");
#endif
}

// FNV-1a over bytes: identities for fingerprints and checkpoints (not security).
struct Fnv {
  uint64_t h = 1469598103934665603ull;
  void add(const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
  void add(const std::string& s) { add(s.data(), s.size()); }
  std::string hex() const {
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
    return buf;
  }
};

// Identifies the base model a checkpoint was trained on: its config and a strided sample of
// its weights as stored (cheap; any other model of the same shape differs). Quantised
// training (a different model in effect) is named after it.
std::string model_fingerprint(const ModelConfig& mc, const WeightSource& src, int quant_bits) {
  Fnv f;
  f.add(model_config_to_json(mc));
  const std::vector<float> sample = strided_sample(src);
  f.add(sample.data(), sample.size() * sizeof(float));
  std::string fp = mc.model_type + "/" + std::to_string(src.total_numel()) + "/" + f.hex();
  if (quant_bits) fp += quant_bits == 8 ? "/int8" : "/nf4";
  return fp;
}

std::string lora_fingerprint(const LoraAdapter& a) {
  if (a.slots.empty()) return "full fine-tuning params=" + std::to_string(a.params.size());
  std::ostringstream s;
  s << "r=" << a.spec.rank << " alpha=" << a.spec.alpha << " rslora=" << a.spec.use_rslora
    << " targets=";
  for (const auto& t : a.spec.target_names()) s << t << ",";
  s << " params=" << a.params.size();
  return s.str();
}

std::string data_fingerprint(const std::vector<Example>& data) {
  Fnv f;
  for (const Example& e : data) {
    f.add(e.input_ids.data(), e.input_ids.size() * sizeof(int32_t));
    f.add(e.labels.data(), e.labels.size() * sizeof(int32_t));
  }
  return std::to_string(data.size()) + " examples/" + f.hex();
}

// The tokenizer for text data: tokenizer_name_or_path, else the model directory; none when
// neither has a tokenizer.json (pre-tokenized data then still works).
std::optional<Tokenizer> load_tokenizer(const TrainConfig& cfg, std::string* path) {
  *path = cfg.tokenizer_name_or_path.empty() ? cfg.model_name_or_path : cfg.tokenizer_name_or_path;
  if (fs::is_regular_file(*path)) return Tokenizer::from_file(*path);
  if (fs::exists(fs::path(*path) / "tokenizer.json")) return Tokenizer::from_dir(*path);
  if (!cfg.tokenizer_name_or_path.empty())
    throw std::runtime_error("tokenizer_name_or_path '" + *path + "' has no tokenizer.json");
  return std::nullopt;
}

std::string describe(const std::string& what, const DatasetStats& s) {
  std::ostringstream o;
  o << "[ftune] " << what << ": " << s.examples << " examples from " << s.records << " records, "
    << s.tokens << " tokens (" << s.label_tokens << " with loss)";
  if (s.truncated) o << ", " << s.truncated << " truncated";
  if (s.skipped) o << ", " << s.skipped << " malformed skipped";
  if (s.no_pairs) o << ", " << s.no_pairs << " without a complete turn";
  if (s.dropped_no_labels) o << ", " << s.dropped_no_labels << " without labels dropped";
  o << (s.cache_hit ? " [cache]" : "");
  return o.str();
}

}  // namespace

void load_data(Run& run, const Say& say) {
  const TrainConfig& cfg = run.cfg;
  std::optional<Tokenizer> tok;
  std::string tok_path;
  on_all_ranks(run.comm, [&] { tok = load_tokenizer(cfg, &tok_path); });
  auto options = [&](const std::vector<std::string>& dirs, int64_t max_samples) {
    DatasetOptions o;
    o.dirs = dirs;
    o.tokenizer = tok ? &*tok : nullptr;
    o.tokenizer_path = tok ? tok_path : "";
    o.template_name = cfg.template_name;
    o.max_length = cfg.model_max_length;
    o.train_on_inputs = cfg.train_on_inputs;
    o.max_samples = max_samples;
    o.skip_bad_examples = cfg.skip_bad_examples;
    o.num_workers = cfg.preprocessing_num_workers;
    o.cache_dir = cfg.cache_dir;
    o.progress = run.root;
    return o;
  };
  DatasetStats train_stats;
  std::vector<DatasetStats> eval_stats(cfg.validation_file_dir.size());
  auto load_all = [&] {
    run.train = load_dataset(options(cfg.train_file_dir, cfg.max_train_samples), &train_stats);
    run.evals.clear();
    for (size_t i = 0; i < cfg.validation_file_dir.size(); ++i) {
      const std::string& d = cfg.validation_file_dir[i];
      run.evals.push_back({fs::path(d).filename().string(),
                           load_dataset(options({d}, cfg.max_eval_samples), &eval_stats[i])});
    }
  };
  const bool staged = !cfg.cache_dir.empty() && run.comm.size() > 1;
  on_all_ranks(run.comm, [&] { if (run.root || !staged) load_all(); });
  if (staged) on_all_ranks(run.comm, [&] { if (!run.root) load_all(); });
  if (cfg.validation_file_dir.empty() && cfg.validation_split_percentage > 0) {
    // MedicalGPT: without validation files, hold out a percentage of the training set.
    auto [train, val] = split_validation(std::move(run.train), cfg.validation_split_percentage);
    run.train = std::move(train);
    if (!val.empty()) run.evals.push_back({"validation_split", std::move(val)});
  }
  say(describe("train data", train_stats));
  for (size_t i = 0; i < eval_stats.size(); ++i) say(describe("validation " + run.evals[i].name, eval_stats[i]));
}


void load_model_and_adapter(Run& run, LoraAdapter& adapter) {
  const TrainConfig& cfg = run.cfg;
  on_all_ranks(run.comm, [&] {
    // Only a run that resumes may find its own adapter there; others refuse to overwrite.
    const char* product = cfg.use_peft ? "adapter" : "model";
    if (cfg.resume_from_checkpoint.empty() && !cfg.overwrite_output_dir &&
        fs::exists(fs::path(cfg.output_dir) / product))
      throw std::runtime_error("output_dir '" + cfg.output_dir + "' already holds " +
                               (cfg.use_peft ? "an adapter" : "a model") +
                               "; set overwrite_output_dir = true, resume_from_checkpoint, or "
                               "choose another output_dir");
    // A save killed while replacing a checkpoint may have left its old copy aside.
    if (run.root) recover_checkpoints(cfg.output_dir);
    run.mc = load_model_config(cfg.model_name_or_path);
    if (run.mc.sliding_window > 0 && cfg.model_max_length > run.mc.sliding_window)
      throw std::runtime_error(
          "model_max_length = " + std::to_string(cfg.model_max_length) + " exceeds the model's " +
          "sliding_window (" + std::to_string(run.mc.sliding_window) + ", " +
          cfg.model_name_or_path + "/config.json): sliding-window attention is not implemented; "
          "set model_max_length <= " + std::to_string(run.mc.sliding_window));
    run.source = open_base_weights(cfg.model_name_or_path, run.mc);
    // The CUDA backend converts (and quantises) the weights tensor by tensor as it reads
    // them; host memory never holds the fp32 model. The CPU backend computes with it.
    run.on_cuda = uses_cuda_backend(cfg, run.comm.world());
    // Full fine-tuning trains (and saves) the whole model from its host copy; ZeRO-3 on the
    // CPU reads only this rank's shards (make_backend).
    if (needs_host_weights(cfg, run.on_cuda)) {
      run.weights = materialize(*run.source);
      // load_in_8bit / 4bit: the CPU trains on the round trip of the projections (the CUDA
      // backend quantises the originals: quantising the round trip gives the same codes).
      if (cfg.load_in_8bit) apply_int8_roundtrip(run.weights);
      if (cfg.load_in_4bit) apply_nf4_roundtrip(run.weights);
    }
    if (!cfg.use_peft) {  // full fine-tuning: every base weight is trained
      // The CPU computes with run.weights (each micro-step copies the parameters in); the
      // GPU from its own copy, so there the host holds the fp32 model once, as the masters.
      // ZeRO-3 keeps only this rank's shard (the step runner takes it; make_step_runners).
      adapter = run.on_cuda || cfg.zero_stage == 3 ? full_model_as_adapter(std::move(run.weights))
                                                   : full_model_as_adapter(run.weights);
      return;
    }
    LoraSpec spec;
    spec.rank = cfg.lora_rank;
    spec.alpha = cfg.lora_alpha;
    spec.dropout = cfg.lora_dropout;
    spec.use_rslora = cfg.use_rslora;
    spec.targets = LoraSpec::parse_targets(cfg.target_modules);
    adapter.allocate(run.mc, spec);
    if (cfg.init_adapter.empty())
      adapter.init_peft_default(static_cast<uint64_t>(cfg.seed));
    else
      load_peft_adapter(cfg.init_adapter, adapter);
  });
}

void identify_run(Run& run, const LoraAdapter& adapter) {
  const TrainConfig& cfg = run.cfg;
  run.identity.ftune_version = FTUNE_VERSION;
  run.identity.model_fingerprint = model_fingerprint(
      run.mc, *run.source, cfg.load_in_8bit ? 8 : cfg.load_in_4bit ? 4 : 0);
  run.identity.lora_fingerprint = lora_fingerprint(adapter);
  run.identity.num_params = static_cast<int64_t>(adapter.params.size());
  {
    // The seed's "environment consistency" pitfall: every rank must run the same thing.
    std::string fp = "ftune " FTUNE_VERSION "\nmodel " + run.identity.model_fingerprint +
                     "\nlora " + run.identity.lora_fingerprint + "\ndata " +
                     data_fingerprint(run.train) + "\nconfig\n" + train_config_to_toml(cfg);
    try {
      require_same_on_all_ranks(run.comm, fp, "ftune version, configuration, model and data");
    } catch (const std::runtime_error& e) {
      throw CollectiveError(e.what());  // raised identically on every rank
    }
  }
}

Runner make_runner(Run& run, LoraAdapter& adapter) {
  const TrainConfig& cfg = run.cfg;
  Communicator& comm = run.comm;
  const bool sharded_params = shards_parameters(cfg);
  const AdamWHyper hyper{cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay};
  std::unique_ptr<TrainBackend> backend;  // (none for ZeRO-3 full fine-tuning on the CPU)
  if (cfg.use_peft)
    on_all_ranks(comm, [&] {
      backend = make_backend(cfg, *run.source,
                             needs_host_weights(cfg, run.on_cuda) ? &run.weights : nullptr, comm);
    });
  else if (run.on_cuda)
    backend = make_full_finetune_cuda_backend(cfg, run.mc, comm.world());
  else if (!sharded_params)
    backend = std::make_unique<FullFineTuneBackend>(run.weights, cfg.gradient_checkpointing);
  std::unique_ptr<StepRunner> runner;
  on_all_ranks(comm, [&] {
    if (sharded_params && run.on_cuda) {
#if FTUNE_HAVE_CUDA
      runner = cfg.offload_optimizer == "cpu"
                   ? make_cuda_zero3_offload_full_step_runner(*backend, adapter, comm, hyper)
                   : make_cuda_zero3_full_step_runner(*backend, adapter, comm, hyper);
#endif
    } else if (sharded_params) {
      runner = make_zero3_full_step_runner(adapter, comm, hyper, cfg.gradient_checkpointing);
    } else {
      runner = make_step_runner(*backend, adapter, cfg.zero_stage, comm, hyper,
                                cfg.offload_optimizer == "cpu");
    }
  });
  if (!cfg.use_peft && cfg.weight_decay > 0) runner->set_decay_mask(full_finetune_decay_mask(run.mc));
  return {std::move(backend), std::move(runner)};
}

void release_full_vector(const Run& run, LoraAdapter& adapter) {
  if (shards_parameters(run.cfg)) std::vector<float>().swap(adapter.params);
}

Resumed resume_run(Run& run, LoraAdapter& adapter, StepRunner& opt, MicroBatchStream& stream,
                   TrainResult& result, const Say& say) {
  const TrainConfig& cfg = run.cfg;
  Resumed r;
  if (cfg.resume_from_checkpoint.empty()) return r;
  std::string dir = cfg.resume_from_checkpoint;
  on_all_ranks(run.comm, [&] {
    if (dir == "latest") {
      auto latest = find_latest_checkpoint(cfg.output_dir);
      if (!latest)
        throw std::runtime_error("resume_from_checkpoint = \"latest\": no complete checkpoint in '" +
                                 cfg.output_dir + "'");
      dir = *latest;
    }
    if (cfg.use_peft)
      read_adapter_h5((fs::path(dir) / "adapter.h5").string(), adapter, run.identity);
    else
      load_full_model((fs::path(dir) / "model").string(), run.mc, adapter);
    const ShardRange own = opt.owned();
    // The shards' master weights are the adapter's fp32 values (both are written from the
    // same vector), so adapter.h5 supplies the whole vector and the shards must agree.
    const OptimizerShard shard = read_optimizer_resharded(dir, own.begin, own.end, run.identity);
    if (shard.master.size() != own.size() ||
        !std::equal(shard.master.begin(), shard.master.end(), adapter.params.begin() + own.begin))
      throw std::runtime_error("checkpoint '" + dir + "': the optimizer shards' master "
                               "weights differ from adapter.h5 (files from different saves?)");
    opt.import_shard(shard, adapter.params);
    opt.params_from_host(adapter);
    release_full_vector(run, adapter);
    const TrainerState st = read_trainer_state_h5((fs::path(dir) / "trainer_state.h5").string());
    if (st.seed != static_cast<uint64_t>(cfg.seed))
      throw std::runtime_error("checkpoint '" + dir + "' was made with seed " +
                               std::to_string(st.seed) + ", this run has seed " +
                               std::to_string(cfg.seed));
    stream.restore({st.data_epoch, st.data_pos, st.data_consumed});
    r.step = st.step;
    result.losses = st.losses;
    result.tokens = st.tokens;
    r.metrics_jsonl = st.metrics_jsonl;
  });
  say("[ftune] resumed from " + dir + " at step " + std::to_string(r.step));
  return r;
}

std::string describe_run(const Run& run, const LoraAdapter& adapter, const Runner& runner,
                         size_t num_params, int64_t total_steps) {
  const TrainConfig& cfg = run.cfg;
  const StepRunner& opt = *runner.opt;
  const TrainBackend* backend = runner.backend.get();
  const int world = run.comm.size(), gas = cfg.gradient_accumulation_steps;
  const bool sharded_params = shards_parameters(cfg);
  std::ostringstream s;
  s << "[ftune] world: " << world << (world == 1 ? " rank" : " ranks") << " (launcher "
    << run.comm.world().launcher << "), zero_stage " << cfg.zero_stage << ", " << opt.describe()
    << ", optimizer state " << opt.state_bytes() << " bytes per rank\n"
    << "[ftune] model " << run.mc.model_type << " (" << run.mc.num_hidden_layers
    << " layers, hidden " << run.mc.hidden_size << ", vocab " << run.mc.vocab_size
    << (cfg.load_in_8bit ? ", int8 projections" : cfg.load_in_4bit ? ", NF4 projections" : "")
    << "), ";
  if (cfg.use_peft)
    s << "LoRA r=" << adapter.spec.rank << " alpha=" << adapter.spec.alpha << " on "
      << adapter.slots.size() << " projections";
  else
    s << "full fine-tuning";
  s << " (" << num_params << " trainable parameters)\n"
    << "[ftune] device " << (backend ? backend->name() : "cpu (full fine-tuning)") << ", "
    << omp_get_max_threads()
    << " CPU threads per rank; "
    << run.train.size() << " examples, " << total_steps << " steps of "
    << cfg.per_device_train_batch_size << " x " << gas << " x " << world << " sequences";
  if (cfg.offload_param == "cpu")
    s << (!run.on_cuda ? "\n[ftune] offload_param: no effect on the CPU backend (the weights "
                         "are in host memory)"
          : !cfg.use_peft ? "\n[ftune] offload_param: no effect with full fine-tuning (the "
                            "weights are the trained parameters; offload_optimizer moves them)"
                          : "\n[ftune] offload_param: projection weights in pinned host "
                            "memory, copied to the GPU a layer ahead");
  if (cfg.selective_recompute)
    s << (run.on_cuda ? "\n[ftune] selective_recompute: each layer's residual after attention "
                        "kept, the recompute skips the o projection"
                      : "\n[ftune] selective_recompute: no effect on the CPU backend (its "
                        "checkpointing recomputes whole layers)");
  if (cfg.zero_stage == 3) {
    s << "\n[ftune] zero_stage 3: each layer's " << (sharded_params ? "weights" : "frozen weights")
      << " sharded over " << world << (world == 1 ? " rank" : " ranks")
      << " and gathered just before use";
    if (sharded_params)
      s << "; this rank owns " << opt.owned().size() << " of " << num_params
        << " parameters (" << opt.state_bytes() / double(1 << 20)
        << " MiB of optimizer state)";
    if (sharded_params && !run.on_cuda)
      s << " and holds " << zero3_full_bytes(opt) / double(1 << 20)
        << " MiB of model state (host)";
    if (const auto* cpu = dynamic_cast<const CpuTransformer*>(backend); cpu && cpu->zero3())
      s << "; base weights held by this rank: " << cpu->zero3()->bytes() / double(1 << 20)
        << " MiB (host)";
#if FTUNE_HAVE_CUDA
    if (const auto* gpu = dynamic_cast<const CudaTransformer*>(backend); gpu && sharded_params)
      s << "; gathered blocks and their gradient scratch: "
        << gpu->full_sharding_bytes() / double(1 << 20) << " MiB on the GPU";
    else if (gpu)
      s << "; base weights held by this rank: " << gpu->weight_bytes() / double(1 << 20)
        << " MiB on the GPU" << (cfg.offload_param == "cpu" ? " (layer shards in host memory)" : "");
#endif
  }
  return s.str();
}

// Collective. Brings the current parameters to the host adapter first.
void save_checkpoint(Run& run, LoraAdapter& adapter, StepRunner& opt,
                     const TrainerState& state) {
  opt.params_to_host(adapter);
  const fs::path out(run.cfg.output_dir);
  const std::string name = checkpoint_dir_name(state.step);
  const fs::path tmp = out / (name + ".tmp"), final_dir = out / name;
  on_all_ranks(run.comm, [&] {
    if (run.root) {
      fs::remove_all(tmp);
      fs::create_directories(tmp);
    }
  });
  on_all_ranks(run.comm, [&] {
    if (!run.cfg.save_only_model)
      write_optimizer_shard_h5((tmp / optimizer_shard_file(run.comm.rank(), run.comm.size())).string(),
                               opt.export_shard(adapter.params), run.identity);
    if (run.root) {
      write_trainer_state_h5((tmp / "trainer_state.h5").string(), state);
      if (!run.cfg.use_peft) {  // full fine-tuning: the whole model, as an HF directory
        save_full_model((tmp / "model").string(), run.mc, adapter, run.cfg.model_name_or_path);
      } else {
        write_adapter_h5((tmp / "adapter.h5").string(), adapter, run.identity);
        save_peft_adapter((tmp / "adapter").string(), adapter, run.cfg.model_name_or_path);
      }
    }
  });
  on_all_ranks(run.comm, [&] {
    if (!run.root) return;
    // A resumed run may save a step that an earlier run also saved: the new one replaces it,
    // and the old one is moved aside (not deleted) until the new one is complete.
    const fs::path old = out / (name + ".old");
    if (fs::exists(final_dir)) {
      fs::remove_all(old);
      fs::rename(final_dir, old);
    }
    finalize_checkpoint(tmp.string(), final_dir.string());
    fs::remove_all(old);
    prune_checkpoints(run.cfg.output_dir, run.cfg.save_total_limit);
  });
}

}  // namespace train_detail
}  // namespace ftune
