#include "unicode.hpp"

#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <stdexcept>
#include <vector>

namespace ftune::unicode {
namespace {

// Valid range of the second byte after a lead byte (Unicode table 3-7); 0 length = bad lead.
struct LeadInfo {
  uint8_t length, lo, hi;
};
LeadInfo lead_info(unsigned char b) {
  if (b < 0x80) return {1, 0, 0};
  if (b < 0xC2) return {0, 0, 0};
  if (b < 0xE0) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F};
  if (b < 0xF0) return {3, 0x80, 0xBF};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b < 0xF4) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};
  return {0, 0, 0};
}

// Length of the longest prefix at s[i] that could start a valid sequence (>= 1); used to
// emit one U+FFFD per maximal invalid subsequence.
size_t invalid_prefix_length(std::string_view s, size_t i) {
  const LeadInfo li = lead_info(static_cast<unsigned char>(s[i]));
  if (li.length == 0) return 1;
  size_t n = 1;
  while (n < li.length && i + n < s.size()) {
    const auto b = static_cast<unsigned char>(s[i + n]);
    const bool ok = n == 1 ? (b >= li.lo && b <= li.hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) break;
    ++n;
  }
  return n;
}

}  // namespace

bool next_code_point(std::string_view s, size_t& i, char32_t& cp) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    cp = b0;
    ++i;
    return true;
  }
  const LeadInfo li = lead_info(b0);
  if (li.length == 0 || i + li.length > s.size()) return false;
  const auto b1 = static_cast<unsigned char>(s[i + 1]);
  if (b1 < li.lo || b1 > li.hi) return false;
  char32_t c = b0 & (0x7F >> li.length);
  c = (c << 6) | (b1 & 0x3F);
  for (size_t k = 2; k < li.length; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return false;
    c = (c << 6) | (b & 0x3F);
  }
  cp = c;
  i += li.length;
  return true;
}

char32_t next_code_point_valid(std::string_view s, size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    ++i;
    return b0;
  }
  const size_t n = sequence_length(b0);
  char32_t c = b0 & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) c = (c << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += n;
  return c;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string to_utf8(char32_t cp) {
  std::string s;
  append_utf8(s, cp);
  return s;
}

bool is_valid_utf8(std::string_view s) {
  size_t i = 0;
  char32_t cp;
  while (i < s.size()) {
    // ASCII fast path, 8 bytes at a time.
    if (i + 8 <= s.size()) {
      uint64_t w;
      std::memcpy(&w, s.data() + i, 8);
      if ((w & 0x8080808080808080ULL) == 0) {
        i += 8;
        continue;
      }
    }
    if (!next_code_point(s, i, cp)) return false;
  }
  return true;
}

std::string to_valid_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const size_t start = i;
    char32_t cp;
    if (next_code_point(s, i, cp)) {
      out.append(s.substr(start, i - start));
    } else {
      out.append("\xEF\xBF\xBD");
      i += invalid_prefix_length(s, i);
    }
  }
  return out;
}

const std::array<char32_t, 256>& byte_to_unicode() {
  // Printable Latin-1 bytes map to themselves; the other 68 bytes to U+0100.. in order.
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      t[b] = printable ? static_cast<char32_t>(b) : next++;
    }
    return t;
  }();
  return table;
}

int unicode_to_byte(char32_t cp) {
  static const std::array<int16_t, 512> inverse = [] {
    std::array<int16_t, 512> inv{};
    inv.fill(-1);
    const auto& fwd = byte_to_unicode();
    for (int b = 0; b < 256; ++b) inv[fwd[b]] = static_cast<int16_t>(b);
    return inv;
  }();
  return cp < 512 ? inverse[cp] : -1;
}

