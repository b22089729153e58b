#include "tokenizer_decoder.hpp"

#include <nlohmann/json.hpp>

#include <optional>
#include <stdexcept>

#include "tokenizer_regex.hpp"
#include "unicode.hpp"

namespace ftune::tok {
namespace {

using Tokens = std::vector<std::string>;

// Tokens' code points back to bytes; a token with a code point outside the map keeps its
// UTF-8 bytes (HF does the same). The bytes are then read as lossy UTF-8.
Tokens byte_level(const Tokens& tokens) {
  std::string bytes;
  for (const std::string& t : tokens) {
    const size_t mark = bytes.size();
    bool mapped = true;
    for (size_t i = 0; i < t.size();) {
      char32_t cp;
      const int b = unicode::next_code_point(t, i, cp) ? unicode::unicode_to_byte(cp) : -1;
      if (b < 0) {
        mapped = false;
        break;
      }
      bytes.push_back(static_cast<char>(b));
    }
    if (!mapped) {
      bytes.resize(mark);
      bytes += t;
    }
  }
  return {unicode::to_valid_utf8(bytes)};
}

// "<0xAB>" -> 0xAB, else -1.
int byte_token(const std::string& t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  auto hex = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int hi = hex(t[3]), lo = hex(t[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

// Runs of byte tokens become their UTF-8 text, or one U+FFFD per byte when invalid.
Tokens byte_fallback(const Tokens& tokens) {
  Tokens out;
  std::string pending;
  auto flush = [&] {
    if (pending.empty()) return;
    if (unicode::is_valid_utf8(pending)) {
      out.push_back(pending);
    } else {
      for (size_t i = 0; i < pending.size(); ++i) out.push_back("\xEF\xBF\xBD");
    }
    pending.clear();
  };
  for (const std::string& t : tokens) {
    if (const int b = byte_token(t); b >= 0) {
      pending.push_back(static_cast<char>(b));
    } else {
      flush();
      out.push_back(t);
    }
  }
  flush();
  return out;
}

}  // namespace

struct Decoder::Step {
  enum class Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace };
  explicit Step(Kind k) : kind(k) {}
  Kind kind;
  std::optional<Regex> regex;  // Replace pattern
  std::string content;         // Replace content; Strip char; Metaspace replacement
  size_t start = 0, stop = 0;  // Strip
  bool prepend = true;         // Metaspace: prepend_scheme != never
};

Decoder::Decoder(const nlohmann::json& config, const std::string& where) {
  present_ = !config.is_null();
  auto add = [&](auto&& self, const nlohmann::json& c) -> void {
    const std::string type = c.value("type", "");
    using K = Step::Kind;
    if (type == "Sequence") {
      for (const auto& sub : c.at("decoders")) self(self, sub);
    } else if (type == "ByteLevel") {
      steps_.emplace_back(K::ByteLevel);
    } else if (type == "ByteFallback") {
      steps_.emplace_back(K::ByteFallback);
    } else if (type == "Fuse") {
      steps_.emplace_back(K::Fuse);
    } else if (type == "Replace") {
      Step s(K::Replace);
      s.content = c.at("content").get<std::string>();
      const auto& pat = c.at("pattern");
      if (pat.contains("String")) s.regex.emplace(pat["String"].get<std::string>(), true);
      else if (pat.contains("Regex")) s.regex.emplace(pat["Regex"].get<std::string>(), false);
      else throw std::runtime_error(where + ": Replace decoder pattern must be String or Regex");
      steps_.push_back(std::move(s));
    } else if (type == "Strip") {
      Step s(K::Strip);
      s.content = c.at("content").get<std::string>();
      s.start = c.value("start", size_t{0});
      s.stop = c.value("stop", size_t{0});
      steps_.push_back(std::move(s));
    } else if (type == "Metaspace") {
      Step s(K::Metaspace);
      s.content = c.value("replacement", "\u2581");
      if (c.contains("prepend_scheme")) s.prepend = c["prepend_scheme"] != "never";
      else s.prepend = c.value("add_prefix_space", true);
      steps_.push_back(std::move(s));
    } else {
      throw std::runtime_error(where + ": decoder '" + type + "' is not supported");
    }
  };
  if (present_) add(add, config);
}

Decoder::~Decoder() = default;
Decoder::Decoder(Decoder&&) noexcept = default;

std::string Decoder::decode(std::vector<std::string> tokens) const {
  if (!present_) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
    return out;
  }
  using K = Step::Kind;
  for (const Step& s : steps_) {
    switch (s.kind) {
      case K::ByteLevel:
        tokens = byte_level(tokens);
        break;
      case K::ByteFallback:
        tokens = byte_fallback(tokens);
        break;
      case K::Fuse: {
        std::string all;
        for (const auto& t : tokens) all += t;
        tokens.assign(1, std::move(all));
        break;
      }
      case K::Replace:
        for (auto& t : tokens) t = s.regex->replace_all(t, s.content);
        break;
      case K::Strip:  // up to `start` leading and `stop` trailing `content` chars per token
        for (auto& t : tokens) {
          const std::string_view c = s.content;
          size_t b = 0, e = t.size();
          for (size_t k = 0; k < s.start && std::string_view(t).substr(b).starts_with(c); ++k) b += c.size();
          for (size_t k = 0; k < s.stop && e >= b + c.size() && std::string_view(t).substr(0, e).ends_with(c); ++k)
            e -= c.size();
          t = t.substr(b, e - b);
        }
        break;
      case K::Metaspace:  // replacement -> ' '; dropped in the first token when prepending
        for (size_t i = 0; i < tokens.size(); ++i) {
          std::string out;
          const std::string& t = tokens[i];
          for (size_t p = 0; p < t.size();) {
            if (t.compare(p, s.content.size(), s.content) == 0) {
              if (!(i == 0 && s.prepend)) out += ' ';
              p += s.content.size();
            } else {
              out += t[p++];
            }
          }
          tokens[i] = std::move(out);
        }
        break;
    }
  }
  std::string out;
  for (const auto& t : tokens) out += t;
  return out;
}

}  // namespace ftune::tok
