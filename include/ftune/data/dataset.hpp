#pragma once
// data module: text datasets for SFT and continued pretraining, tokenized the way MedicalGPT
// (shibing624/MedicalGPT: supervised_finetuning.py, template.py, pretraining.py) does, with
// an HDF5 cache of the result.
//
// Every *.jsonl / *.json file under the given directories is read in sorted path order (a
// .json file may be JSON Lines, one JSON array of records, or one record). The format is
// detected per record:
//   ShareGPT  {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
//             also "user"/"assistant" roles, "role"/"content" keys, "messages" instead of
//             "conversations", and an optional top-level "system_prompt" or "system";
//   Alpaca    {"instruction", "input", "output"} (one turn; "input" alone = a QA pair);
//   text      {"text": ...} for continued pretraining (every token has a label);
//   tokens    {"input_ids": [...], "labels": [...]} already tokenized (labels optional).
// See src/data/dataset_encode.cpp for the exact encoding and truncation rules.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "ftune/model/batch.hpp"

namespace ftune {

class Tokenizer;

// A MedicalGPT conversation template (template.py's Conversation): the first prompt is
// system + sep + prompt(query), later prompts are sep + prompt(query); answers follow as is.
struct ChatTemplate {
  std::string name;
  std::string system_prompt;  // default when the record has none ("" = no system part)
  std::string prompt;         // contains "{query}" once
  std::string sep;
  std::string stop_str;       // eos fallback when the tokenizer defines no eos token

  // Conversation.get_dialog: [prompt_0, answer_0, prompt_1, answer_1, ...]. A non-empty
  // `system` replaces system_prompt.
  std::vector<std::string> render(const std::vector<std::pair<std::string, std::string>>& turns,
                                  const std::string& system = "") const;
};

// The template called `name`; an unknown name throws listing the valid ones.
const ChatTemplate& get_chat_template(const std::string& name);
std::vector<std::string> chat_template_names();  // sorted

struct DatasetOptions {
  std::vector<std::string> dirs;         // directories or files (train_file_dir, ...)
  const Tokenizer* tokenizer = nullptr;  // may be null when every record is pre-tokenized
  std::string tokenizer_path;            // dir (or tokenizer.json) it came from: cache key
  std::string template_name = "vicuna";
  int64_t max_length = 2048;             // model_max_length
  bool train_on_inputs = false;
  int64_t max_samples = -1;              // > 0: keep the first max_samples examples
  bool skip_bad_examples = false;        // malformed records are skipped and counted
  int num_workers = 1;                   // tokenizer threads (preprocessing_num_workers)
  std::string cache_dir;                 // "" = no cache
  bool progress = false;                 // progress bar on stderr while tokenizing
};

struct DatasetStats {
  int64_t records = 0;            // records read (JSONL lines / array elements)
  int64_t examples = 0;           // examples returned
  int64_t skipped = 0;            // malformed records skipped (skip_bad_examples)
  int64_t no_pairs = 0;           // conversations without a complete user/assistant pair
  int64_t truncated = 0;          // examples cut to max_length (turns dropped or shortened)
  int64_t dropped_no_labels = 0;  // examples left with no label to learn (all -100)
  int64_t tokens = 0;             // input tokens of the returned examples
  int64_t label_tokens = 0;       // labels != -100 among them
  bool cache_hit = false;
};

// Reads, tokenizes (or loads from cache_dir) and returns the examples in file order.
// Throws "<file>:<line>: <what is wrong>" for a malformed record (unless skip_bad_examples),
// and a clear error when no example is left.
std::vector<Example> load_dataset(const DatasetOptions& opt, DatasetStats* stats = nullptr);

// "<cache_dir>/<key>.h5" for these options ("" when cache_dir is empty). The key hashes the
// data files' paths, sizes and mtimes, the tokenizer files, template, max length,
// train_on_inputs, max_samples, skip_bad_examples and the cache format version.
std::string dataset_cache_path(const DatasetOptions& opt);
// True when that file exists and was written for exactly these inputs (for "rank 0 builds,
// the others wait and read").
bool dataset_cache_exists(const DatasetOptions& opt);

// Splits off the last `percentage`% of `examples` (file order, unshuffled) as a validation
// set: floor(n * percentage / 100) examples, at least 1 when percentage > 0 and n >= 2, and
// always leaving at least 1 for training. Returns {train, validation}.
std::pair<std::vector<Example>, std::vector<Example>> split_validation(
    std::vector<Example> examples, double percentage);

}  // namespace ftune
