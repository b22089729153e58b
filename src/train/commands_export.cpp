// `ftune export --merge`: base weights + PEFT adapter -> one HF model directory (fp32) that
// transformers, vLLM, llama.cpp converters, ... load without PEFT.
#include <CLI/CLI.hpp>
#include <stdlib.h>  // mkdtemp

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <regex>
#include <stdexcept>

#include "ftune/io/hf_model.hpp"
#include "ftune/model/merge.hpp"
#include "ftune/train/commands.hpp"

namespace fs = std::filesystem;

namespace ftune {
namespace {

// Files that make a model directory usable by a tokenizer / generate(), copied when present.
const char* const kTokenizerFiles[] = {"tokenizer.json",      "tokenizer_config.json",
                                       "special_tokens_map.json", "tokenizer.model",
                                       "vocab.json",          "merges.txt",
                                       "added_tokens.json",   "chat_template.jinja"};

// What a previous export may have left in the output directory; replaced, never merged with.
bool is_export_file(const std::string& name) {
  static const std::regex shard(R"(model-[0-9]+-of-[0-9]+\.safetensors)");
  if (name == "config.json" || name == "generation_config.json" || name == "model.safetensors" ||
      name == "model.safetensors.index.json" || std::regex_match(name, shard))
    return true;
  for (const char* f : kTokenizerFiles)
    if (name == f) return true;
  return false;
}

bool same_dir(const fs::path& a, const fs::path& b) {
  std::error_code ec;
  return fs::exists(a) && fs::exists(b) && fs::equivalent(a, b, ec);
}

// Copies tokenizer files (from tok_dir) and generation_config.json (from model_dir) into out.
int copy_side_files(const fs::path& tok_dir, const fs::path& model_dir, const fs::path& out) {
  int copied = 0;
  if (fs::is_regular_file(tok_dir)) {  // --tokenizer given as a tokenizer.json file
    fs::copy_file(tok_dir, out / "tokenizer.json", fs::copy_options::overwrite_existing);
    ++copied;
  } else {
    for (const char* f : kTokenizerFiles)
      if (fs::is_regular_file(tok_dir / f)) {
        fs::copy_file(tok_dir / f, out / f, fs::copy_options::overwrite_existing);
        ++copied;
      }
  }
  if (fs::is_regular_file(model_dir / "generation_config.json"))
    fs::copy_file(model_dir / "generation_config.json", out / "generation_config.json",
                  fs::copy_options::overwrite_existing);
  return copied;
}

// Moves the finished export `tmp` to `out`: a rename when out is new; otherwise out's old
// export files are removed first (other files in out are left alone).
void install(const fs::path& tmp, const fs::path& out) {
  if (!fs::exists(out)) {
    fs::rename(tmp, out);
    return;
  }
  for (const auto& e : fs::directory_iterator(out))
    if (e.is_regular_file() && is_export_file(e.path().filename().string())) fs::remove(e.path());
  for (const auto& e : fs::directory_iterator(tmp)) fs::rename(e.path(), out / e.path().filename());
  fs::remove(tmp);
}

}  // namespace

int run_export_command(const std::vector<std::string>& args) {
  CLI::App app{"Merge a LoRA adapter into its base model and write an HF model directory "
               "(config.json + fp32 safetensors + tokenizer files)",
               "ftune export"};
  std::string model, adapter, output, tokenizer, max_shard = "5GB";
  bool merge = false, overwrite = false;
  app.add_option("--model", model, "base model directory (HF layout)")->required();
  app.add_option("--adapter", adapter, "PEFT adapter directory (e.g. OUTPUT_DIR/adapter)")
      ->required();
  app.add_option("--output", output, "directory to write")->required();
  app.add_flag("--merge", merge, "fold W + scale * B A into the weights (required)");
  app.add_option("--tokenizer", tokenizer, "copy tokenizer files from here (default: --model)");
  app.add_option("--max_shard_size", max_shard,
                 "split the weights into shards of at most this size, with "
                 "model.safetensors.index.json")->capture_default_str();
  app.add_flag("--overwrite", overwrite, "replace an earlier export in --output");
  std::vector<std::string> rev(args.rbegin(), args.rend());
  try {
    app.parse(rev);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (!merge)
    throw std::runtime_error("only --merge is implemented (an unmerged adapter is already "
                             "exported: its directory is a PEFT adapter as is)");
  const int64_t max_shard_bytes = parse_byte_size(max_shard);
  fs::path out = fs::path(output).lexically_normal();
  if (!out.has_filename()) out = out.parent_path();
  if (same_dir(out, model) || same_dir(out, adapter))
    throw std::runtime_error("--output '" + output + "' is the model or adapter directory");
  if (fs::exists(out) && !fs::is_directory(out))
    throw std::runtime_error("--output '" + output + "' exists and is not a directory");
  if (fs::exists(out) && !fs::is_empty(out) && !overwrite)
    throw std::runtime_error("--output '" + output + "' is not empty; pass --overwrite to replace "
                             "an earlier export there");
  const fs::path tok_dir = tokenizer.empty() ? fs::path(model) : fs::path(tokenizer);
  if (!tokenizer.empty() && !fs::exists(tok_dir))
    throw std::runtime_error("--tokenizer '" + tokenizer + "' not found");

  const ModelConfig cfg = load_model_config(model);
  const LoraAdapter a = load_adapter_dir(adapter, cfg);  // before the (large) weights
  BaseWeights w = load_base_weights(model, cfg);
  merge_lora(w, a);

  if (!out.parent_path().empty()) fs::create_directories(out.parent_path());
  std::string tmp = (out.parent_path() / ("." + out.filename().string() + ".tmp-XXXXXX")).string();
  if (!::mkdtemp(tmp.data()))
    throw std::runtime_error("cannot create a directory next to '" + output + "': " +
                             std::strerror(errno));
  int files = 0, copied = 0;
  try {
    files = save_hf_model_sharded(tmp, w, max_shard_bytes);
    copied = copy_side_files(tok_dir, model, tmp);
    fs::permissions(tmp, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                             fs::perms::others_read | fs::perms::others_exec);
    install(tmp, out);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
  std::cout << "merged " << a.slots.size() << " LoRA projections (r=" << a.spec.rank
            << ", scale " << a.spec.scale() << ") into " << model << "; wrote " << out.string()
            << " (" << w.storage.size() << " parameters, " << files
            << (files == 1 ? " weight file" : " shards") << ")\n";
  if (copied == 0)
    std::cerr << "ftune export: warning: no tokenizer files in '" << tok_dir.string()
              << "' (pass --tokenizer DIR); " << out.string() << " has no tokenizer\n";
  return 0;
}

}  // namespace ftune
