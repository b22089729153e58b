#include "tokenizer_regex.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "unicode.hpp"

namespace ftune::tok {
namespace {

// Unicode White_Space, as a class body (no brackets).
constexpr const char* kWhiteSpaceClass =
    "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
    "\\x{202F}\\x{205F}\\x{3000}";

// Letters and numbers added in Unicode 15.0-16.0, which HF's Oniguruma knows and PCRE2
// 10.42 (Unicode 14) does not (harmless on a newer PCRE2).
struct Range {
  char32_t lo, hi;
};
constexpr Range kNewLetters[] = {
    {0x1C89, 0x1C8A},   {0xA7CB, 0xA7CD},   {0xA7DA, 0xA7DC},   {0x105C0, 0x105F3},
    {0x10D4A, 0x10D65}, {0x10D6F, 0x10D85}, {0x10EC2, 0x10EC4}, {0x1123F, 0x11240},
    {0x11380, 0x11389}, {0x1138B, 0x1138B}, {0x1138E, 0x1138E}, {0x11390, 0x113B5},
    {0x113B7, 0x113B7}, {0x113D1, 0x113D1}, {0x113D3, 0x113D3}, {0x11BC0, 0x11BE0},
    {0x11F02, 0x11F02}, {0x11F04, 0x11F10}, {0x11F12, 0x11F33}, {0x1342F, 0x1342F},
    {0x13441, 0x13446}, {0x13460, 0x143FA}, {0x16100, 0x1611D}, {0x16D40, 0x16D6C},
    {0x18CFF, 0x18CFF}, {0x1B132, 0x1B132}, {0x1B155, 0x1B155}, {0x1DF25, 0x1DF2A},
    {0x1E030, 0x1E06D}, {0x1E4D0, 0x1E4EB}, {0x1E5D0, 0x1E5ED}, {0x1E5F0, 0x1E5F0},
    {0x2B739, 0x2B739}, {0x2EBF0, 0x2EE5D}, {0x31350, 0x323AF}};
constexpr Range kNewNumbers[] = {
    {0x10D40, 0x10D49}, {0x116D0, 0x116E3}, {0x11BF0, 0x11BF9}, {0x11F50, 0x11F59},
    {0x16130, 0x16139}, {0x16D70, 0x16D79}, {0x1CCF0, 0x1CCF9}, {0x1D2C0, 0x1D2D3},
    {0x1E4F0, 0x1E4F9}, {0x1E5F1, 0x1E5FA}};

template <size_t N>
std::string class_body(const Range (&ranges)[N]) {
  std::string out;
  char buf[40];
  for (const Range& r : ranges) {
    std::snprintf(buf, sizeof buf, "\\x{%X}-\\x{%X}", static_cast<unsigned>(r.lo),
                  static_cast<unsigned>(r.hi));
    out += buf;
  }
  return out;
}

template <size_t N>
bool in_ranges(const Range (&ranges)[N], char32_t cp) {
  for (const Range& r : ranges)
    if (cp >= r.lo && cp <= r.hi) return true;
  return false;
}

// Per-thread PCRE2 match state: match data (only the whole-match offsets are read) and a
// JIT stack big enough for long whitespace runs.
struct MatchState {
  pcre2_match_data* data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;
  MatchState() {
    data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    jit_stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
    if (!data || !context || !jit_stack) throw std::bad_alloc();
    pcre2_jit_stack_assign(context, nullptr, jit_stack);
  }
  ~MatchState() {
    pcre2_jit_stack_free(jit_stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
  MatchState(const MatchState&) = delete;
  MatchState& operator=(const MatchState&) = delete;
};

MatchState& match_state() {
  thread_local MatchState state;
  return state;
}

}  // namespace

bool has_new_letters(std::string_view s) {
  // Only three UTF-8 lead bytes start such code points: E1 (U+1xxx), EA (U+Axxx) and
  // F0 (U+10000-3FFFF). Continuation bytes are 80-BF, so a plain byte scan finds them.
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  constexpr uint64_t kOnes = 0x0101010101010101ULL, kHighs = 0x8080808080808080ULL;
  auto has_byte = [&](uint64_t w, uint64_t b) {  // SWAR: some byte of w equals b
    const uint64_t x = w ^ (kOnes * b);
    return ((x - kOnes) & ~x & kHighs) != 0;
  };
  for (size_t i = 0; i < s.size(); ++i) {
    if (i + 8 <= s.size()) {  // skip 8 bytes at a time when none is a candidate lead
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (!has_byte(w, 0xE1) && !has_byte(w, 0xEA) && !has_byte(w, 0xF0)) {
        i += 7;
        continue;
      }
    }
    if (p[i] != 0xE1 && p[i] != 0xEA && p[i] != 0xF0) continue;
    size_t j = i;
    const char32_t cp = unicode::next_code_point_valid(s, j);
    if (cp >= 0x1C89 && (in_ranges(kNewLetters, cp) || in_ranges(kNewNumbers, cp))) return true;
  }
  return false;
}

std::string translate_oniguruma_pattern(std::string_view p, bool new_letters) {
  std::string out;
  out.reserve(p.size() + 64);
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char n = p[i + 1];
      ++i;
      if (n == 's') {
        out += in_class ? std::string(kWhiteSpaceClass) : "[" + std::string(kWhiteSpaceClass) + "]";
      } else if (new_letters && n == 'p' &&
                 (p.substr(i + 1, 3) == "{L}" || p.substr(i + 1, 3) == "{N}")) {
        const std::string body = std::string("\\p") + std::string(p.substr(i + 1, 3)) +
                                 (p[i + 2] == 'L' ? class_body(kNewLetters) : class_body(kNewNumbers));
        out += in_class ? body : "[" + body + "]";
        i += 3;
      } else if (n == 'S' && !in_class) {
        out += "[^" + std::string(kWhiteSpaceClass) + "]";
      } else {
        out += c;
        out += n;
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal member, not the end of the class.
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];
      continue;
    }
    if (in_class && c == '[' && i + 1 < p.size() && p[i + 1] == ':') {  // [:alpha:]
      const size_t end = p.find(":]", i + 2);
      if (end != std::string_view::npos) {
        out.append(p.substr(i, end + 2 - i));
        i = end + 1;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

namespace {
// Compiles with UTF + UCP (or as a literal) and JIT when available (`jit` says).
pcre2_code* compile(const std::string& source, bool literal, std::string_view shown, bool& jit) {
  int err = 0;
  PCRE2_SIZE err_offset = 0;
  const uint32_t options = literal ? PCRE2_UTF | PCRE2_LITERAL : PCRE2_UTF | PCRE2_UCP;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(source.data()), source.size(),
                                   options, &err, &err_offset, nullptr);
  if (!code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    throw std::runtime_error("cannot compile regex '" + std::string(shown) + "' at offset " +
                             std::to_string(err_offset) + ": " +
                             reinterpret_cast<const char*>(msg));
  }
  jit = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;  // else the interpreter
  return code;
}
}  // namespace

Regex::Regex(std::string_view pattern, bool literal) {
  source_ = literal ? std::string(pattern) : translate_oniguruma_pattern(pattern, false);
  code_ = compile(source_, literal, pattern, jit_);
  if (!literal) {
    const std::string exact = translate_oniguruma_pattern(pattern, true);
    if (exact != source_) exact_code_ = compile(exact, false, pattern, exact_jit_);
  }
}

Regex::~Regex() {
  pcre2_code_free(static_cast<pcre2_code*>(code_));
  pcre2_code_free(static_cast<pcre2_code*>(exact_code_));
}

Regex::Regex(Regex&& o) noexcept
    : code_(std::exchange(o.code_, nullptr)),
      exact_code_(std::exchange(o.exact_code_, nullptr)),
      jit_(o.jit_),
      exact_jit_(o.exact_jit_),
      source_(std::move(o.source_)) {}

Regex& Regex::operator=(Regex&& o) noexcept {
  if (this != &o) {
    pcre2_code_free(static_cast<pcre2_code*>(code_));
    pcre2_code_free(static_cast<pcre2_code*>(exact_code_));
    code_ = std::exchange(o.code_, nullptr);
    exact_code_ = std::exchange(o.exact_code_, nullptr);
    jit_ = o.jit_;
    exact_jit_ = o.exact_jit_;
    source_ = std::move(o.source_);
  }
  return *this;
}

void Regex::find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const {
  out.clear();
  MatchState& st = match_state();
  // The \p{L}/\p{N} extension makes PCRE2's JIT about 2x slower, so it is only used for
  // the rare texts that need it.
  const bool exact = exact_code_ && has_new_letters(s);
  const auto* code = static_cast<const pcre2_code*>(exact ? exact_code_ : code_);
  const bool jit = exact ? exact_jit_ : jit_;
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  size_t pos = 0, last_end = std::string_view::npos;
  while (pos <= s.size()) {
    // The tokenizer validates UTF-8 once per text; PCRE2 would otherwise re-check the
    // whole subject on every call (pcre2_jit_match never checks).
    const int rc = jit ? pcre2_jit_match(code, subject, s.size(), pos, 0, st.data, st.context)
                       : pcre2_match(code, subject, s.size(), pos, PCRE2_NO_UTF_CHECK, st.data,
                                     st.context);
    if (rc == PCRE2_ERROR_NOMATCH) return;
    if (rc < 0) {  // 0 only means "more groups than ovector pairs": the match is there
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      throw std::runtime_error("regex match failed (" + source_ + "): " +
                               reinterpret_cast<const char*>(msg));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.data);
    const size_t b = ov[0], e = ov[1];
    if (b == e && e == last_end) {  // empty match glued to the last one: step one char
      if (pos >= s.size()) return;
      pos += unicode::sequence_length(static_cast<unsigned char>(s[pos]));
      continue;
    }
    out.emplace_back(b, e);
    last_end = e;
    pos = e;  // an empty match re-finds itself at e next time; the check above steps on
  }
}

std::vector<std::pair<std::pair<size_t, size_t>, bool>> Regex::find_matches(
    std::string_view s) const {
  std::vector<std::pair<std::pair<size_t, size_t>, bool>> out;
  if (s.empty()) {
    out.push_back({{0, 0}, false});
    return out;
  }
  std::vector<std::pair<size_t, size_t>> matches;
  find_all(s, matches);
  size_t prev = 0;
  for (const auto& [b, e] : matches) {
    if (prev != b) out.push_back({{prev, b}, false});
    out.push_back({{b, e}, true});
    prev = e;
  }
  if (prev != s.size()) out.push_back({{prev, s.size()}, false});
  return out;
}

std::string Regex::replace_all(std::string_view s, std::string_view content) const {
  std::vector<std::pair<size_t, size_t>> matches;
  find_all(s, matches);
  std::string out;
  size_t prev = 0;
  for (const auto& [b, e] : matches) {
    out.append(s.substr(prev, b - prev));
    out.append(content);
    prev = e;
  }
  out.append(s.substr(prev));
  return out;
}

}  // namespace ftune::tok
