#pragma once
// data module: pre-tokenized JSONL datasets, one example per line:
//   {"input_ids": [...], "labels": [...]}   (labels optional: then every token counts)
// Directories are searched recursively for *.jsonl and *.json, read in sorted path order.
#include <cstdint>
#include <string>
#include <vector>

#include "ftune/model/batch.hpp"

namespace ftune {

// Every data file under the given directories (or files), sorted; throws naming a missing path.
std::vector<std::string> list_data_files(const std::vector<std::string>& dirs);

struct PretokenizedOptions {
  int64_t max_length = 0;    // > 0: truncate longer examples to this many tokens
  int64_t max_samples = -1;  // >= 0: keep only the first max_samples examples
};

// Reads every example; a malformed line throws "<file>:<line>: <what is wrong>".
std::vector<Example> read_pretokenized(const std::vector<std::string>& dirs,
                                       const PretokenizedOptions& opt);

}  // namespace ftune
