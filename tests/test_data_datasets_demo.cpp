// The bundled demo data (inputs/data/sharegpt) and tiny tokenizer (inputs/tiny-tokenizer),
// both written by tools/make_demo_sft.py: ftune's tokenizer gives HF tokenizers' ids on the
// golden samples and on every message of the dataset (FNV-1a digest), and the demo data
// loads cleanly with the default template.
#include <nlohmann/json.hpp>

#include <cstdio>

#include "test_data_datasets_util.hpp"

using namespace ftune;
using namespace ftune::test;

namespace {

uint64_t fnv1a64(const std::vector<int32_t>& ids, uint64_t h) {
  for (int32_t id : ids) {
    const auto u = static_cast<uint32_t>(id);
    for (int b = 0; b < 4; ++b) h = (h ^ ((u >> (8 * b)) & 0xFF)) * 0x100000001b3ull;  // little-endian
  }
  return h;
}

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::ifstream in(path);
  REQUIRE_MESSAGE(in.good(), "cannot open " << path);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

}  // namespace

TEST_CASE("tiny tokenizer: special ids fit inputs/tiny-llama (vocab 512, bos 1, eos 2)") {
  const Tokenizer& tok = tiny_tokenizer();
  CHECK(tok.vocab_size() == 512);
  CHECK(tok.token_to_id("<unk>") == 0);
  CHECK(tok.bos_id() == 1);
  CHECK(tok.eos_id() == 2);
  CHECK(tok.pad_id() == 3);
  CHECK(tok.encode("hi", true).front() == 1);
}

TEST_CASE("tiny tokenizer matches HF tokenizers on the golden samples and the whole dataset") {
  const Tokenizer& tok = tiny_tokenizer();
  const auto golden = read_jsonl(source_dir() + "/tests/fixtures/tiny_tokenizer_golden.jsonl");
  size_t samples = 0;
  for (const auto& g : golden) {
    if (g.contains("digest")) {
      const auto& d = g["digest"];
      uint64_t h = 0xcbf29ce484222325ull;
      int64_t texts = 0, tokens = 0;
      for (const auto& rel : d["files"]) {
        for (const auto& rec : read_jsonl(source_dir() + "/" + rel.get<std::string>())) {
          for (const auto& m : rec["conversations"]) {
            const auto ids = tok.encode(m["value"].get<std::string>());
            h = fnv1a64(ids, h);
            ++texts;
            tokens += static_cast<int64_t>(ids.size());
          }
        }
      }
      char hex[17];
      std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
      CHECK(texts == d["texts"].get<int64_t>());
      CHECK(tokens == d["tokens"].get<int64_t>());
      CHECK(std::string(hex) == d["fnv1a64"].get<std::string>());
      continue;
    }
    const std::string text = g["text"];
    CAPTURE(text);
    CHECK(tok.encode(text) == g["ids"].get<std::vector<int32_t>>());
    CHECK(tok.encode(text, true) == g["ids_special"].get<std::vector<int32_t>>());
    CHECK(tok.decode(g["ids"].get<std::vector<int32_t>>()) == text);
    ++samples;
  }
  CHECK(samples >= 30);
}

TEST_CASE("the demo SFT set loads with the default template, nothing dropped or truncated") {
  for (const auto& [split, n] : {std::pair<std::string, int64_t>{"train", 480}, {"validation", 48}}) {
    CAPTURE(split);
    DatasetOptions o = tiny_options(source_dir() + "/inputs/data/sharegpt/" + split);
    o.num_workers = 2;
    DatasetStats st;
    const auto ex = load_dataset(o, &st);
    CHECK(st.examples == n);
    CHECK(st.records == n);
    CHECK(st.skipped + st.no_pairs + st.truncated + st.dropped_no_labels == 0);
    for (const Example& e : ex) {
      CHECK(e.input_ids.size() == e.labels.size());
      CHECK(e.input_ids.front() == 1);
      CHECK(e.input_ids.back() == 2);
      CHECK(*std::max_element(e.input_ids.begin(), e.input_ids.end()) < 512);
      CHECK(e.input_ids.size() < 256);
    }
  }
}
