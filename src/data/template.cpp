// Conversation templates, transcribed string for string from MedicalGPT's template.py
// (shibing624/MedicalGPT @ 99bdd2fae05e8f8bc97b5b0cf3f355bf5c8effee), so that a user's
// --template_name produces the same text. Quirks kept on purpose (token parity with
// MedicalGPT runs): "chatml"'s default system prompt has no "<|im_start|>system" wrapper,
// "qwen"'s has it built in (so a record's own system prompt replaces the whole wrapper),
// and vicuna/llama2 put "</s>" between the system prompt and the first query.
// Left out: "deepseekcoder", whose prompt "{{content}}" never inserts the query in
// MedicalGPT (str.format turns it into the literal "{content}").
#include <algorithm>
#include <map>
#include <stdexcept>

#include "ftune/data/dataset.hpp"

namespace ftune {
namespace {

const char* const kLlama2System =
    "<<SYS>>\nYou are a helpful, respectful and honest assistant. "
    "Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, "
    "explain why instead of answering something not correct. "
    "If you don't know the answer to a question, please don't share false information.\n<</SYS>>\n\n";

const char* const kHumanAssistantSystem =
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.";

std::map<std::string, ChatTemplate> make_registry() {
  // {name, system_prompt, prompt, sep, stop_str}; MedicalGPT's default stop_str is "</s>".
  const std::vector<ChatTemplate> all = {
      {"vicuna",
       "A chat between a curious user and an artificial intelligence assistant. "
       "The assistant gives helpful, detailed, and polite answers to the user's questions.",
       "USER: {query} ASSISTANT:", "</s>", "</s>"},
      {"base", "", "{query}", "</s>", "</s>"},
      {"alpaca",
       "Below is an instruction that describes a task. "
       "Write a response that appropriately completes the request.",
       "### Instruction:\n{query}\n\n### Response:\n", "\n\n", "</s>"},
      {"baichuan", "", "<reserved_102>{query}<reserved_103>", "</s>", "</s>"},
      {"baichuan2", "", "<reserved_106>{query}<reserved_107>", "</s>", "</s>"},
      {"ziya", "", "<human>:{query}\n<bot>:", "\n", "</s>"},
      {"linly", "", "User: {query}\nBot: ", "\n", "</s>"},
      {"chatglm", "", "问：{query}\n答：", "\n", "</s>"},
      {"chatglm2", "", "问：{query}\n\n答：", "\n\n", "</s>"},
      {"chatglm3", "", "<|user|>\n{query}<|assistant|>", "\n", "<|user|>"},
      {"phoenix", std::string(kHumanAssistantSystem) + "\n\n", "Human: <s>{query}</s>Assistant: ",
       "</s>", "</s>"},
      {"belle", "", "Human: {query}\n\nBelle: ", "\n\n", "</s>"},
      {"aquila", kHumanAssistantSystem, "Human: {query}###Assistant:", "###", "</s>"},
      {"intern", "", "<|User|>:{query}<eoh>\n<|Bot|>:", "<eoa>\n", "<eoa>"},
      {"intern2",
       "<|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).\n<|im_end|>\n",
       "<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>"},
      {"starchat", "<system>\n", "<|user|>\n{query}<|end|>\n<|assistant|>\n", "<|end|>\n", "<|end|>"},
      {"llama2", kLlama2System, "[INST] {query} [/INST]", "</s>", "</s>"},
      {"llama3",
       "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful, excellent and smart assistant.",
       "<|start_header_id|>user<|end_header_id|>\n\n{query}<|eot_id|>"
       "<|start_header_id|>assistant<|end_header_id|>\n\n",
       "<|eot_id|>", "<|eot_id|>"},
      {"llama2-zh",
       "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n [/INST]",
       "[INST] {query} [/INST]", "</s>", "</s>"},
      {"mistral", "", "[INST] {query} [/INST]", "</s>", "</s>"},
      {"xverse", "", "Human: {query}\n\nAssistant: ", "</s>", "</s>"},
      {"chatml", "You are a helpful assistant.",
       "<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>"},
      {"deepseek", "", "User: {query}\n\nAssistant:", "</s>", "</s>"},
      {"yi", "", "<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n", "\n", "<|im_end|>"},
      {"orion", "", "Human: {query}\n\nAssistant: </s>", "</s>", "</s>"},
      {"cohere", "<BOS_TOKEN>",
       "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{query}<|END_OF_TURN_TOKEN|>"
       "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
       "</s>", "</s>"},
      {"qwen", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
       "<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n", "\n", "<|im_end|>"},
  };
  std::map<std::string, ChatTemplate> reg;
  for (const ChatTemplate& t : all) reg.emplace(t.name, t);
  return reg;
}

const std::map<std::string, ChatTemplate>& registry() {
  static const std::map<std::string, ChatTemplate> reg = make_registry();
  return reg;
}

// Python's prompt.format(query=q) for a prompt with one "{query}" and no other braces
// (true of every registered template). Substituted once, so a query that itself contains
// "{query}" stays as written.
std::string format_prompt(const std::string& prompt, const std::string& query) {
  static const std::string kField = "{query}";
  const size_t at = prompt.find(kField);
  if (at == std::string::npos) return prompt;
  return prompt.substr(0, at) + query + prompt.substr(at + kField.size());
}

}  // namespace

std::vector<std::string> ChatTemplate::render(
    const std::vector<std::pair<std::string, std::string>>& turns, const std::string& system) const {
  // Conversation._format_example: `system_prompt or self.system_prompt`, then a separator
  // after a non-empty system prompt; later turns start with the separator.
  const std::string& sys = system.empty() ? system_prompt : system;
  const std::string sys_part = sys.empty() ? std::string() : sys + sep;
  std::vector<std::string> out;
  out.reserve(turns.size() * 2);
  for (size_t i = 0; i < turns.size(); ++i) {
    out.push_back((i == 0 ? sys_part : sep) + format_prompt(prompt, turns[i].first));
    out.push_back(turns[i].second);
  }
  return out;
}

std::vector<std::string> chat_template_names() {
  std::vector<std::string> names;
  for (const auto& [name, t] : registry()) names.push_back(name);
  return names;  // std::map keeps them sorted
}

const ChatTemplate& get_chat_template(const std::string& name) {
  const auto& reg = registry();
  if (auto it = reg.find(name); it != reg.end()) return it->second;
  std::string valid;
  for (const auto& n : chat_template_names()) valid += (valid.empty() ? "" : ", ") + n;
  throw std::invalid_argument("unknown template_name '" + name + "' (valid: " + valid + ")");
}

}  // namespace ftune
