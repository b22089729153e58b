#pragma once
// Private to the data module: a PCRE2 regex (UTF + UCP, JIT when available) with the
// match-iteration semantics HF tokenizers gets from Oniguruma.
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ftune::tok {

// Makes a pattern written for Oniguruma (HF tokenizers' regex engine, Unicode 16) match the
// same under PCRE2 10.42 (Unicode 14): \s / \S become Unicode White_Space (PCRE2's UCP \s
// also matches U+180E) and, with `new_letters`, \p{L} / \p{N} gain the letters and numbers
// of Unicode 15-16.
std::string translate_oniguruma_pattern(std::string_view pattern, bool new_letters);
// True when valid UTF-8 `s` holds a letter or number of Unicode 15-16.
bool has_new_letters(std::string_view s);

class Regex {
 public:
  // `literal`: match the pattern text exactly (HF's {"String": ...} patterns).
  Regex(std::string_view pattern, bool literal);
  ~Regex();
  Regex(Regex&& o) noexcept;
  Regex& operator=(Regex&& o) noexcept;
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Every non-overlapping match of valid UTF-8 `s` as (start, end), left to right, into
  // `out` (cleared first). Like Oniguruma's find_iter, an empty match right after the
  // previous match is skipped.
  void find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const;

  // Matches as (start, end, is_match) covering all of `s` (HF Pattern::find_matches).
  std::vector<std::pair<std::pair<size_t, size_t>, bool>> find_matches(std::string_view s) const;
  // Every match replaced by `content` (HF Replace normalizer/decoder).
  std::string replace_all(std::string_view s, std::string_view content) const;

 private:
  void* code_ = nullptr;        // pcre2_code_8*: Oniguruma's \s, PCRE2's \p{L} / \p{N}
  void* exact_code_ = nullptr;  // same with Unicode 16 \p{L} / \p{N}; null when equal
  bool jit_ = false, exact_jit_ = false;
  std::string source_;
};

}  // namespace ftune::tok
