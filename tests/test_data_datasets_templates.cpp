// Chat templates: every template's exact text for a 2-turn conversation with a system
// prompt (MedicalGPT's template.py strings), the same text decoded back from the tokenized
// examples (tiny tokenizer), and the real Qwen3 / Llama-2 vocabularies when ../shared has them.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>

#include "test_data_datasets_util.hpp"

using namespace ftune;
using namespace ftune::test;
using Ids = std::vector<int32_t>;

namespace {

const std::vector<std::pair<std::string, std::string>> kTurns = {{"Q1", "A1"}, {"Q2", "A2"}};

// name -> {first prompt, second prompt} with system prompt "SYS".
const std::map<std::string, std::pair<std::string, std::string>> kExpected = {
    {"vicuna", {"SYS</s>USER: Q1 ASSISTANT:", "</s>USER: Q2 ASSISTANT:"}},
    {"base", {"SYS</s>Q1", "</s>Q2"}},
    {"alpaca", {"SYS\n\n### Instruction:\nQ1\n\n### Response:\n", "\n\n### Instruction:\nQ2\n\n### Response:\n"}},
    {"baichuan", {"SYS</s><reserved_102>Q1<reserved_103>", "</s><reserved_102>Q2<reserved_103>"}},
    {"baichuan2", {"SYS</s><reserved_106>Q1<reserved_107>", "</s><reserved_106>Q2<reserved_107>"}},
    {"ziya", {"SYS\n<human>:Q1\n<bot>:", "\n<human>:Q2\n<bot>:"}},
    {"linly", {"SYS\nUser: Q1\nBot: ", "\nUser: Q2\nBot: "}},
    {"chatglm", {"SYS\n问：Q1\n答：", "\n问：Q2\n答："}},
    {"chatglm2", {"SYS\n\n问：Q1\n\n答：", "\n\n问：Q2\n\n答："}},
    {"chatglm3", {"SYS\n<|user|>\nQ1<|assistant|>", "\n<|user|>\nQ2<|assistant|>"}},
    {"phoenix", {"SYS</s>Human: <s>Q1</s>Assistant: ", "</s>Human: <s>Q2</s>Assistant: "}},
    {"belle", {"SYS\n\nHuman: Q1\n\nBelle: ", "\n\nHuman: Q2\n\nBelle: "}},
    {"aquila", {"SYS###Human: Q1###Assistant:", "###Human: Q2###Assistant:"}},
    {"intern", {"SYS<eoa>\n<|User|>:Q1<eoh>\n<|Bot|>:", "<eoa>\n<|User|>:Q2<eoh>\n<|Bot|>:"}},
    {"intern2",
     {"SYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n",
      "<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"}},
    {"starchat",
     {"SYS<|end|>\n<|user|>\nQ1<|end|>\n<|assistant|>\n", "<|end|>\n<|user|>\nQ2<|end|>\n<|assistant|>\n"}},
    {"llama2", {"SYS</s>[INST] Q1 [/INST]", "</s>[INST] Q2 [/INST]"}},
    {"llama3",
     {"SYS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
      "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"}},
    {"llama2-zh", {"SYS</s>[INST] Q1 [/INST]", "</s>[INST] Q2 [/INST]"}},
    {"mistral", {"SYS</s>[INST] Q1 [/INST]", "</s>[INST] Q2 [/INST]"}},
    {"xverse", {"SYS</s>Human: Q1\n\nAssistant: ", "</s>Human: Q2\n\nAssistant: "}},
    {"chatml",
     {"SYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n",
      "<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"}},
    {"deepseek", {"SYS</s>User: Q1\n\nAssistant:", "</s>User: Q2\n\nAssistant:"}},
    {"yi", {"SYS\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n", "\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"}},
    {"orion", {"SYS</s>Human: Q1\n\nAssistant: </s>", "</s>Human: Q2\n\nAssistant: </s>"}},
    {"cohere",
     {"SYS</s><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Q1<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
      "</s><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Q2<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"}},
    {"qwen", {"SYS\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n", "\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"}},
};

std::string conversation_line(const std::string& system, const std::vector<std::pair<std::string, std::string>>& turns) {
  nlohmann::json conv = nlohmann::json::array();
  if (!system.empty()) conv.push_back({{"from", "system"}, {"value", system}});
  for (const auto& [q, a] : turns) {
    conv.push_back({{"from", "human"}, {"value", q}});
    conv.push_back({{"from", "gpt"}, {"value", a}});
  }
  return nlohmann::json{{"conversations", conv}}.dump();
}

}  // namespace

