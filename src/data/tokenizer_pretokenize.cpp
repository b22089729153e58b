#include "tokenizer_pretokenize.hpp"

#include <nlohmann/json.hpp>

#include <optional>
#include <stdexcept>

namespace ftune::tok {
namespace {

// GPT-2's pattern, used by ByteLevel when use_regex is true.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

Behavior parse_behavior(const std::string& s, const std::string& where) {
  if (s == "Removed") return Behavior::Removed;
  if (s == "Isolated") return Behavior::Isolated;
  if (s == "MergedWithPrevious") return Behavior::MergedWithPrevious;
  if (s == "MergedWithNext") return Behavior::MergedWithNext;
  if (s == "Contiguous") return Behavior::Contiguous;
  throw std::runtime_error(where + ": Split behavior '" + s + "' is not supported");
}

struct Piece {
  std::string_view text;
  bool at_text_start;
};

using Match = std::pair<std::pair<size_t, size_t>, bool>;

// HF NormalizedString::split: turns (range, is_match) runs into kept ranges.
void apply_behavior(Behavior behavior, std::vector<Match>& m) {
  auto merge_runs = [&](auto&& should_merge) {
    std::vector<Match> out;
    bool previous = false;
    for (const auto& [range, is_match] : m) {
      if (should_merge(is_match, previous) && !out.empty()) out.back().first.second = range.second;
      else out.push_back({range, false});
      previous = is_match;
    }
    m.swap(out);
  };
  switch (behavior) {
    case Behavior::Removed:
      return;  // matches keep their flag and are dropped by the caller
    case Behavior::Isolated:
      for (auto& x : m) x.second = false;
      return;
    case Behavior::Contiguous:
      return merge_runs([](bool is_match, bool prev) { return is_match == prev; });
    case Behavior::MergedWithPrevious:
      return merge_runs([](bool is_match, bool prev) { return is_match && !prev; });
    case Behavior::MergedWithNext: {
      std::vector<Match> out;
      bool previous = false;
      for (auto it = m.rbegin(); it != m.rend(); ++it) {
        if (it->second && !previous && !out.empty()) out.back().first.first = it->first.first;
        else out.push_back({it->first, false});
        previous = it->second;
      }
      m.assign(out.rbegin(), out.rend());
      return;
    }
  }
}

}  // namespace

struct PreTokenizer::Step {
  enum class Kind { Split, ByteLevel, Metaspace };
  explicit Step(Kind k) : kind(k) {}
  Kind kind;
  std::optional<Regex> regex;  // Split pattern; ByteLevel GPT-2 regex; Metaspace replacement
  Behavior behavior = Behavior::Isolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel
  std::string replacement;        // Metaspace
  std::string prepend_scheme;     // Metaspace: always / first / never
  bool metaspace_split = true;
};

PreTokenizer::PreTokenizer(const nlohmann::json& config, const std::string& where) {
  auto add = [&](auto&& self, const nlohmann::json& c) -> void {
    if (c.is_null()) return;
    const std::string type = c.value("type", "");
    if (byte_level_)
      throw std::runtime_error(where + ": pre-tokenizer '" + type +
                               "' after ByteLevel is not supported (ByteLevel must be last)");
    if (type == "Sequence") {
      for (const auto& sub : c.at("pretokenizers")) self(self, sub);
    } else if (type == "Split") {
      Step s(Step::Kind::Split);
      const auto& pat = c.at("pattern");
      if (pat.contains("Regex")) s.regex.emplace(pat["Regex"].get<std::string>(), false);
      else if (pat.contains("String")) s.regex.emplace(pat["String"].get<std::string>(), true);
      else throw std::runtime_error(where + ": Split pattern must be Regex or String");
      s.behavior = parse_behavior(c.at("behavior").get<std::string>(), where);
      s.invert = c.value("invert", false);
      steps_.push_back(std::move(s));
    } else if (type == "ByteLevel") {
      Step s(Step::Kind::ByteLevel);
      s.add_prefix_space = c.value("add_prefix_space", true);
      if (c.value("use_regex", true)) s.regex.emplace(kGpt2Pattern, false);
      steps_.push_back(std::move(s));
      byte_level_ = true;
    } else if (type == "Metaspace") {
      Step s(Step::Kind::Metaspace);
      s.replacement = c.value("replacement", "\u2581");
      if (c.contains("prepend_scheme")) s.prepend_scheme = c["prepend_scheme"].get<std::string>();
      else s.prepend_scheme = c.value("add_prefix_space", true) ? "always" : "never";
      s.metaspace_split = c.value("split", true);
      s.regex.emplace(s.replacement, true);
      steps_.push_back(std::move(s));
    } else if (type == "Digits") {
      Step s(Step::Kind::Split);
      s.regex.emplace("\\p{N}", false);
      s.behavior = c.value("individual_digits", false) ? Behavior::Isolated : Behavior::Contiguous;
      steps_.push_back(std::move(s));
    } else {
      throw std::runtime_error(where + ": pre-tokenizer '" + type + "' is not supported");
    }
  };
  add(add, config);
}

PreTokenizer::~PreTokenizer() = default;
PreTokenizer::PreTokenizer(PreTokenizer&&) noexcept = default;

void PreTokenizer::split(std::string_view text, bool at_text_start,
                         std::vector<std::string_view>& words,
                         std::deque<std::string>& storage) const {
  thread_local std::vector<Piece> cur, next;
  thread_local std::vector<Match> matches;
  thread_local std::vector<std::pair<size_t, size_t>> found;
  cur.assign(1, {text, at_text_start});

  // Splits p by regex with a behavior, keeping non-empty pieces.
  auto split_piece = [&](const Piece& p, const Regex& re, Behavior behavior, bool invert) {
    matches.clear();
    re.find_all(p.text, found);
    size_t prev = 0;
    for (const auto& [b, e] : found) {
      if (prev != b) matches.push_back({{prev, b}, invert});
      matches.push_back({{b, e}, !invert});
      prev = e;
    }
    if (prev != p.text.size() || p.text.empty()) matches.push_back({{prev, p.text.size()}, invert});
    apply_behavior(behavior, matches);
    for (const auto& [range, remove] : matches) {
      if (remove || range.first == range.second) continue;
      next.push_back({p.text.substr(range.first, range.second - range.first),
                      p.at_text_start && range.first == 0});
    }
  };

  for (const Step& step : steps_) {
    next.clear();
    for (const Piece& p : cur) {
      switch (step.kind) {
        case Step::Kind::Split:
          split_piece(p, *step.regex, step.behavior, step.invert);
          break;
        case Step::Kind::ByteLevel: {
          Piece q = p;
          if (step.add_prefix_space && !q.text.starts_with(' ')) {
            std::string& s = storage.emplace_back(1, ' ');
            s.append(q.text);
            q.text = s;
          }
          if (step.regex) split_piece(q, *step.regex, Behavior::Isolated, false);
          else next.push_back(q);
          break;
        }
        case Step::Kind::Metaspace: {
          std::string s;
          for (char c : p.text) {
            if (c == ' ') s += step.replacement;
            else s += c;
          }
          const bool prepend = !std::string_view(s).starts_with(step.replacement) &&
                               (step.prepend_scheme == "always" ||
                                (step.prepend_scheme == "first" && p.at_text_start));
          if (prepend) s.insert(0, step.replacement);
          storage.push_back(std::move(s));
          const Piece q{storage.back(), p.at_text_start};
          if (step.metaspace_split) {
            split_piece(q, *step.regex, Behavior::MergedWithNext, false);
          } else {
            next.push_back(q);
          }
          break;
        }
      }
    }
    cur.swap(next);
  }
  for (const Piece& p : cur)
    if (!p.text.empty()) words.push_back(p.text);
}

}  // namespace ftune::tok