namespace {

// Code points that matter to normalization in utf8proc's Unicode 15 data but that HF
// tokenizers' normalizers (unicode-normalization-alignments, Unicode 9 data) do not know,
// so they leave them alone as plain starters: combining marks of Unicode 10-15 and the
// Dives Akuru composition (U+11930/U+11938). Also U+11A7, the Hangul T base, which
// utf8proc 2.8 wrongly absorbs into a preceding LV syllable. They are normalization
// boundaries here too. Found by probing HF with every such code point.
struct Range {
  char32_t lo, hi;
};
constexpr Range kOpaque[] = {
    {0x7FD, 0x7FD}, {0x898, 0x89F}, {0x8CA, 0x8D3}, {0x9FE, 0x9FE}, {0xC3C, 0xC3C},
    {0xD3B, 0xD3C}, {0xEBA, 0xEBA}, {0x11A7, 0x11A7}, {0x1715, 0x1715}, {0x1ABF, 0x1ACE},
    {0x1DF6, 0x1DFA}, {0xA82C, 0xA82C}, {0x10D24, 0x10D27}, {0x10EAB, 0x10EAC},
    {0x10EFD, 0x10EFF}, {0x10F46, 0x10F50}, {0x10F82, 0x10F85}, {0x11070, 0x11070},
    {0x1133B, 0x1133B}, {0x1145E, 0x1145E}, {0x11839, 0x1183A}, {0x11930, 0x11930},
    {0x11938, 0x11938}, {0x1193D, 0x1193E}, {0x11943, 0x11943}, {0x119E0, 0x119E0},
    {0x11A34, 0x11A34}, {0x11A47, 0x11A47}, {0x11A99, 0x11A99}, {0x11D42, 0x11D42},
    {0x11D44, 0x11D45}, {0x11D97, 0x11D97}, {0x11F41, 0x11F42}, {0x16FF0, 0x16FF1},
    {0x1E08F, 0x1E08F}, {0x1E130, 0x1E136}, {0x1E2AE, 0x1E2AE}, {0x1E2EC, 0x1E2EF},
    {0x1E4EC, 0x1E4EF}};
// Also opaque for NFKC/NFKD: compatibility decompositions HF's data lacks.
constexpr Range kOpaqueCompat[] = {
    {0x32FF, 0x32FF},   {0xA7F2, 0xA7F4},   {0xAB69, 0xAB69},   {0x10781, 0x10785},
    {0x10787, 0x107B0}, {0x107B2, 0x107BA}, {0x1E030, 0x1E06D}, {0x1F16C, 0x1F16C},
    {0x1FBF0, 0x1FBF9}};

template <size_t N>
bool in_ranges(const Range (&ranges)[N], char32_t cp) {
  const Range* it = std::lower_bound(std::begin(ranges), std::end(ranges), cp,
                                     [](const Range& r, char32_t c) { return r.hi < c; });
  return it != std::end(ranges) && it->lo <= cp;
}

bool is_compat(NormalForm form) { return form == NormalForm::NFKC || form == NormalForm::NFKD; }

bool opaque(char32_t cp, NormalForm form) {
  return in_ranges(kOpaque, cp) || (is_compat(form) && in_ranges(kOpaqueCompat, cp));
}

std::string utf8proc_normalize(std::string_view s, NormalForm form) {
  int options = UTF8PROC_STABLE;
  options |= form == NormalForm::NFC || form == NormalForm::NFKC ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE;
  if (is_compat(form)) options |= UTF8PROC_COMPAT;
  utf8proc_uint8_t* out = nullptr;
  const utf8proc_ssize_t n =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                   static_cast<utf8proc_ssize_t>(s.size()), &out, static_cast<utf8proc_option_t>(options));
  if (n < 0) throw std::runtime_error(std::string("Unicode normalization failed: ") + utf8proc_errmsg(n));
  std::string result(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
  std::free(out);
  return result;
}

// A code point is NFC-inert when it is a starter (ccc 0), is its own NFC and can never be
// the second half of a canonical composition. Such a code point is a normalization
// boundary: nothing before it changes because of it. A string of inert code points is its
// own NFC. Opaque code points count as inert (HF leaves them alone).
bool compute_inert(char32_t cp) {
  if (cp < 0x300) return true;  // nothing below U+0300 is a non-starter or decomposes oddly
  if ((cp >= 0x1161 && cp <= 0x1175) || (cp >= 0x11A8 && cp <= 0x11C2)) return false;  // Hangul V/T
  if (opaque(cp, NormalForm::NFC)) return true;
  const utf8proc_property_t* p = utf8proc_get_property(static_cast<utf8proc_int32_t>(cp));
  if (p->combining_class != 0) return false;
  // utf8proc marks code points that compose with a preceding starter with bit 15.
  if (p->comb_index != UINT16_MAX && (p->comb_index & 0x8000)) return false;
  if (p->decomp_seqindex != UINT16_MAX && p->decomp_type == 0) {  // canonical decomposition
    const std::string one = to_utf8(cp);
    return utf8proc_normalize(one, NormalForm::NFC) == one;  // é, が: inert
  }
  return true;
}

// One bit per code point, computed once (a few ms).
const std::vector<uint64_t>& inert_bits() {
  static const std::vector<uint64_t> bits = [] {
    std::vector<uint64_t> b((0x110000 + 63) / 64, 0);
    for (char32_t cp = 0; cp < 0x110000; ++cp)
      if ((cp < 0xD800 || cp > 0xDFFF) && compute_inert(cp)) b[cp >> 6] |= uint64_t{1} << (cp & 63);
    return b;
  }();
  return bits;
}

bool inert(const std::vector<uint64_t>& bits, char32_t cp) {
  return (bits[cp >> 6] >> (cp & 63)) & 1;
}

}  // namespace

