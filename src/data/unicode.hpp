#pragma once
// Private to the data module: UTF-8 helpers, the GPT-2 byte<->unicode map used by the
// ByteLevel pre-tokenizer/decoder, NFC normalization (utf8proc) and the few Unicode
// properties the tokenizer needs.
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace ftune::unicode {

// Decodes the code point at s[i] and advances i. Returns false (i unchanged) when the bytes
// at i are not valid UTF-8 (overlong forms, surrogates and > U+10FFFF are invalid).
bool next_code_point(std::string_view s, size_t& i, char32_t& cp);
// Code point at s[i] of a string already known to be valid UTF-8, advancing i.
char32_t next_code_point_valid(std::string_view s, size_t& i);
// Byte length of the UTF-8 sequence led by `lead` (1 for a stray byte).
inline size_t sequence_length(unsigned char lead) {
  return lead < 0xC0 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
}
void append_utf8(std::string& out, char32_t cp);
std::string to_utf8(char32_t cp);

bool is_valid_utf8(std::string_view s);
// Replaces every maximal invalid subsequence by U+FFFD, like Rust's
// String::from_utf8_lossy (which HF tokenizers uses when decoding bytes).
std::string to_valid_utf8(std::string_view s);

// GPT-2's reversible byte -> printable code point map (ByteLevel pre-tokenizer).
const std::array<char32_t, 256>& byte_to_unicode();
// Inverse map; -1 for code points that are not the image of a byte.
int unicode_to_byte(char32_t cp);

enum class NormalForm { NFC, NFD, NFKC, NFKD };
// `s` (valid UTF-8) in normal form `form` as HF tokenizers computes it: utf8proc, except
// that the few normalization-relevant code points newer than HF's Unicode 9 tables are
// left alone, as HF does.
std::string normalize(std::string_view s, NormalForm form);
// normalize(s, NFC), fast: returns the input unchanged (no utf8proc call) when a scan shows
// every code point is NFC-inert, the common case; otherwise only the short spans around
// non-inert code points go through utf8proc.
std::string nfc(std::string_view s);
// Writes nfc(s) to `out` and returns true, or returns false (out untouched) when s is
// already NFC.
bool nfc_if_changed(std::string_view s, std::string& out);
// True when every code point is NFC-inert, hence nfc(s) == s (false means "maybe not").
bool nfc_quick_check(std::string_view s);

// Rust char::is_whitespace (Unicode White_Space), used by added-token lstrip/rstrip.
bool is_white_space(char32_t cp);
// Rust char::is_alphanumeric || '_' (word characters for single_word added tokens).
bool is_word_char(char32_t cp);

}  // namespace ftune::unicode
