// Text datasets (ftune::load_dataset): record formats, MedicalGPT's encoding (labels, eos per
// answer, truncation), file handling, errors, max_samples, validation split and parallel
// tokenization, on the in-repo tiny tokenizer. Templates: test_data_datasets_templates.cpp;
// cache: test_data_datasets_cache.cpp; bundled demo data: test_data_datasets_demo.cpp.
#include "test_data_datasets_util.hpp"

using namespace ftune;
using namespace ftune::test;
using Ids = std::vector<int32_t>;

namespace {

const int32_t kBos = 1, kEos = 2;

Ids enc(const std::string& s, bool special = false) { return tiny_tokenizer().encode(s, special); }
Ids cat(std::initializer_list<Ids> parts) {
  Ids out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}
Ids masked(size_t n) { return Ids(n, -100); }

const std::string kConv2 =
    R"({"conversations":[{"from":"system","value":"Be brief."},{"from":"human","value":"What is 2 plus 3?"},)"
    R"({"from":"gpt","value":"2 plus 3 is 5."},{"from":"human","value":"And 4 times 5?"},)"
    R"({"from":"gpt","value":"4 times 5 is 20."}]})";

std::vector<Example> load_one(const std::string& name, const std::string& line, DatasetOptions o = {},
                              DatasetStats* stats = nullptr) {
  const std::string dir = scratch("ds_" + name);
  write_file(dir + "/data.jsonl", line + "\n");
  DatasetOptions opt = tiny_options(dir);
  opt.train_on_inputs = o.train_on_inputs;
  if (o.max_length != 2048) opt.max_length = o.max_length;
  return load_dataset(opt, stats);
}

}  // namespace

TEST_CASE("ShareGPT with vicuna: MedicalGPT's ids, labels and eos after every answer") {
  DatasetStats st;
  const auto ex = load_one("sharegpt", kConv2, {}, &st);
  REQUIRE(ex.size() == 1);
  // First prompt with add_special_tokens (bos), answers without; the second prompt starts
  // with the "</s>" separator, which MedicalGPT drops (the eos after answer 1 stands in).
  const Ids p1 = enc("Be brief.</s>USER: What is 2 plus 3? ASSISTANT:", true);
  Ids p2 = enc("</s>USER: And 4 times 5? ASSISTANT:");
  REQUIRE(p2.front() == kEos);
  p2.erase(p2.begin());
  const Ids a1 = enc("2 plus 3 is 5."), a2 = enc("4 times 5 is 20.");
  CHECK(p1.front() == kBos);
  CHECK(ex[0].input_ids == cat({p1, a1, {kEos}, p2, a2, {kEos}}));
  CHECK(ex[0].labels == cat({masked(p1.size()), a1, {kEos}, masked(p2.size()), a2, {kEos}}));
  CHECK(decode_all(tiny_tokenizer(), ex[0]) ==
        "<s>Be brief.</s>USER: What is 2 plus 3? ASSISTANT:2 plus 3 is 5.</s>"
        "USER: And 4 times 5? ASSISTANT:4 times 5 is 20.</s>");
  CHECK(decode_part(tiny_tokenizer(), ex[0], true) == "2 plus 3 is 5.</s>4 times 5 is 20.</s>");
  CHECK(st.records == 1);
  CHECK(st.examples == 1);
  CHECK(st.truncated == 0);
  CHECK(st.tokens == static_cast<int64_t>(ex[0].input_ids.size()));
  CHECK(st.label_tokens == static_cast<int64_t>(a1.size() + a2.size() + 2));
  CHECK_FALSE(st.cache_hit);
}

TEST_CASE("train_on_inputs labels the prompts too") {
  DatasetOptions o;
  o.train_on_inputs = true;
  const auto ex = load_one("inputs", kConv2, o);
  REQUIRE(ex.size() == 1);
  CHECK(ex[0].labels == ex[0].input_ids);
}

