// Unit tests of ftune::Tokenizer on small hand-written tokenizer.json files, and of the
// private Unicode / regex helpers behind it. Real-vocabulary conformance is in
// test_data_tokenizer_conformance.cpp.
#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "../src/data/tokenizer_regex.hpp"
#include "../src/data/unicode.hpp"
#include "ftune/data/tokenizer.hpp"
#include "test_util.hpp"

using nlohmann::json;
using Ids = std::vector<int32_t>;

namespace {

// Writes `doc` as DIR/tokenizer.json (and `config` as tokenizer_config.json) and loads it.
ftune::Tokenizer load(const std::string& name, const json& doc, const json& config = nullptr) {
  const std::string dir = ftune::test::scratch("tokenizer_" + name);
  std::ofstream(dir + "/tokenizer.json") << doc.dump();
  if (!config.is_null()) std::ofstream(dir + "/tokenizer_config.json") << config.dump();
  return ftune::Tokenizer::from_dir(dir);
}

json added_token(int id, const std::string& content, bool special = true) {
  return {{"id", id},        {"content", content}, {"single_word", false}, {"lstrip", false},
          {"rstrip", false}, {"normalized", false}, {"special", special}};
}

// A SentencePiece-style BPE (Llama-2 layout): "▁" prepended, spaces as "▁", byte fallback.
json sentencepiece_doc(const json& merges) {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  int next = 259;
  for (const char* t : {"\u2581", "a", "b", "c", "ab", "bc", "abc", "\u2581a", "aa", "aaaa"})
    vocab[t] = next++;
  return {
      {"version", "1.0"},
      {"added_tokens", {added_token(0, "<unk>"), added_token(1, "<s>"), added_token(2, "</s>")}},
      {"normalizer",
       {{"type", "Sequence"},
        {"normalizers",
         {{{"type", "Prepend"}, {"prepend", "\u2581"}},
          {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}}}}}},
      {"pre_tokenizer", nullptr},
      {"post_processor", nullptr},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders",
         {{{"type", "Replace"}, {"pattern", {{"String", "\u2581"}}}, {"content", " "}},
          {{"type", "ByteFallback"}},
          {{"type", "Fuse"}},
          {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", "<unk>"}, {"fuse_unk", true},
        {"byte_fallback", true}, {"vocab", vocab}, {"merges", merges}}}};
}

// A byte-level BPE (GPT-2 / Qwen layout) over the 256 byte symbols plus a few merges.
json byte_level_doc(const json& pre_tokenizer) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[ftune::unicode::to_utf8(ftune::unicode::byte_to_unicode()[b])] = b;
  vocab["\u0120h"] = 256;   // "Ġh" = " h"
  vocab["\u0120hi"] = 257;  // " hi"
  vocab["hi"] = 258;
  return {{"added_tokens", {added_token(300, "<|end|>")}},
          {"normalizer", {{"type", "NFC"}}},
          {"pre_tokenizer", pre_tokenizer},
          {"decoder", {{"type", "ByteLevel"}}},
          {"model",
           {{"type", "BPE"}, {"vocab", vocab},
            {"merges", json::array({json::array({"\u0120", "h"}), json::array({"\u0120h", "i"}),
                                    json::array({"h", "i"})})}}}};
}

