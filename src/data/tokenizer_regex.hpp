#pragma once
// Private to the data module: a PCRE2 regex (UTF + UCP, JIT when available) with the
// match-iteration semantics HF tokenizers gets from Oniguruma.
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ftune::tok {

// Rewrites \s and \S (outside character classes; \s also inside) to Unicode White_Space,
// which is what Oniguruma uses. PCRE2's UCP \s also matches U+180E.
std::string translate_oniguruma_pattern(std::string_view pattern);

class Regex {
 public:
  // `literal`: match the pattern text exactly (HF's {"String": ...} patterns).
  Regex(std::string_view pattern, bool literal);
  ~Regex();
  Regex(Regex&& o) noexcept;
  Regex& operator=(Regex&& o) noexcept;
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Calls fn(start, end) for every non-overlapping match of valid UTF-8 `s`, left to right.
  // Like Oniguruma's find_iter: an empty match right after the previous match is skipped.
  template <class Fn>
  void for_each_match(std::string_view s, Fn&& fn) const {
    size_t pos = 0, last_end = std::string_view::npos;
    while (pos <= s.size()) {
      size_t b, e;
      if (!find(s, pos, b, e)) return;
      if (b == e && e == last_end) {  // empty match glued to the last one: step one char
        if (pos >= s.size()) return;
        pos += utf8_len(s[pos]);
        continue;
      }
      fn(b, e);
      last_end = e;
      pos = e;  // an empty match re-finds itself at e next time; the check above steps on
    }
  }

  // Matches as (start, end, is_match) covering all of `s` (HF Pattern::find_matches).
  std::vector<std::pair<std::pair<size_t, size_t>, bool>> find_matches(std::string_view s) const;
  // Every match replaced by `content` (HF Replace normalizer/decoder).
  std::string replace_all(std::string_view s, std::string_view content) const;

 private:
  bool find(std::string_view s, size_t from, size_t& b, size_t& e) const;
  static size_t utf8_len(char lead) {
    const auto c = static_cast<unsigned char>(lead);
    return c < 0xC0 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  }
  void* code_ = nullptr;  // pcre2_code_8*
  bool jit_ = false;
  std::string source_;
};

}  // namespace ftune::tok
