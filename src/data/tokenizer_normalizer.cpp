#include "tokenizer_normalizer.hpp"

#include <nlohmann/json.hpp>

#include <optional>
#include <stdexcept>

#include "tokenizer_regex.hpp"
#include "unicode.hpp"

namespace ftune::tok {
namespace {

// Byte length of the leading (or trailing) Unicode white space of s.
size_t leading_space(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    size_t j = i;
    if (!unicode::is_white_space(unicode::next_code_point_valid(s, j))) break;
    i = j;
  }
  return i;
}
size_t trailing_space(std::string_view s) {
  size_t end = s.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    size_t j = start;
    if (!unicode::is_white_space(unicode::next_code_point_valid(s, j))) break;
    end = start;
  }
  return s.size() - end;
}

}  // namespace

struct Normalizer::Step {
  enum class Kind { NFC, NFD, NFKC, NFKD, Prepend, Replace, Strip };
  explicit Step(Kind k, std::string t = {}) : kind(k), text(std::move(t)) {}
  Kind kind;
  std::string text;            // Prepend: prefix; Replace: content
  std::optional<Regex> regex;  // Replace pattern
  bool left = false, right = false;  // Strip
};

Normalizer::Normalizer(const nlohmann::json& config, const std::string& where) {
  auto add = [&](auto&& self, const nlohmann::json& c) -> void {
    if (c.is_null()) return;
    const std::string type = c.value("type", "");
    using K = Step::Kind;
    if (type == "Sequence") {
      for (const auto& sub : c.at("normalizers")) self(self, sub);
    } else if (type == "NFC") {
      steps_.emplace_back(K::NFC);
    } else if (type == "NFD") {
      steps_.emplace_back(K::NFD);
    } else if (type == "NFKC") {
      steps_.emplace_back(K::NFKC);
    } else if (type == "NFKD") {
      steps_.emplace_back(K::NFKD);
    } else if (type == "Prepend") {
      steps_.emplace_back(K::Prepend, c.at("prepend").get<std::string>());
    } else if (type == "Replace") {
      Step s(K::Replace, c.at("content").get<std::string>());
      const auto& pat = c.at("pattern");
      if (pat.contains("String")) s.regex.emplace(pat["String"].get<std::string>(), true);
      else if (pat.contains("Regex")) s.regex.emplace(pat["Regex"].get<std::string>(), false);
      else throw std::runtime_error(where + ": Replace normalizer pattern must be String or Regex");
      steps_.push_back(std::move(s));
    } else if (type == "Strip") {
      Step s(K::Strip);
      s.left = c.value("strip_left", true);
      s.right = c.value("strip_right", true);
      steps_.push_back(std::move(s));
    } else {
      throw std::runtime_error(where + ": normalizer '" + type + "' is not supported");
    }
  };
  add(add, config);
}

Normalizer::~Normalizer() = default;
Normalizer::Normalizer(Normalizer&&) noexcept = default;

std::string_view Normalizer::apply(std::string_view in, std::string& buffer) const {
  std::string_view cur = in;
  // A changed result moves into `buffer` (built before the move, so `cur` may view it).
  auto set = [&](std::string&& s) {
    buffer = std::move(s);
    cur = buffer;
  };
  using K = Step::Kind;
  for (const Step& s : steps_) {
    switch (s.kind) {
      case K::NFC:
        if (std::string out; unicode::nfc_if_changed(cur, out)) set(std::move(out));
        break;
      case K::NFD:
        set(unicode::normalize(cur, unicode::NormalForm::NFD));
        break;
      case K::NFKC:
        set(unicode::normalize(cur, unicode::NormalForm::NFKC));
        break;
      case K::NFKD:
        set(unicode::normalize(cur, unicode::NormalForm::NFKD));
        break;
      case K::Prepend:
        if (!cur.empty()) set(s.text + std::string(cur));  // HF skips empty strings
        break;
      case K::Replace:
        set(s.regex->replace_all(cur, s.text));
        break;
      case K::Strip: {
        const size_t l = s.left ? leading_space(cur) : 0;
        const size_t r = s.right ? trailing_space(cur.substr(l)) : 0;
        cur = cur.substr(l, cur.size() - l - r);  // a view of in or buffer: no copy needed
        break;
      }
    }
  }
  return cur;
}

}  // namespace ftune::tok
