// The HDF5 dataset cache: miss then hit with identical examples and stats, invalidation
// when a data file, the template, the length or train_on_inputs change, a corrupt file
// rebuilt, atomic writes, and dataset_cache_exists / dataset_cache_path.
#include "test_data_datasets_util.hpp"

using namespace ftune;
using namespace ftune::test;

namespace {

const std::string kLine =
    R"({"conversations":[{"from":"human","value":"What is 2 plus 3?"},{"from":"gpt","value":"2 plus 3 is 5."}]})";

size_t count_files(const std::string& dir) {
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) n += e.is_regular_file();
  return n;
}

void check_same(const std::vector<Example>& a, const std::vector<Example>& b) {
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    CHECK(a[i].input_ids == b[i].input_ids);
    CHECK(a[i].labels == b[i].labels);
  }
}

}  // namespace

TEST_CASE("cache: miss, write, hit with the same examples and stats") {
  const std::string data = scratch("ds_cache_data"), cache = scratch("ds_cache_dir") + "/nested";
  write_file(data + "/a.jsonl", kLine + "\n" + kLine + "\n{broken\n");
  write_file(data + "/b.json", "[" + kLine + "]");
  DatasetOptions o = tiny_options(data);
  o.cache_dir = cache;
  o.skip_bad_examples = true;
  CHECK_FALSE(dataset_cache_exists(o));
  const std::string path = dataset_cache_path(o);
  CHECK(path.rfind(cache + "/ftune-data-", 0) == 0);
  CHECK(path.size() > 3);
  CHECK(path.substr(path.size() - 3) == ".h5");

  DatasetStats first, second;
  const auto built = load_dataset(o, &first);
  CHECK_FALSE(first.cache_hit);
  CHECK(std::filesystem::exists(path));
  CHECK(count_files(cache) == 1);  // no temporary file left behind
  CHECK(dataset_cache_exists(o));

  const auto cached = load_dataset(o, &second);
  CHECK(second.cache_hit);
  check_same(built, cached);
  CHECK(second.records == first.records);
  CHECK(second.examples == 3);
  CHECK(second.skipped == 1);
  CHECK(second.tokens == first.tokens);
  CHECK(second.label_tokens == first.label_tokens);

  // Without the tokenizer path the key falls back to the vocabulary: still a stable key.
  o.tokenizer_path.clear();
  DatasetStats third, fourth;
  load_dataset(o, &third);
  load_dataset(o, &fourth);
  CHECK_FALSE(third.cache_hit);
  CHECK(fourth.cache_hit);
}

TEST_CASE("cache: invalidated by data, template, max_length, train_on_inputs, max_samples") {
  const std::string data = scratch("ds_cache_inv"), cache = scratch("ds_cache_inv_dir");
  write_file(data + "/a.jsonl", kLine + "\n");
  DatasetOptions o = tiny_options(data);
  o.cache_dir = cache;
  DatasetStats st;
  load_dataset(o, &st);
  CHECK_FALSE(st.cache_hit);
  load_dataset(o, &st);
  CHECK(st.cache_hit);

  write_file(data + "/a.jsonl", kLine + "\n" + kLine + "\n");  // the data changed
  CHECK_FALSE(dataset_cache_exists(o));
  auto ex = load_dataset(o, &st);
  CHECK_FALSE(st.cache_hit);
  CHECK(ex.size() == 2);
  write_file(data + "/sub/new.jsonl", kLine + "\n");  // a file was added
  ex = load_dataset(o, &st);
  CHECK_FALSE(st.cache_hit);
  CHECK(ex.size() == 3);

  auto changed = [&](auto edit) {
    DatasetOptions c = o;
    edit(c);
    DatasetStats s1, s2;
    load_dataset(c, &s1);
    load_dataset(c, &s2);
    return !s1.cache_hit && s2.cache_hit;
  };
  CHECK(changed([](DatasetOptions& c) { c.template_name = "alpaca"; }));
  CHECK(changed([](DatasetOptions& c) { c.max_length = 512; }));
  CHECK(changed([](DatasetOptions& c) { c.train_on_inputs = true; }));
  CHECK(changed([](DatasetOptions& c) { c.max_samples = 1; }));
  CHECK(changed([](DatasetOptions& c) { c.skip_bad_examples = true; }));
  DatasetOptions c = o;
  c.num_workers = 3;  // does not change the result, so it shares the cache
  load_dataset(c, &st);
  CHECK(st.cache_hit);
}

TEST_CASE("cache: a corrupt or foreign file is rebuilt") {
  const std::string data = scratch("ds_cache_bad"), cache = scratch("ds_cache_bad_dir");
  write_file(data + "/a.jsonl", kLine + "\n");
  DatasetOptions o = tiny_options(data);
  o.cache_dir = cache;
  const std::string path = dataset_cache_path(o);
  write_file(path, "not an HDF5 file");
  CHECK_FALSE(dataset_cache_exists(o));
  DatasetStats st;
  const auto ex = load_dataset(o, &st);
  CHECK_FALSE(st.cache_hit);
  CHECK(dataset_cache_exists(o));
  const auto again = load_dataset(o, &st);
  CHECK(st.cache_hit);
  check_same(ex, again);
}

TEST_CASE("cache: pre-tokenized data without a tokenizer") {
  const std::string data = scratch("ds_cache_tok"), cache = scratch("ds_cache_tok_dir");
  write_file(data + "/a.jsonl", "{\"input_ids\":[4,5,6],\"labels\":[-100,5,6]}\n{\"input_ids\":[7,8]}\n");
  DatasetOptions o = tiny_options(data);
  o.tokenizer = nullptr;
  o.tokenizer_path.clear();
  o.cache_dir = cache;
  DatasetStats st;
  const auto ex = load_dataset(o, &st);
  CHECK_FALSE(st.cache_hit);
  const auto again = load_dataset(o, &st);
  CHECK(st.cache_hit);
  check_same(ex, again);
  REQUIRE(again.size() == 2);
  CHECK(again[0].labels == std::vector<int32_t>{-100, 5, 6});
  CHECK(again[1].labels == std::vector<int32_t>{7, 8});
  CHECK(dataset_cache_path(DatasetOptions{}).empty());  // no cache_dir, no path
}