json qwen_split(const std::string& behavior = "Isolated") {
  return {{"type", "Sequence"},
          {"pretokenizers",
           {{{"type", "Split"},
             {"pattern", {{"Regex", R"( ?\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+)"}}},
             {"behavior", behavior},
             {"invert", false}},
            {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
}

}  // namespace

TEST_CASE("BPE applies merges in rank order, leftmost first on ties") {
  const auto ab_first = load("ab_first", sentencepiece_doc({"a b", "b c"}));
  const auto bc_first = load("bc_first", sentencepiece_doc({"b c", "a b"}));
  const int32_t a = ab_first.token_to_id("a"), c = ab_first.token_to_id("c");
  const int32_t ab = ab_first.token_to_id("ab"), bc = ab_first.token_to_id("bc");
  const int32_t space = ab_first.token_to_id("\u2581");
  CHECK(ab_first.encode("abc") == Ids{space, ab, c});
  CHECK(bc_first.encode("abc") == Ids{space, a, bc});

  // "a a" then "aa aa": pairs merge left to right, the short (linear scan) and long
  // (priority queue) merge loops agree.
  const auto aa = load("aa", sentencepiece_doc({"a a", "aa aa"}));
  const int32_t id_aa = aa.token_to_id("aa"), id_aaaa = aa.token_to_id("aaaa");
  for (int n : {5, 10, 51, 200}) {
    Ids expected{space};
    for (int k = 0; k < n / 4; ++k) expected.push_back(id_aaaa);
    if (n % 4 >= 2) expected.push_back(id_aa);
    if (n % 2) expected.push_back(a);
    CAPTURE(n);
    CHECK(aa.encode(std::string(n, 'a')) == expected);
  }
}

TEST_CASE("SentencePiece-style BPE: Prepend/Replace normalizers, byte fallback, decode") {
  const auto tok = load("sp", sentencepiece_doc({"\u2581 a", "a b", "b c"}));
  const int32_t sp_a = tok.token_to_id("\u2581a"), space = tok.token_to_id("\u2581");
  CHECK(tok.encode("a b") == Ids{sp_a, space, tok.token_to_id("b")});
  // "€" is not in the vocab: its three UTF-8 bytes become <0xE2><0x82><0xAC>.
  CHECK(tok.encode("a€") == Ids{sp_a, 3 + 0xE2, 3 + 0x82, 3 + 0xAC});
  CHECK(tok.decode(tok.encode("a€ b  c")) == "a€ b  c");
  CHECK(tok.decode(Ids{sp_a, 3 + 0xE2, 3 + 0x82}) == "a\uFFFD\uFFFD");  // invalid bytes
  CHECK(tok.encode("") == Ids{});
  CHECK(tok.id_to_token(3 + 0x41) == "<0x41>");
  CHECK(tok.token_to_id("nope") == -1);
  CHECK(tok.vocab_size() == 269);
  // Ids beyond the vocabulary (a padded embedding table) are skipped, as HF does.
  CHECK(tok.decode(Ids{sp_a, 100000, -1, space, tok.token_to_id("b")}) == "a b");
}

TEST_CASE("words split before \"▁\" only when no merge can cross it") {
  // Without a pre-tokenizer the model cuts words before each "▁" that follows another
  // character, for speed; a merge ending in a non-"▁" and starting with "▁" forbids that.
  json doc = sentencepiece_doc({"a \u2581", "\u2581 a"});
  doc["model"]["vocab"]["a\u2581"] = 300;
  const auto crossing = load("crossing", doc);
  const int32_t space = crossing.token_to_id("\u2581"), a = crossing.token_to_id("a");
  // "▁a▁a": (a ▁) has rank 0 and joins across the space first.
  CHECK(crossing.encode("a a") == Ids{space, 300, a});
  CHECK(crossing.encode("aa a") == Ids{crossing.token_to_id("\u2581a"), 300, a});
  const auto plain = load("not_crossing", sentencepiece_doc({"\u2581 a", "a a"}));
  CHECK(plain.encode("aa aa  a") == Ids{plain.token_to_id("\u2581a"), a, plain.token_to_id("\u2581a"), a,
                                        space, plain.token_to_id("\u2581a")});
}

TEST_CASE("unknown characters become unk (fused) without byte fallback") {
  json doc = sentencepiece_doc({"a b"});
  doc["model"]["byte_fallback"] = false;
  auto tok = load("unk", doc);
  const int32_t space = tok.token_to_id("\u2581"), a = tok.token_to_id("a"), b = tok.token_to_id("b");
  CHECK(tok.encode("a\u00e9\u00e8b") == Ids{space, a, 0, b});
  doc["model"]["fuse_unk"] = false;
  tok = load("unk_nofuse", doc);
  CHECK(tok.encode("a\u00e9\u00e8b") == Ids{space, a, 0, 0, b});
}

TEST_CASE("added tokens are split out before the normalizer and the model") {
  json doc = sentencepiece_doc({"a b", "b c"});
  doc["added_tokens"].push_back(added_token(400, "<|x|>"));
  doc["added_tokens"].push_back(added_token(401, "<|x|>y"));  // longest match wins
  json stripped = added_token(402, "[M]");
  stripped["lstrip"] = true;
  stripped["rstrip"] = true;
  doc["added_tokens"].push_back(stripped);
  json word = added_token(403, "zz", false);
  word["single_word"] = true;
  doc["added_tokens"].push_back(word);
  const auto tok = load("added", doc);
  const int32_t space = tok.token_to_id("\u2581"), ab = tok.token_to_id("ab");
  const int32_t a = tok.token_to_id("a"), sp_a = tok.token_to_id("\u2581a");
  const int32_t bc = tok.token_to_id("bc");
  // Each plain segment is normalized on its own, so each gets its own "▁".
  CHECK(tok.encode("ab<|x|>bc") == Ids{space, ab, 400, space, bc});
  CHECK(tok.encode("<|x|>y") == Ids{401});
  CHECK(tok.encode("a  [M]  a") == Ids{space, a, 402, space, a});  // lstrip/rstrip eat spaces
  CHECK(tok.encode("zz a") == Ids{403, space, space, a});
  CHECK(tok.encode("azz").size() > 1);  // not a single word: no match
  CHECK(tok.decode(Ids{sp_a, 400, sp_a}) == "a<|x|> a");
  CHECK(tok.decode(Ids{1, sp_a, 400, 403}, /*skip_special_tokens=*/true) == "azz");
  CHECK(tok.id_to_token(400) == "<|x|>");
  CHECK(tok.token_to_id("<|x|>") == 400);
}

TEST_CASE("byte-level BPE with a Split regex, and ByteLevel decoding") {
  const auto tok = load("bytelevel", byte_level_doc(qwen_split()));
  CHECK(tok.encode(" hi") == Ids{257});
  CHECK(tok.encode("hi hi") == Ids{258, 257});
  CHECK(tok.encode("h\xC3\xA9") == Ids{'h', 0xC3, 0xA9});  // é as its UTF-8 bytes
  CHECK(tok.encode("hi<|end|>") == Ids{258, 300});
  CHECK(tok.decode(Ids{258, 257, 0xC3, 0xA9, 300}) == "hi hi\u00e9<|end|>");
  CHECK(tok.decode(Ids{0xC3}) == "\uFFFD");  // a lone lead byte
  // NFC normalizer: "e" + U+0301 is encoded as "é".
  CHECK(tok.encode("e\u0301") == tok.encode("\u00e9"));
  std::vector<std::string> texts;
  for (int i = 0; i < 300; ++i) texts.push_back(std::string(i % 7, ' ') + "hi " + std::to_string(i));
  const auto batch = tok.encode_batch(texts, 3);
  REQUIRE(batch.size() == texts.size());
  for (size_t i = 0; i < texts.size(); ++i) CHECK(batch[i] == tok.encode(texts[i]));
  // Invalid UTF-8 input is repaired to U+FFFD first.
  CHECK(tok.decode(tok.encode("a\xFF" "b")) == "a\uFFFDb");
}

TEST_CASE("Split behaviors and ByteLevel use_regex / add_prefix_space") {
  // Removed drops the matches ("hi" never reaches the model as one word: only spaces do).
  auto removed = load("split_removed", byte_level_doc(qwen_split("Removed")));
  CHECK(removed.encode("hi hi 7") == Ids{});
  auto merged = load("split_merged_prev", byte_level_doc(qwen_split("MergedWithPrevious")));
  CHECK(merged.decode(merged.encode("hi, hi")) == "hi, hi");
  // GPT-2 style: ByteLevel splits with its own regex and adds a prefix space.
  auto gpt2 = load("gpt2", byte_level_doc({{"type", "ByteLevel"}, {"add_prefix_space", true},
                                            {"use_regex", true}}));
  CHECK(gpt2.encode("hi hi") == Ids{257, 257});
}

TEST_CASE("tokenizer_config.json: bos/eos/pad and add_bos_token; post-processor fallback") {
  json doc = sentencepiece_doc({"\u2581 a"});
  doc["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                  {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                  {{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}}}},
      {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}},
                          {"</s>", {{"id", "</s>"}, {"ids", {2}}, {"tokens", {"</s>"}}}}}}};
  const auto from_template = load("template", doc);
  const int32_t sp_a = from_template.token_to_id("\u2581a");
  CHECK(from_template.encode("a", true) == Ids{1, sp_a, 2});
  CHECK(from_template.bos_id() == -1);  // no tokenizer_config.json

  const json config = {{"add_bos_token", true},
                       {"bos_token", {{"content", "<s>"}, {"lstrip", false}}},
                       {"eos_token", "</s>"},
                       {"pad_token", nullptr}};
  const auto configured = load("configured", doc, config);
  CHECK(configured.encode("a", true) == Ids{1, sp_a});  // the config wins: no eos
  CHECK(configured.bos_id() == 1);
  CHECK(configured.eos_id() == 2);
  CHECK(configured.pad_id() == -1);
}

