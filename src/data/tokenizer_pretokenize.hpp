#pragma once
// Private to the data module: tokenizer.json pre-tokenizers (Split, ByteLevel, Metaspace,
// Digits, Sequence). Words stay raw UTF-8: the ByteLevel byte->code point mapping is folded
// into the BPE model's vocabulary instead, so ByteLevel must be the last step.
#include <nlohmann/json_fwd.hpp>

#include <deque>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer_regex.hpp"

namespace ftune::tok {

class PreTokenizer {
 public:
  // `config` is tokenizer.json's "pre_tokenizer" (null: the whole segment is one word).
  PreTokenizer(const nlohmann::json& config, const std::string& where);
  ~PreTokenizer();
  PreTokenizer(PreTokenizer&&) noexcept;

  // True when a ByteLevel step is present: the model then works on bytes.
  bool byte_level() const { return byte_level_; }

  // Splits one normalized segment into words (views into `text` or into `storage`).
  // `at_text_start`: the segment begins the input (Metaspace prepend_scheme "first").
  void split(std::string_view text, bool at_text_start, std::vector<std::string_view>& words,
             std::deque<std::string>& storage) const;

  struct Step;

 private:
  std::vector<Step> steps_;
  bool byte_level_ = false;
};

}  // namespace ftune::tok
