#pragma once
// data module: Hugging Face `tokenizer.json` tokenizers (BPE model) in C++, no Python at
// run time. Supports byte-level BPE (GPT-2 / Qwen style: Split regex + ByteLevel) and
// SentencePiece-style BPE (Llama style: Prepend/Replace "▁", byte_fallback), NFC, added and
// special tokens, decoding. Anything else in the file (WordPiece, Unigram, an unknown
// normalizer/pre-tokenizer/decoder) is refused with the file and component named.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ftune {

class Tokenizer {
 public:
  // dir/tokenizer.json plus, when present, dir/tokenizer_config.json (bos/eos/pad tokens as
  // strings or AddedToken dicts, add_bos_token / add_eos_token).
  static Tokenizer from_dir(const std::string& dir);
  // tokenizer.json alone; add_special_tokens then follows its TemplateProcessing
  // post-processor, if any.
  static Tokenizer from_file(const std::string& tokenizer_json);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Ids of `text`, identical to HF `tokenizer.encode(text, add_special_tokens=...).ids`.
  // add_special_tokens adds bos/eos as the config (or post-processor) says. Invalid UTF-8
  // is replaced by U+FFFD first. Thread-safe (const; per-thread word caches).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = false) const;
  // encode() of every text, in order, on up to num_threads threads (<= 0: all cores).
  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string>& texts,
                                                 int num_threads,
                                                 bool add_special_tokens = false) const;
  // Text of `ids` through the file's decoder, as HF `tokenizer.decode` (unknown ids are
  // skipped, as HF does).
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  int32_t token_to_id(std::string_view token) const;  // -1 when absent
  std::string id_to_token(int32_t id) const;          // "" when absent
  // 1 + the largest id of the model vocabulary and the added tokens (the id range; the
  // model's embedding table may be larger).
  int64_t vocab_size() const;
  int32_t bos_id() const;  // -1 when absent
  int32_t eos_id() const;
  int32_t pad_id() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// `ftune tokenize --tokenizer DIR --input IN.jsonl --output OUT.jsonl [--num_threads N]`:
// every input line {"text": ...} becomes {"ids": [...]} (no special tokens), same order.
// `args` are the words after "tokenize". Returns 0 on success (and for --help), 2 on any
// error (printed to stderr, malformed lines named as file:line).
int run_tokenize_command(const std::vector<std::string>& args);

}  // namespace ftune
