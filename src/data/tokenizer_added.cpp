#include "tokenizer_added.hpp"

#include <algorithm>
#include <cstring>

#include "unicode.hpp"

namespace ftune::tok {

void AddedTokenMatcher::add(const AddedToken& token, std::string pattern) {
  if (pattern.empty()) return;
  const auto first = static_cast<unsigned char>(pattern[0]);
  patterns_.push_back({std::move(pattern), token});
  auto& bucket = by_first_byte_[first];
  bucket.push_back(static_cast<uint32_t>(patterns_.size() - 1));
  // Longest first, so the first hit at a position is the leftmost-longest match.
  std::stable_sort(bucket.begin(), bucket.end(), [&](uint32_t a, uint32_t b) {
    return patterns_[a].text.size() > patterns_[b].text.size();
  });
}

const AddedTokenMatcher::Pattern* AddedTokenMatcher::longest_at(std::string_view text,
                                                                size_t pos) const {
  for (uint32_t i : by_first_byte_[static_cast<unsigned char>(text[pos])]) {
    const std::string& p = patterns_[i].text;
    if (text.size() - pos >= p.size() && std::memcmp(text.data() + pos, p.data(), p.size()) == 0)
      return &patterns_[i];
  }
  return nullptr;
}

namespace {
// Last / first code point of s (s non-empty, valid UTF-8).
char32_t last_code_point(std::string_view s) {
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return unicode::next_code_point_valid(s, i);
}
char32_t first_code_point(std::string_view s) {
  size_t i = 0;
  return unicode::next_code_point_valid(s, i);
}
}  // namespace

void AddedTokenMatcher::split(std::string_view text, std::vector<Segment>& out) const {
  size_t emitted = 0;  // end of the last segment pushed
  auto push_text = [&](size_t b, size_t e) {
    if (e > b) out.push_back({b, e, -1});
  };
  for (size_t pos = 0; pos < text.size();) {
    const auto c = static_cast<unsigned char>(text[pos]);
    const Pattern* m = by_first_byte_[c].empty() ? nullptr : longest_at(text, pos);
    if (!m) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + m->text.size();
    pos = stop;  // a rejected match still consumes its bytes, as HF's matcher does
    const AddedToken& t = m->token;
    if (t.single_word) {
      const bool word_before = start > 0 && unicode::is_word_char(last_code_point(text.substr(0, start)));
      const bool word_after = stop < text.size() && unicode::is_word_char(first_code_point(text.substr(stop)));
      if (word_before || word_after) continue;
    }
    if (t.lstrip) {
      while (start > emitted) {
        size_t b = start - 1;
        while (b > 0 && (static_cast<unsigned char>(text[b]) & 0xC0) == 0x80) --b;
        size_t j = b;
        if (!unicode::is_white_space(unicode::next_code_point_valid(text, j))) break;
        start = b;
      }
    }
    if (t.rstrip) {
      while (stop < text.size()) {
        size_t j = stop;
        if (!unicode::is_white_space(unicode::next_code_point_valid(text, j))) break;
        stop = j;
      }
      pos = stop;
    }
    push_text(emitted, start);
    out.push_back({start, stop, t.id});
    emitted = stop;
  }
  push_text(emitted, text.size());
}

}  // namespace ftune::tok