TEST_CASE("unsupported models and components are refused, naming file and component") {
  auto expect_error = [](const std::string& name, const json& doc, const std::string& what) {
    std::string message;
    try {
      load(name, doc);
    } catch (const std::exception& e) {
      message = e.what();
    }
    CAPTURE(message);
    CHECK(message.find("tokenizer.json") != std::string::npos);
    CHECK(message.find(what) != std::string::npos);
  };
  json doc = sentencepiece_doc({"a b"});
  doc["model"]["type"] = "WordPiece";
  expect_error("wordpiece", doc, "WordPiece");
  doc = sentencepiece_doc({"a b"});
  doc["model"] = {{"type", "Unigram"}, {"vocab", json::array()}};
  expect_error("unigram", doc, "Unigram");
  doc = sentencepiece_doc({"a b"});
  doc["normalizer"] = {{"type", "Lowercase"}};
  expect_error("lowercase", doc, "Lowercase");
  doc = sentencepiece_doc({"a b"});
  doc["pre_tokenizer"] = {{"type", "Whitespace"}};
  expect_error("whitespace", doc, "Whitespace");
  doc = sentencepiece_doc({"a b"});
  doc["decoder"] = {{"type", "WordPiece"}};
  expect_error("wp_decoder", doc, "WordPiece");
  doc = sentencepiece_doc({"a x"});
  expect_error("bad_merge", doc, "'x'");
  CHECK_THROWS_WITH_AS(ftune::Tokenizer::from_file("/nonexistent/tokenizer.json"),
                       doctest::Contains("cannot open"), std::runtime_error);
}

