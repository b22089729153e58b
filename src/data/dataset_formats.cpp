// One JSON record to a ParsedRecord: format detection and MedicalGPT's conversation rules.
#include <stdexcept>

#include "dataset_internal.hpp"

namespace ftune::dataset {
namespace {

using nlohmann::json;

enum class Role { Human, Gpt, System, Other };

// MedicalGPT's roles are "human"/"gpt" (plus a leading "system"); "user"/"assistant" are
// their OpenAI-style names.
Role role_of(const std::string& r) {
  if (r == "human" || r == "user") return Role::Human;
  if (r == "gpt" || r == "assistant") return Role::Gpt;
  if (r == "system") return Role::System;
  return Role::Other;
}

struct Message {
  Role role;
  std::string value;
};

std::string optional_string(const json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return {};
  if (!it->is_string()) throw std::runtime_error(where + ": \"" + key + "\" must be a string");
  return it->get<std::string>();
}

std::vector<Message> read_messages(const json& arr, const char* key, const std::string& where) {
  if (!arr.is_array())
    throw std::runtime_error(where + ": \"" + key + "\" must be an array of messages");
  std::vector<Message> out;
  out.reserve(arr.size());
  for (size_t k = 0; k < arr.size(); ++k) {
    const json& m = arr[k];
    const std::string at = where + ": message " + std::to_string(k + 1);
    if (!m.is_object()) throw std::runtime_error(at + " is not an object");
    const char* role_key = m.contains("from") ? "from" : "role";
    const char* value_key = m.contains("value") ? "value" : "content";
    auto r = m.find(role_key);
    if (r == m.end() || !r->is_string())
      throw std::runtime_error(at + " needs a string \"from\" (or \"role\")");
    auto v = m.find(value_key);
    if (v == m.end() || !v->is_string())
      throw std::runtime_error(at + " needs a string \"value\" (or \"content\")");
    out.push_back({role_of(r->get<std::string>()), v->get<std::string>()});
  }
  return out;
}

// supervised_finetuning.py get_dialog(): a leading system message becomes the system
// prompt; a first message not from the human is skipped; messages are taken while roles
// alternate human/gpt (an out-of-turn message is ignored, an unknown role ends the
// conversation); a conversation without a complete, even list of messages is dropped.
void medicalgpt_dialog(const std::vector<Message>& src, ParsedRecord& rec) {
  rec.no_pairs = true;
  if (src.size() < 2) return;
  size_t b = 0;
  if (src[0].role == Role::System) {
    rec.system = src[0].value;
    b = 1;
  }
  if (src[b].role != Role::Human) ++b;
  if (src.size() - b < 2) return;
  std::vector<const std::string*> msgs;
  for (size_t j = b; j < src.size(); ++j) {
    const Role r = src[j].role;
    if (r != Role::Human && r != Role::Gpt) break;  // MedicalGPT: "unknown role ... (ignored)"
    if (r == ((j - b) % 2 == 0 ? Role::Human : Role::Gpt)) msgs.push_back(&src[j].value);
  }
  if (msgs.size() < 2 || msgs.size() % 2 != 0) return;
  for (size_t k = 0; k < msgs.size(); k += 2) rec.turns.emplace_back(*msgs[k], *msgs[k + 1]);
  rec.no_pairs = false;
}

bool is_blank(const std::string& s) {
  return s.find_first_not_of(" \t\n\r\f\v") == std::string::npos;
}

}  // namespace

ParsedRecord parse_record(const json& j, const std::string& where) {
  if (!j.is_object()) throw std::runtime_error(where + ": a record must be a JSON object");
  ParsedRecord rec;
  if (j.contains("input_ids")) {
    rec.kind = RecordKind::Tokens;
    rec.tokens = parse_pretokenized_example(j, where);
    return rec;
  }
  const char* conv_key = j.contains("conversations") ? "conversations"
                         : j.contains("messages")    ? "messages"
                                                     : nullptr;
  if (conv_key) {
    rec.kind = RecordKind::Chat;
    medicalgpt_dialog(read_messages(j[conv_key], conv_key, where), rec);
  } else if (j.contains("output") && (j.contains("instruction") || j.contains("input"))) {
    // convert_dataset.py: Alpaca's instruction + "\n\n" + input (when the input is not
    // blank) becomes the human turn; without an instruction it is a QA pair (input, output).
    rec.kind = RecordKind::Chat;
    const std::string input = optional_string(j, "input", where);
    std::string query = input;
    if (j.contains("instruction")) {
      query = optional_string(j, "instruction", where);
      if (!is_blank(input)) query += "\n\n" + input;
    }
    auto out = j.find("output");
    if (!out->is_string()) throw std::runtime_error(where + ": \"output\" must be a string");
    rec.turns.emplace_back(std::move(query), out->get<std::string>());
  } else if (j.contains("text")) {
    rec.kind = RecordKind::Text;
    auto t = j.find("text");
    if (!t->is_string()) throw std::runtime_error(where + ": \"text\" must be a string");
    rec.text = t->get<std::string>();
    return rec;
  } else {
    throw std::runtime_error(
        where + ": unrecognised record; expected \"conversations\" or \"messages\" (ShareGPT), "
                "\"instruction\"/\"input\" + \"output\" (Alpaca), \"text\" (pretraining) or "
                "\"input_ids\" (pre-tokenized)");
  }
  // A system message inside the conversation wins; else MedicalGPT's "system_prompt"
  // column, or a top-level "system".
  if (rec.system.empty()) rec.system = optional_string(j, "system_prompt", where);
  if (rec.system.empty()) rec.system = optional_string(j, "system", where);
  return rec;
}

}  // namespace ftune::dataset
