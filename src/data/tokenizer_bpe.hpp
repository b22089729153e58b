#pragma once
// Private to the data module: the BPE model of a tokenizer.json (HF tokenizers' BPE,
// without dropout), with a merge-rank hash map, a linked-list merge loop (linear scan for
// short words, a priority queue for long ones) and a per-thread word -> ids cache.
#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace ftune::tok {

// Open-addressing map (a, b) -> (rank, merged id) for the merge loop's hot lookups.
class MergeMap {
 public:
  struct Value {
    uint32_t rank;
    int32_t id;
  };
  void reserve(size_t n);
  void insert(int32_t a, int32_t b, Value v);  // a later insert of the same pair wins
  const Value* find(int32_t a, int32_t b) const {
    if (slots_.empty()) return nullptr;
    const uint64_t key = make_key(a, b);
    for (size_t i = slot_of(key);; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key == key) return &s.value;
      if (s.key == kEmpty) return nullptr;
    }
  }
  size_t size() const { return count_; }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  struct Slot {
    uint64_t key = kEmpty;
    Value value{};
  };
  static uint64_t make_key(int32_t a, int32_t b) {
    return (uint64_t{static_cast<uint32_t>(a)} << 32) | static_cast<uint32_t>(b);
  }
  size_t slot_of(uint64_t key) const { return (key * 0x9E3779B97F4A7C15ULL) >> shift_; }
  std::vector<Slot> slots_;
  size_t mask_ = 0, count_ = 0;
  int shift_ = 64;
};

class BpeModel {
 public:
  // `model` is tokenizer.json's "model" object (type BPE). `byte_level`: the pre-tokenizer
  // maps bytes to GPT-2 code points, so words are split into bytes, not characters.
  // `where` names the file in error messages.
  BpeModel(const nlohmann::json& model, bool byte_level, const std::string& where);
  ~BpeModel();
  BpeModel(BpeModel&&) noexcept;
  BpeModel(const BpeModel&) = delete;
  BpeModel& operator=(const BpeModel&) = delete;

  // Appends the ids of one pre-tokenized word (raw UTF-8 bytes) to `out`.
  void tokenize(std::string_view word, std::vector<int32_t>& out) const;

  int32_t token_to_id(std::string_view token) const;  // -1 when absent
  const std::string* id_to_token(int32_t id) const;   // nullptr when absent
  int64_t id_limit() const { return static_cast<int64_t>(id_to_token_.size()); }

 private:
  struct Symbol {
    int32_t id, prev, next;
  };
  void initial_symbols(std::string_view word, std::vector<Symbol>& syms) const;
  void push_char(std::string_view ch, bool first, bool last, std::vector<Symbol>& syms) const;
  void merge_small(std::vector<Symbol>& syms) const;
  void merge_large(std::vector<Symbol>& syms) const;
  void tokenize_uncached(std::string_view word, std::vector<int32_t>& out) const;
  void tokenize_piece(std::string_view piece, std::vector<int32_t>& out) const;
  int32_t char_id(char32_t cp) const;

  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  MergeMap merges_;
  bool byte_level_;
  bool ignore_merges_ = false, byte_fallback_ = false, fuse_unk_ = false;
  int32_t unk_id_ = -1;
  std::string prefix_, suffix_;  // continuing_subword_prefix, end_of_word_suffix
  // A character c (e.g. "▁") that no merge can join to a preceding non-c character: words
  // are cut before each such c, which gives the same ids (see tokenize()) with short,
  // cacheable pieces for models without a pre-tokenizer. Empty when there is none.
  std::string boundary_;
  int32_t byte_ids_[256];        // byte-level: id of each byte's code point token
  int32_t fallback_ids_[256];    // byte_fallback: id of "<0xXX>"
  std::vector<int32_t> bmp_ids_;                  // char-level: id of each BMP char token
  std::unordered_map<char32_t, int32_t> astral_ids_;
  uint64_t instance_id_;  // keys the per-thread word cache
};

}  // namespace ftune::tok