TEST_CASE("every registered template renders MedicalGPT's exact strings") {
  CHECK(chat_template_names().size() == kExpected.size());
  for (const auto& name : chat_template_names()) {
    CAPTURE(name);
    REQUIRE(kExpected.count(name) == 1);
    const auto dialog = get_chat_template(name).render(kTurns, "SYS");
    REQUIRE(dialog.size() == 4);
    CHECK(dialog[0] == kExpected.at(name).first);
    CHECK(dialog[1] == "A1");
    CHECK(dialog[2] == kExpected.at(name).second);
    CHECK(dialog[3] == "A2");
  }
}

TEST_CASE("default system prompts") {
  auto first = [](const std::string& name) { return get_chat_template(name).render(kTurns)[0]; };
  CHECK(first("vicuna") ==
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions.</s>USER: Q1 ASSISTANT:");
  CHECK(first("alpaca") ==
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nQ1\n\n### Response:\n");
  CHECK(first("llama2").rfind("<<SYS>>\nYou are a helpful, respectful and honest assistant. ", 0) == 0);
  CHECK(first("llama2").find("please don't share false information.\n<</SYS>>\n\n</s>[INST] Q1 [/INST]") !=
        std::string::npos);
  CHECK(first("llama3") ==
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful, excellent and smart assistant."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\n");
  // qwen = chatml with the system turn built into its default system prompt.
  CHECK(first("qwen") ==
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\n<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\n");
  CHECK(first("chatml") ==
        "You are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n");
  CHECK(first("mistral") == "[INST] Q1 [/INST]");
  // A query containing the placeholder is inserted verbatim.
  CHECK(get_chat_template("mistral").render({{"{query}", "x"}})[0] == "[INST] {query} [/INST]");
  CHECK(get_chat_template("alpaca").stop_str == "</s>");
  CHECK(get_chat_template("qwen").stop_str == "<|im_end|>");
}

TEST_CASE("decoded prompts and answers of every template (tiny tokenizer)") {
  const std::string dir = scratch("ds_templates");
  write_file(dir + "/c.jsonl", conversation_line("SYS", kTurns) + "\n");
  for (const auto& [name, prompts] : kExpected) {
    CAPTURE(name);
    const auto ex = load_dataset(tiny_options(dir, name));
    REQUIRE(ex.size() == 1);
    // bos, then the prompts; a later prompt's leading "</s>" separator is dropped.
    std::string second = prompts.second;
    if (second.rfind("</s>", 0) == 0) second.erase(0, 4);
    CHECK(decode_part(tiny_tokenizer(), ex[0], false) == "<s>" + prompts.first + second);
    CHECK(decode_part(tiny_tokenizer(), ex[0], true) == "A1</s>A2</s>");
    CHECK(ex[0].input_ids.back() == 2);
  }
}

namespace {

std::string real_tokenizer_dir(const std::string& name) { return shared_dir() + "/data/tokenizers/" + name; }

std::vector<Example> load_real(const Tokenizer& tok, const std::string& tok_dir, const std::string& tmpl,
                               const std::string& line) {
  const std::string dir = scratch("ds_real_" + tmpl);
  write_file(dir + "/c.jsonl", line + "\n");
  DatasetOptions o;
  o.dirs = {dir};
  o.tokenizer = &tok;
  o.tokenizer_path = tok_dir;
  o.template_name = tmpl;
  return load_dataset(o);
}

}  // namespace

TEST_CASE("Qwen3 vocabulary: qwen and chatml templates") {
  const std::string tok_dir = real_tokenizer_dir("qwen3");
  if (!std::filesystem::exists(tok_dir + "/tokenizer.json")) {
    MESSAGE("skipping: no Qwen3 tokenizer at " << tok_dir);
    return;
  }
  const Tokenizer tok = Tokenizer::from_dir(tok_dir);
  const int32_t im_start = tok.token_to_id("<|im_start|>"), im_end = tok.token_to_id("<|im_end|>");
  REQUIRE(tok.eos_id() == im_end);
  const std::string line = conversation_line("", {{"What is 2 plus 3?", "5."}, {"And 4 times 5?", "20."}});
  auto ex = load_real(tok, tok_dir, "qwen", line);
  REQUIRE(ex.size() == 1);
  CHECK(ex[0].input_ids.front() == im_start);  // no bos for Qwen
  CHECK(tok.decode(ex[0].input_ids) ==
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\n<|im_start|>user\nWhat is 2 plus 3?"
        "<|im_end|>\n<|im_start|>assistant\n5.<|im_end|>\n<|im_start|>user\nAnd 4 times 5?<|im_end|>\n"
        "<|im_start|>assistant\n20.<|im_end|>");
  CHECK(decode_part(tok, ex[0], true) == "5.<|im_end|>20.<|im_end|>");
  CHECK(std::count(ex[0].labels.begin(), ex[0].labels.end(), im_end) == 2);
  // Special tokens stay single ids inside the template text.
  CHECK(std::count(ex[0].input_ids.begin(), ex[0].input_ids.end(), im_start) == 5);

  ex = load_real(tok, tok_dir, "chatml", line);
  REQUIRE(ex.size() == 1);
  // chatml's second prompt starts with "<|im_end|>\n": the leading eos is dropped as in MedicalGPT.
  CHECK(tok.decode(ex[0].input_ids) ==
        "You are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n5.<|im_end|>\n<|im_start|>user\nAnd 4 times 5?<|im_end|>\n"
        "<|im_start|>assistant\n20.<|im_end|>");
}

TEST_CASE("Llama-2 vocabulary: llama2 and vicuna templates, bos on the first prompt only") {
  const std::string tok_dir = real_tokenizer_dir("llama2");
  if (!std::filesystem::exists(tok_dir + "/tokenizer.json")) {
    MESSAGE("skipping: no Llama-2 tokenizer at " << tok_dir);
    return;
  }
  const Tokenizer tok = Tokenizer::from_dir(tok_dir);
  REQUIRE(tok.bos_id() == 1);
  REQUIRE(tok.eos_id() == 2);
  const std::vector<std::pair<std::string, std::string>> turns = {{"What is 2 plus 3?", "5."},
                                                                  {"And 4 times 5?", "20."}};
  for (const std::string tmpl : {"llama2", "vicuna", "mistral"}) {
    CAPTURE(tmpl);
    const auto dialog = get_chat_template(tmpl).render(turns, "Be brief.");
    const auto ex = load_real(tok, tok_dir, tmpl, conversation_line("Be brief.", turns));
    REQUIRE(ex.size() == 1);
    Ids p1 = tok.encode(dialog[0], true), a1 = tok.encode(dialog[1]);
    Ids p2 = tok.encode(dialog[2]), a2 = tok.encode(dialog[3]);
    CHECK(p1.front() == 1);
    REQUIRE(p2.front() == 2);  // "</s>" separator, dropped
    p2.erase(p2.begin());
    Ids ids = p1, labels(p1.size(), -100);
    for (const Ids* part : {&a1}) ids.insert(ids.end(), part->begin(), part->end());
    labels.insert(labels.end(), a1.begin(), a1.end());
    ids.push_back(2);
    labels.push_back(2);
    ids.insert(ids.end(), p2.begin(), p2.end());
    labels.insert(labels.end(), p2.size(), -100);
    ids.insert(ids.end(), a2.begin(), a2.end());
    labels.insert(labels.end(), a2.begin(), a2.end());
    ids.push_back(2);
    labels.push_back(2);
    CHECK(ex[0].input_ids == ids);
    CHECK(ex[0].labels == labels);
    CHECK(std::count(ex[0].input_ids.begin(), ex[0].input_ids.end(), 1) == 1);
  }
}
