// `ftune generate`: a quick look at what training did. Loads the base model, merges the
// adapter into it (exact up to fp32 rounding, and no LoRA cost per token), and decodes on the
// CPU with a KV cache.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <stdexcept>

#include "ftune/data/dataset.hpp"
#include "ftune/data/tokenizer.hpp"
#include "ftune/io/hf_model.hpp"
#include "ftune/model/generate.hpp"
#include "ftune/model/merge.hpp"
#include "ftune/train/commands.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace ftune {
namespace {

// --tokenizer (a directory or a tokenizer.json), else the model directory.
Tokenizer load_tokenizer_for(const std::string& tokenizer, const std::string& model) {
  const fs::path p = tokenizer.empty() ? fs::path(model) : fs::path(tokenizer);
  if (fs::is_regular_file(p)) return Tokenizer::from_file(p.string());
  if (fs::exists(p / "tokenizer.json")) return Tokenizer::from_dir(p.string());
  if (tokenizer.empty())
    throw std::runtime_error("model directory '" + model +
                             "' has no tokenizer.json; pass --tokenizer DIR");
  throw std::runtime_error("--tokenizer '" + tokenizer + "' has no tokenizer.json");
}

// Ids that end generation: the tokenizer's eos, config.json's and generation_config.json's
// eos_token_id (an id or a list), and the chat template's stop string when it is one token.
std::vector<int32_t> stop_ids_for(const Tokenizer& tok, const ModelConfig& cfg,
                                  const std::string& model, const ChatTemplate* tmpl) {
  std::vector<int32_t> ids;
  auto add = [&](int64_t id) {
    if (id >= 0 && std::find(ids.begin(), ids.end(), id) == ids.end())
      ids.push_back(static_cast<int32_t>(id));
  };
  add(tok.eos_id());
  add(cfg.eos_token_id);
  const fs::path gen_cfg = fs::path(model) / "generation_config.json";
  if (fs::is_regular_file(gen_cfg)) {
    std::ifstream in(gen_cfg);
    const json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
    const json e = j.is_object() && j.contains("eos_token_id") ? j["eos_token_id"] : json();
    if (e.is_number_integer()) add(e.get<int64_t>());
    if (e.is_array())
      for (const auto& x : e)
        if (x.is_number_integer()) add(x.get<int64_t>());
  }
  if (tmpl && !tmpl->stop_str.empty()) add(tok.token_to_id(tmpl->stop_str));
  return ids;
}

struct Session {
  const Tokenizer& tok;
  CpuGenerator& gen;
  const GenerateOptions& opts;
  const ChatTemplate* tmpl;

  // Prompt text -> completion text, with a timing line on stderr.
  std::string complete(const std::string& prompt) {
    // The first turn of a conversation, encoded as the training data was (special tokens on).
    const std::string text = tmpl ? tmpl->render({{prompt, ""}}).at(0) : prompt;
    const std::vector<int32_t> ids = tok.encode(text, /*add_special_tokens=*/true);
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<int32_t> out = gen.generate(ids, opts);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cerr << "[ftune] prompt " << ids.size() << " tokens, generated " << out.size()
              << " tokens in " << s << " s\n";
    return tok.decode(out, /*skip_special_tokens=*/true);
  }
};

// --input: {"prompt": ...} per line -> {"prompt": ..., "completion": ...} per line on stdout.
void run_jsonl(Session& session, const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error(file + ": cannot open file");
  std::string line;
  for (int64_t lineno = 1; std::getline(in, line); ++lineno) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = file + ":" + std::to_string(lineno) + ": ";
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      throw std::runtime_error(where + "invalid JSON: " + e.what());
    }
    if (!j.is_object() || !j.contains("prompt") || !j["prompt"].is_string())
      throw std::runtime_error(where + "expected a JSON object with a string field \"prompt\"");
    const std::string prompt = j["prompt"].get<std::string>();
    using ojson = nlohmann::ordered_json;  // keys in the order written: prompt, completion
    const ojson out = {{"prompt", prompt}, {"completion", session.complete(prompt)}};
    // A completion may end inside a multi-byte character: replace rather than fail.
    std::cout << out.dump(-1, ' ', false, ojson::error_handler_t::replace) << "\n" << std::flush;
  }
}

}  // namespace

int run_generate_command(const std::vector<std::string>& args) {
  CLI::App app{"Generate text with a model (and optionally a LoRA adapter) on the CPU",
               "ftune generate"};
  std::string model, adapter, tokenizer, prompt, input, template_name;
  GenerateOptions opts;
  app.add_option("--model", model, "model directory (HF layout)")->required();
  app.add_option("--adapter", adapter, "PEFT adapter directory, merged into the model first");
  app.add_option("--tokenizer", tokenizer,
                 "tokenizer directory or tokenizer.json (default: --model)");
  auto* p = app.add_option("--prompt", prompt, "prompt text; the completion is printed");
  auto* i = app.add_option("--input", input,
                           "JSONL file of {\"prompt\": ...} lines; prints "
                           "{\"prompt\": ..., \"completion\": ...} lines");
  p->excludes(i);
  app.add_option("--template", template_name,
                 "wrap the prompt in this chat template (first turn, default system prompt)");
  app.add_option("--max_new_tokens", opts.max_new_tokens)->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--temperature", opts.sampling.temperature, "0 = greedy")->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--top_p", opts.sampling.top_p)->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--top_k", opts.sampling.top_k, "0 = no limit")->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--seed", opts.sampling.seed, "sampling seed (each prompt starts from it)")
      ->capture_default_str();
  std::vector<std::string> rev(args.rbegin(), args.rend());
  try {
    app.parse(rev);
    if (p->count() == 0 && i->count() == 0)
      throw CLI::RequiredError("one of --prompt or --input");
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  const ChatTemplate* tmpl = template_name.empty() ? nullptr : &get_chat_template(template_name);
  const bool jsonl = i->count() > 0;
  if (jsonl && !fs::is_regular_file(input))
    throw std::runtime_error("--input '" + input + "' not found");

  const ModelConfig cfg = load_model_config(model);
  std::optional<LoraAdapter> lora;
  if (!adapter.empty()) lora = load_adapter_dir(adapter, cfg);  // fail fast, before the weights
  const Tokenizer tok = load_tokenizer_for(tokenizer, model);
  BaseWeights w = load_base_weights(model, cfg);
  if (lora) merge_lora(w, *lora);
  opts.stop_ids = stop_ids_for(tok, cfg, model, tmpl);
  opts.vocab_limit = tok.vocab_size();

  CpuGenerator gen(w);
  Session session{tok, gen, opts, tmpl};
  if (jsonl)
    run_jsonl(session, input);
  else
    std::cout << session.complete(prompt) << "\n" << std::flush;
  return 0;
}

}  // namespace ftune