TEST_CASE("message styles: user/assistant roles, role/content keys, messages, top-level system") {
  const auto ref = load_one("style_ref", kConv2);
  const std::string turns =
      R"({"role":"user","content":"What is 2 plus 3?"},{"role":"assistant","content":"2 plus 3 is 5."},)"
      R"({"role":"user","content":"And 4 times 5?"},{"role":"assistant","content":"4 times 5 is 20."})";
  for (const std::string& line : {
           R"({"messages":[{"role":"system","content":"Be brief."},)" + turns + "]}",
           R"({"system":"Be brief.","messages":[)" + turns + "]}",
           R"({"system_prompt":"Be brief.","conversations":[)" + turns + "]}",
       }) {
    CAPTURE(line);
    CHECK(load_one("style", line)[0].input_ids == ref[0].input_ids);
  }
}

TEST_CASE("MedicalGPT's dialog rules: leading non-human skipped, unknown role ends, odd dropped") {
  const std::string q = R"({"from":"human","value":"Q"})", a = R"({"from":"gpt","value":"A"})";
  const auto one_turn = load_one("rule_ref", "{\"conversations\":[" + q + "," + a + "]}");
  // A leading answer is skipped; a tool message ends the conversation after the first pair.
  CHECK(load_one("rule_skip", "{\"conversations\":[" + a + "," + q + "," + a + "]}")[0].input_ids ==
        one_turn[0].input_ids);
  CHECK(load_one("rule_tool", "{\"conversations\":[" + q + "," + a +
                                  R"(,{"from":"tool","value":"x"},)" + q + "," + a + "]}")[0]
            .input_ids == one_turn[0].input_ids);
  // No complete pair: counted, and with nothing else the dataset is empty.
  const std::string dir = scratch("ds_rule_odd");
  write_file(dir + "/a.jsonl", "{\"conversations\":[" + q + "," + a + "," + q + "]}\n{\"conversations\":[" + q +
                                   "]}\n{\"conversations\":[" + q + "," + a + "]}\n");
  DatasetStats st;
  CHECK(load_dataset(tiny_options(dir), &st).size() == 1);
  CHECK(st.no_pairs == 2);
  write_file(dir + "/a.jsonl", "{\"conversations\":[" + q + "]}\n");
  CHECK(error_of([&] { load_dataset(tiny_options(dir)); }).find("no usable examples") != std::string::npos);
}

TEST_CASE("Alpaca records: instruction + \\n\\n + input, as MedicalGPT's convert_dataset.py") {
  auto ids_of = [](const std::string& name, const std::string& line) { return load_one(name, line)[0].input_ids; };
  const auto sharegpt = [&](const std::string& q) {
    return ids_of("alp_ref", R"({"conversations":[{"from":"human","value":")" + q +
                                 R"("},{"from":"gpt","value":"Out."}]})");
  };
  CHECK(ids_of("alp1", R"({"instruction":"Do it.","input":"Some input","output":"Out."})") ==
        sharegpt("Do it.\\n\\nSome input"));
  CHECK(ids_of("alp2", R"({"instruction":"Do it.","input":"  ","output":"Out."})") == sharegpt("Do it."));
  CHECK(ids_of("alp3", R"({"instruction":"Do it.","output":"Out."})") == sharegpt("Do it."));
  CHECK(ids_of("alp4", R"({"input":"Just a question?","output":"Out."})") == sharegpt("Just a question?"));
}

TEST_CASE("text records: bos + text + eos, every token labelled, long texts cut into blocks") {
  const std::string text = "The capital of France is Paris. The capital of Peru is Lima. 12 plus 30 is 42.";
  const Ids full = cat({enc(text, true), {kEos}});
  REQUIRE(full.front() == kBos);
  auto ex = load_one("text", R"({"text":")" + text + "\"}");
  REQUIRE(ex.size() == 1);
  CHECK(ex[0].input_ids == full);
  CHECK(ex[0].labels == full);

  DatasetOptions o;
  o.max_length = 8;
  DatasetStats st;
  ex = load_one("text_blocks", R"({"text":")" + text + "\"}", o, &st);
  Ids joined;
  for (size_t k = 0; k < ex.size(); ++k) {
    CHECK(ex[k].labels == ex[k].input_ids);
    CHECK(ex[k].input_ids.size() <= 8);
    if (k + 1 < ex.size()) CHECK(ex[k].input_ids.size() == 8);
    joined.insert(joined.end(), ex[k].input_ids.begin(), ex[k].input_ids.end());
  }
  // A 1-token last block has nothing to predict and is dropped; all other tokens are kept.
  CHECK(joined.size() + static_cast<size_t>(st.dropped_no_labels) == full.size());
  CHECK(Ids(full.begin(), full.begin() + joined.size()) == joined);
  CHECK(st.truncated == 0);
}