bool nfc_quick_check(std::string_view s) {
  const auto& bits = inert_bits();
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    if (b < 0xCC) {  // every code point below U+0300 is inert
      i += sequence_length(b);
      continue;
    }
    if (!inert(bits, next_code_point_valid(s, i))) return false;
  }
  return true;
}

bool nfc_if_changed(std::string_view s, std::string& out) {
  // Only the spans "last inert code point + following non-inert run" go through utf8proc;
  // inert code points are boundaries, so everything else is copied as is.
  const auto& bits = inert_bits();
  size_t copied = 0;    // s[0, copied) is already in out
  size_t boundary = 0;  // start of the last inert code point
  bool changed = false;
  for (size_t i = 0; i < s.size();) {
    const size_t start = i;
    const auto b = static_cast<unsigned char>(s[i]);
    if (b < 0xCC) {
      boundary = start;
      i += sequence_length(b);
      continue;
    }
    if (inert(bits, next_code_point_valid(s, i))) {
      boundary = start;
      continue;
    }
    size_t end = i;  // extend over the non-inert run
    while (end < s.size()) {
      size_t j = end;
      if (inert(bits, next_code_point_valid(s, j))) break;
      end = j;
    }
    size_t span = std::max(boundary, copied);
    if (size_t j = span; span < start && opaque(next_code_point_valid(s, j), NormalForm::NFC))
      span = j;  // an opaque code point stays out of utf8proc
    const std::string normalized = utf8proc_normalize(s.substr(span, end - span), NormalForm::NFC);
    if (!changed) {
      out.clear();
      changed = true;
    }
    out.append(s.substr(copied, span - copied));
    out += normalized;
    copied = end;
    i = end;
  }
  if (changed) out.append(s.substr(copied));
  return changed;
}

std::string normalize(std::string_view s, NormalForm form) {
  // Opaque code points are starters that never combine, so the text is normalized in
  // pieces between them, which keeps them out of utf8proc.
  std::string out;
  size_t piece = 0;
  for (size_t i = 0; i < s.size();) {
    const size_t start = i;
    if (static_cast<unsigned char>(s[i]) < 0xDF) {  // below U+07C0: nothing opaque
      i += sequence_length(static_cast<unsigned char>(s[i]));
      continue;
    }
    if (!opaque(next_code_point_valid(s, i), form)) continue;
    out += utf8proc_normalize(s.substr(piece, start - piece), form);
    out.append(s.substr(start, i - start));
    piece = i;
  }
  out += utf8proc_normalize(s.substr(piece), form);
  return out;
}

std::string nfc(std::string_view s) {
  std::string out;
  return nfc_if_changed(s, out) ? out : std::string(s);
}

bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

bool is_word_char(char32_t c) {
  if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_NO:
      return true;
    default:
      return false;
  }
}

}  // namespace ftune::unicode