TEST_CASE("unicode helpers") {
  using namespace ftune::unicode;
  CHECK(to_valid_utf8("a\xE2\x82" "b") == "a\uFFFDb");        // truncated sequence: one U+FFFD
  CHECK(to_valid_utf8("\xC0\x80") == "\uFFFD\uFFFD");          // overlong: one per byte
  CHECK(to_valid_utf8("\xED\xA0\x80") == "\uFFFD\uFFFD\uFFFD");  // surrogate
  CHECK(is_valid_utf8("h\u00e9\U0001F600"));
  CHECK_FALSE(is_valid_utf8("\xF5\x80\x80\x80"));
  for (int b = 0; b < 256; ++b) CHECK(unicode_to_byte(byte_to_unicode()[b]) == b);
  CHECK(byte_to_unicode()[' '] == 0x120);
  CHECK(nfc("e\u0301") == "\u00e9");
  CHECK(nfc("\u1100\u1161\u11A8") == "\uAC01");  // Hangul L V T
  CHECK(nfc("\uAC00\u11A7") == "\uAC00\u11A7");  // U+11A7 (T base) never composes
  CHECK(nfc("\u212B") == "\u00C5");              // singleton decomposition
  CHECK(normalize("\u00e9", NormalForm::NFD) == "e\u0301");
  CHECK(normalize("\uFB01", NormalForm::NFKC) == "fi");
  // U+10F4A is a combining mark HF's (Unicode 9) tables do not know: left in place.
  CHECK(normalize("a\U00010F4A\u0334", NormalForm::NFD) == "a\U00010F4A\u0334");
  CHECK(normalize("\U0001F16C", NormalForm::NFKC) == "\U0001F16C");
  // The fast NFC path never hides a change: fuzz it against the full one.
  std::mt19937 rng(3);
  static const char32_t kPool[] = {'a', 'e', 0x300, 0x301, 0x316, 0x334, 0x1100, 0x1161, 0x11A8,
                                   0xAC00, 0x4E00, 0xF900, 0x212B, 0x0B47, 0x0B3E, 0x10F4A, 0x1F600};
  for (int i = 0; i < 5000; ++i) {
    std::string s;
    for (int k = 0, n = static_cast<int>(rng() % 8); k < n; ++k) append_utf8(s, kPool[rng() % std::size(kPool)]);
    CAPTURE(s);
    CHECK(nfc(s) == normalize(s, NormalForm::NFC));
    if (nfc_quick_check(s)) CHECK(nfc(s) == s);
  }
}

TEST_CASE("regex: Oniguruma \\s semantics and match iteration") {
  using ftune::tok::Regex;
  const Regex space("\\s+", false);
  // U+180E is not White_Space for Oniguruma (PCRE2's UCP \s would match it).
  CHECK(space.find_matches("a\u180Eb").size() == 1);
  CHECK(space.find_matches("a\u3000b").size() == 3);
  const Regex not_space("[^\\s]+", false);
  CHECK(not_space.find_matches("x\u180Ey").size() == 1);
  CHECK(ftune::tok::translate_oniguruma_pattern("\\\\s", true) == "\\\\s");  // an escaped backslash
  // Unicode 15-16 letters and numbers (Oniguruma knows them, PCRE2 10.42 does not).
  CHECK(Regex("\\p{L}+", false).find_matches("a\U00031350b").size() == 1);
  CHECK(Regex("\\p{N}", false).find_matches("\U0001D2C0").size() == 1);
  CHECK_FALSE(Regex("[^\\p{L}]", false).find_matches("\uA7CB")[0].second);  // a letter
  CHECK(ftune::tok::has_new_letters("x\U0001D2C0"));
  CHECK_FALSE(ftune::tok::has_new_letters("abc \u4E00\U0001F600 \uAC00 long ascii text"));
  // Empty matches: one per position, as Oniguruma's find_iter yields them.
  const Regex empty("x*", false);
  std::vector<std::pair<size_t, size_t>> m;
  empty.find_all("axb", m);
  CHECK(m == std::vector<std::pair<size_t, size_t>>{{0, 0}, {1, 2}, {3, 3}});
  CHECK(Regex("a.", true).replace_all("a.ab", "-") == "-ab");  // literal pattern
}