TEST_CASE("pre-tokenized records: labels optional, truncated to max_length, all -100 dropped") {
  const std::string dir = scratch("ds_tokens");
  write_file(dir + "/t.jsonl",
             "{\"input_ids\":[5,6,7,8,9,10]}\n"
             "{\"input_ids\":[5,6,7],\"labels\":[-100,6,7]}\n"
             "{\"input_ids\":[5,6,7],\"labels\":[-100,-100,-100]}\n"
             "{\"input_ids\":[5,6,7,8,9,10],\"labels\":[-100,-100,-100,-100,-100,10]}\n");
  DatasetOptions o = tiny_options(dir, "vicuna", 4);
  o.tokenizer = nullptr;  // every record is pre-tokenized: no tokenizer needed
  DatasetStats st;
  const auto ex = load_dataset(o, &st);
  REQUIRE(ex.size() == 2);
  CHECK(ex[0].input_ids == Ids{5, 6, 7, 8});
  CHECK(ex[0].labels == Ids{5, 6, 7, 8});
  CHECK(ex[1].labels == Ids{-100, 6, 7});
  CHECK(st.truncated == 2);
  CHECK(st.dropped_no_labels == 2);  // all -100, and the one whose only label was cut off
}

TEST_CASE("truncation keeps the first turns whole; proportional cut only for an oversized turn") {
  // Three turns; the budget holds two whole turns but not the third.
  const std::string line =
      R"({"conversations":[{"from":"human","value":"What is 2 plus 3?"},{"from":"gpt","value":"2 plus 3 is 5."},)"
      R"({"from":"human","value":"And 4 times 5?"},{"from":"gpt","value":"4 times 5 is 20."},)"
      R"({"from":"human","value":"What is the capital of Peru?"},{"from":"gpt","value":"The capital of Peru is Lima."}]})";
  const auto full = load_one("trunc_full", line);
  const Ids p3 = cat({enc("</s>USER: What is the capital of Peru? ASSISTANT:")});
  const Ids a3 = enc("The capital of Peru is Lima.");
  const size_t two_turns = full[0].input_ids.size() - (p3.size() - 1) - a3.size() - 1;
  DatasetOptions o;
  o.max_length = static_cast<int64_t>(full[0].input_ids.size()) - 1;
  DatasetStats st;
  const auto cut = load_one("trunc_two", line, o, &st);
  REQUIRE(cut.size() == 1);
  CHECK(cut[0].input_ids == Ids(full[0].input_ids.begin(), full[0].input_ids.begin() + two_turns));
  CHECK(cut[0].input_ids.back() == kEos);
  CHECK(st.truncated == 1);

  // One turn longer than max_length: source and target cut in proportion, eos kept.
  const std::string q = "What is the capital of France? What is the capital of Peru? What is 2 plus 3?";
  const std::string a = "The capital of France is Paris. The capital of Peru is Lima. 2 plus 3 is 5.";
  const Ids src = enc("A chat between a curious user and an artificial intelligence assistant. "
                      "The assistant gives helpful, detailed, and polite answers to the user's questions.</s>"
                      "USER: " + q + " ASSISTANT:", true);
  const Ids tgt = enc(a);
  o.max_length = 40;
  const auto big = load_one("trunc_big", R"({"conversations":[{"from":"human","value":")" + q +
                                             R"("},{"from":"gpt","value":")" + a + "\"}]}", o);
  const double total = static_cast<double>(src.size() + tgt.size());
  const auto max_src = static_cast<size_t>(40.0 * (src.size() / total));
  const auto max_tgt = static_cast<size_t>(40.0 * (tgt.size() / total));
  REQUIRE(big.size() == 1);
  CHECK(big[0].input_ids == cat({Ids(src.begin(), src.begin() + max_src),
                                 Ids(tgt.begin(), tgt.begin() + (max_tgt - 1)), {kEos}}));
  CHECK(big[0].input_ids.size() <= 40);
}

