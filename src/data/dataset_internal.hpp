#pragma once
// Private pieces of the text dataset pipeline (include/ftune/data/dataset.hpp), split by
// stage: reading records from files, parsing one record, encoding it, and the HDF5 cache.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ftune/data/dataset.hpp"

namespace ftune::dataset {

constexpr int32_t kIgnoreIndex = -100;  // HF LabelSmoother.ignore_index

// ---- reading (dataset_files.cpp)

// One record's JSON text and where it came from.
struct RawRecord {
  std::string file;
  int64_t line = 0;  // 1-based line where the record starts
  std::string json;  // the record's text ("" after a structural error: see error)
  std::string error; // set when the file itself is broken at this point
  std::string where() const { return file + ":" + std::to_string(line); }
};

// Streams records from the data files in order, a batch at a time. JSONL is read line by
// line; a .json file holding a JSON array (or one object) is read whole and split into its
// top-level elements, each keeping its start line.
class RecordReader {
 public:
  explicit RecordReader(std::vector<std::string> files);
  // Appends up to `max` records to `out`; false when every file is exhausted.
  bool next_batch(size_t max, std::vector<RawRecord>& out);
  uint64_t bytes_total() const { return bytes_total_; }
  uint64_t bytes_done() const;

 private:
  bool open_next();
  std::vector<std::string> files_;
  size_t next_file_ = 0;
  std::string current_;
  mutable std::ifstream in_;  // JSONL being streamed (tellg() is not const)
  int64_t line_ = 0;
  std::vector<RawRecord> pending_;  // elements of a whole-file JSON not yet handed out
  size_t pending_pos_ = 0;
  uint64_t bytes_total_ = 0, bytes_before_current_ = 0, current_size_ = 0;
};

// Splits a JSON array document into its top-level elements (text and start line). Throws
// "line N: ..." when the brackets/strings do not balance.
std::vector<std::pair<std::string, int64_t>> split_json_array(const std::string& doc);

// ---- parsing one record (dataset_formats.cpp)

enum class RecordKind { Chat, Text, Tokens };

struct ParsedRecord {
  RecordKind kind = RecordKind::Chat;
  // Chat (ShareGPT / Alpaca): the human/assistant pairs MedicalGPT's get_dialog keeps.
  std::vector<std::pair<std::string, std::string>> turns;
  std::string system;
  bool no_pairs = false;  // a conversation with no complete pair (MedicalGPT drops it)
  std::string text;       // Text
  Example tokens;         // Tokens
};

// Detects the format and extracts it; throws std::runtime_error("<where>: <what is wrong>")
// for a malformed record.
ParsedRecord parse_record(const nlohmann::json& j, const std::string& where);

// ---- encoding (dataset_encode.cpp)

struct EncodeContext {
  const Tokenizer* tokenizer = nullptr;
  const ChatTemplate* chat_template = nullptr;
  int32_t eos = -1;
  int64_t max_length = 0;
  bool train_on_inputs = false;
};

struct Encoded {
  std::vector<Example> examples;
  bool truncated = false;
};

// MedicalGPT's supervised_finetuning.py preprocess_function for one dialog.
Encoded encode_chat(const EncodeContext& ctx, const ParsedRecord& rec);
// pretraining.py: bos (if the tokenizer adds one) + text + eos, cut into max_length blocks.
Encoded encode_text(const EncodeContext& ctx, const std::string& text);
// Pre-tokenized: truncated to max_length.
Encoded encode_tokens(const EncodeContext& ctx, Example ex);
// True when some position t >= 1 has a label (HF shifts labels by one, so labels[0] never
// contributes to the loss).
bool has_trainable_label(const Example& ex);

// ---- cache (dataset_cache.cpp)

// Canonical description of everything the tokenized result depends on; its hash names the
// cache file and the full text is stored inside it to rule out collisions.
std::string cache_description(const DatasetOptions& opt, const std::vector<std::string>& files);
std::string cache_file_for(const DatasetOptions& opt, const std::string& description);
// True when `path` is a complete cache for `description` (reads only its header).
bool cache_is_valid(const std::string& path, const std::string& description);
// Reads a cache written for `description`; false when absent, stale or unreadable.
bool read_cache(const std::string& path, const std::string& description,
                std::vector<Example>& examples, DatasetStats& stats);
// Writes atomically (temporary file + rename).
void write_cache(const std::string& path, const std::string& description,
                 const std::vector<Example>& examples, const DatasetStats& stats);

uint64_t fnv1a64(const void* data, size_t n, uint64_t h = 0xcbf29ce484222325ull);

}  // namespace ftune::dataset

namespace ftune {
// Defined in pretokenized.cpp (shared with read_pretokenized): one {"input_ids", "labels"}
// object to an Example, errors prefixed with `where`.
Example parse_pretokenized_example(const nlohmann::json& j, const std::string& where);
}  // namespace ftune
