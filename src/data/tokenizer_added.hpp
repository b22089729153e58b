#pragma once
// Private to the data module: added tokens (tokenizer.json "added_tokens") found in the text
// before the model runs, as HF AddedVocabulary: leftmost-longest matching, honouring
// single_word / lstrip / rstrip.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ftune::tok {

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
};

class AddedTokenMatcher {
 public:
  // `patterns[i]` is the text searched for `tokens[i]` (the content, normalized when the
  // token is matched on normalized text).
  void add(const AddedToken& token, std::string pattern);
  bool empty() const { return patterns_.empty(); }

  struct Segment {
    size_t begin, end;
    int32_t id;  // -1: plain text for the model
  };
  // Splits `text` into plain-text and token segments, in order; empty text is dropped.
  void split(std::string_view text, std::vector<Segment>& out) const;

 private:
  struct Pattern {
    std::string text;
    AddedToken token;
  };
  // Longest pattern matching at text[pos], or nullptr.
  const Pattern* longest_at(std::string_view text, size_t pos) const;
  std::vector<Pattern> patterns_;
  std::vector<std::vector<uint32_t>> by_first_byte_ = std::vector<std::vector<uint32_t>>(256);
};

}  // namespace ftune::tok