TEST_CASE("files: several dirs in order, .json arrays / JSON Lines / single objects, nested dirs") {
  const std::string a = scratch("ds_files_a"), b = scratch("ds_files_b");
  auto conv = [](const std::string& q) {
    return R"({"conversations":[{"from":"human","value":")" + q + R"("},{"from":"gpt","value":"ok"}]})";
  };
  write_file(b + "/z.jsonl", conv("b1") + "\n\n" + conv("b2") + "\r\n");
  write_file(a + "/sub/x.json", "[\n  " + conv("a1") + ",\n  {\"text\": \"a2, [with] {brackets} \\\" \"}\n]\n");
  write_file(a + "/y.json", conv("a3") + "\n" + conv("a4") + "\n");  // JSON Lines named .json
  write_file(a + "/y2.json", "{\n \"instruction\": \"a5\",\n \"output\": \"ok\"\n}\n");  // one object
  DatasetOptions o = tiny_options(a);
  o.dirs = {b, a};
  DatasetStats st;
  const auto ex = load_dataset(o, &st);
  REQUIRE(ex.size() == 7);
  CHECK(st.records == 7);
  const auto& tok = tiny_tokenizer();
  CHECK(decode_part(tok, ex[0], false).find("USER: b1 ") != std::string::npos);
  CHECK(decode_part(tok, ex[1], false).find("USER: b2 ") != std::string::npos);
  CHECK(decode_part(tok, ex[2], false).find("USER: a1 ") != std::string::npos);  // a/sub/x.json
  CHECK(decode_all(tok, ex[3]) == "<s>a2, [with] {brackets} \" </s>");
  CHECK(decode_part(tok, ex[4], false).find("USER: a3 ") != std::string::npos);  // a/y.json
  CHECK(decode_part(tok, ex[6], false).find("USER: a5 ") != std::string::npos);  // a/y2.json
}

TEST_CASE("malformed records: file:line errors, or skipped and counted") {
  const std::string dir = scratch("ds_bad");
  const std::string good = R"({"conversations":[{"from":"human","value":"Q"},{"from":"gpt","value":"A"}]})";
  write_file(dir + "/a.jsonl", good + "\n" + good + "\n{\"conversations\": [\n" + good + "\n");
  DatasetOptions o = tiny_options(dir);
  std::string err = error_of([&] { load_dataset(o); });
  CHECK(err.find(dir + "/a.jsonl:3: invalid JSON") == 0);
  o.skip_bad_examples = true;
  DatasetStats st;
  CHECK(load_dataset(o, &st).size() == 3);
  CHECK(st.skipped == 1);
  CHECK(st.records == 4);

  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"foo":1})", "unrecognised record"},
      {R"([1,2])", "must be a JSON object"},
      {R"({"conversations":{"from":"human"}})", "\"conversations\" must be an array"},
      {R"({"conversations":[{"from":"human","value":3}]})", "message 1 needs a string \"value\""},
      {R"({"conversations":[{"value":"Q"}]})", "message 1 needs a string \"from\""},
      {R"({"instruction":"I","output":7})", "\"output\" must be a string"},
      {R"({"text":["x"]})", "\"text\" must be a string"},
      {R"({"input_ids":[1,"a"]})", "\"input_ids\" must contain only integers"},
      {R"({"system":5,"conversations":[]})", "\"system\" must be a string"},
  };
  for (const auto& [line, what] : cases) {
    CAPTURE(line);
    write_file(dir + "/a.jsonl", good + "\n" + line + "\n");
    o.skip_bad_examples = false;
    err = error_of([&] { load_dataset(o); });
    CHECK(err.find(dir + "/a.jsonl:2: ") == 0);
    CHECK(err.find(what) != std::string::npos);
    o.skip_bad_examples = true;
    CHECK(load_dataset(o, &st).size() == 1);
    CHECK(st.skipped == 1);
  }
  // A JSON array element reports the line it starts on.
  std::filesystem::remove(dir + "/a.jsonl");
  write_file(dir + "/b.json", "[\n" + good + ",\n" + good + ",\n{\"text\": oops}\n]");
  o.skip_bad_examples = false;
  CHECK(error_of([&] { load_dataset(o); }).find(dir + "/b.json:4: invalid JSON") == 0);
  write_file(dir + "/b.json", "[\n" + good + ",\n{\"text\": \"x\"\n");  // unterminated
  o.skip_bad_examples = true;  // a broken file is never skipped silently
  CHECK(error_of([&] { load_dataset(o); }).find(dir + "/b.json:3: unterminated") == 0);
}

TEST_CASE("empty data and examples that lose every label are clear errors") {
  const std::string dir = scratch("ds_empty");
  write_file(dir + "/a.jsonl", "\n\n");
  CHECK(error_of([&] { load_dataset(tiny_options(dir)); }).find("no records in " + dir) == 0);
  write_file(dir + "/a.jsonl",
             R"({"conversations":[{"from":"human","value":"What is the capital of France? Tell me now."},)"
             R"({"from":"gpt","value":"Paris."}]})" "\n");
  // With room for little more than the prompt, the answer never fits.
  const std::string err = error_of([&] { load_dataset(tiny_options(dir, "alpaca", 6)); });
  CHECK(err.find("lost all its labels") != std::string::npos);
  CHECK(err.find("model_max_length=6") != std::string::npos);
  CHECK(error_of([&] { load_dataset(tiny_options(dir, "no-such-template")); })
            .find("unknown template_name 'no-such-template' (valid: alpaca, aquila, baichuan, baichuan2, base,") == 0);
  CHECK(error_of([&] { load_dataset(tiny_options(scratch("ds_empty_dir"))); }).find("has no *.jsonl") !=
        std::string::npos);
}

TEST_CASE("text data without a tokenizer names the file and tokenizer.json") {
  const std::string dir = scratch("ds_notok");
  write_file(dir + "/a.jsonl", "{\"input_ids\":[1,2,3]}\n{\"text\":\"hello\"}\n");
  DatasetOptions o = tiny_options(dir);
  o.tokenizer = nullptr;
  o.skip_bad_examples = true;  // not a malformed record: never skipped
  const std::string err = error_of([&] { load_dataset(o); });
  CHECK(err.find(dir + "/a.jsonl:2: ") == 0);
  CHECK(err.find("tokenizer.json") != std::string::npos);
}

TEST_CASE("max_samples keeps the first examples; parallel tokenization equals serial") {
  const std::string dir = source_dir() + "/inputs/data/sharegpt/train";
  DatasetOptions o = tiny_options(dir);
  const auto serial = load_dataset(o);
  o.num_workers = 4;
  DatasetStats st;
  const auto parallel = load_dataset(o, &st);
  REQUIRE(parallel.size() == serial.size());
  for (size_t i = 0; i < serial.size(); ++i) {
    CHECK(parallel[i].input_ids == serial[i].input_ids);
    CHECK(parallel[i].labels == serial[i].labels);
  }
  o.num_workers = 1;
  o.max_samples = 300;  // beyond the first batch of 256 records
  DatasetStats st2;
  const auto first = load_dataset(o, &st2);
  REQUIRE(first.size() == 300);
  for (size_t i = 0; i < first.size(); ++i) CHECK(first[i].input_ids == serial[i].input_ids);
  CHECK(st2.records == 300);
}

TEST_CASE("split_validation takes the last percentage, at least one, leaves training one") {
  std::vector<Example> ex(10);
  for (int i = 0; i < 10; ++i) ex[i].input_ids = {i};
  auto [train, val] = split_validation(ex, 10);
  CHECK(train.size() == 9);
  REQUIRE(val.size() == 1);
  CHECK(val[0].input_ids == Ids{9});
  CHECK(split_validation(ex, 1).second.size() == 1);    // floor(0.1) -> at least 1
  CHECK(split_validation(ex, 35).second.size() == 3);   // floor(3.5)
  CHECK(split_validation(ex, 0).second.empty());
  CHECK(split_validation(ex, 100).first.size() == 1);   // training keeps one
  CHECK(split_validation(std::vector<Example>(1), 50).second.empty());
  CHECK(error_of([&] { split_validation(ex, -1); }).find("validation_split_percentage") == 0);
  const auto again = split_validation(ex, 35);
  CHECK(again.second[0].input_ids == Ids{7});
}
