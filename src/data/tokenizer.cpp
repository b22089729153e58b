// The Tokenizer facade: loads tokenizer.json (+ tokenizer_config.json) and runs HF's
// pipeline: added tokens -> normalizer -> normalized added tokens -> pre-tokenizer -> BPE.
#include "ftune/data/tokenizer.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <unordered_map>

#include "tokenizer_added.hpp"
#include "tokenizer_bpe.hpp"
#include "tokenizer_decoder.hpp"
#include "tokenizer_normalizer.hpp"
#include "tokenizer_pretokenize.hpp"
#include "unicode.hpp"

namespace ftune {
namespace {

using nlohmann::json;

json read_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open file");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    throw std::runtime_error(path + ": invalid JSON: " + e.what());
  }
}

const json& model_of(const json& doc, const std::string& where) {
  auto it = doc.find("model");
  if (it == doc.end() || !it->is_object()) throw std::runtime_error(where + ": no \"model\" object");
  // Old files may omit the type; a merges list means BPE.
  const std::string type = it->value("type", it->contains("merges") ? "BPE" : "");
  if (type != "BPE")
    throw std::runtime_error(where + ": model type '" + type +
                             "' is not supported (only BPE models are)");
  return *it;
}

// A tokenizer_config.json token entry: "<s>", {"content": "<s>", ...} or null.
std::optional<std::string> config_token(const json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content")) return (*it)["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace

struct Tokenizer::Impl {
  std::string where;
  tok::Normalizer normalizer;
  tok::PreTokenizer pre_tokenizer;
  tok::BpeModel model;
  tok::Decoder decoder;
  std::vector<tok::AddedToken> added;  // in file order
  std::unordered_map<int32_t, size_t> added_by_id;
  std::unordered_map<std::string, int32_t> added_by_content;
  tok::AddedTokenMatcher raw_matcher, normalized_matcher;
  std::vector<int32_t> prefix_ids, suffix_ids;  // add_special_tokens
  int32_t bos = -1, eos = -1, pad = -1;
  int64_t vocab_size = 0;

  Impl(const json& doc, std::string where_)
      : where(std::move(where_)),
        normalizer(doc.value("normalizer", json()), where),
        pre_tokenizer(doc.value("pre_tokenizer", json()), where),
        model(model_of(doc, where), pre_tokenizer.byte_level(), where),
        decoder(doc.value("decoder", json()), where) {
    vocab_size = model.id_limit();
    for (const auto& a : doc.value("added_tokens", json::array())) {
      tok::AddedToken t;
      t.id = a.at("id").get<int32_t>();
      t.content = a.at("content").get<std::string>();
      t.single_word = a.value("single_word", false);
      t.lstrip = a.value("lstrip", false);
      t.rstrip = a.value("rstrip", false);
      t.normalized = a.value("normalized", true);
      t.special = a.value("special", false);
      added_by_id[t.id] = added.size();
      added_by_content[t.content] = t.id;
      vocab_size = std::max<int64_t>(vocab_size, int64_t{t.id} + 1);
      if (t.normalized) {
        std::string buf;
        normalized_matcher.add(t, std::string(normalizer.apply(t.content, buf)));
      } else {
        raw_matcher.add(t, t.content);
      }
      added.push_back(std::move(t));
    }
    parse_post_processor(doc.value("post_processor", json()));
  }

  int32_t token_to_id(std::string_view token) const {
    if (auto it = added_by_content.find(std::string(token)); it != added_by_content.end())
      return it->second;
    return model.token_to_id(token);
  }

  // add_special_tokens from the post-processor (used when tokenizer_config.json is silent).
  void parse_post_processor(const json& pp) {
    if (pp.is_null()) return;
    const std::string type = pp.value("type", "");
    auto id_of = [&](const std::string& tok) {
      const int32_t id = token_to_id(tok);
      if (id < 0) throw std::runtime_error(where + ": post-processor token '" + tok + "' unknown");
      return id;
    };
    if (type == "Sequence") {
      for (const auto& sub : pp.at("processors")) parse_post_processor(sub);
    } else if (type == "ByteLevel") {
      // offsets only
    } else if (type == "TemplateProcessing") {
      bool after_sequence = false;
      for (const auto& item : pp.at("single")) {
        if (item.contains("Sequence")) {
          after_sequence = true;
          continue;
        }
        const std::string name = item.at("SpecialToken").at("id").get<std::string>();
        const auto& ids = pp.at("special_tokens").at(name).at("ids");
        auto& dst = after_sequence ? suffix_ids : prefix_ids;
        for (const auto& id : ids) dst.push_back(id.get<int32_t>());
      }
    } else if (type == "BertProcessing" || type == "RobertaProcessing") {
      prefix_ids.push_back(id_of(pp.at("cls").at(0).get<std::string>()));
      suffix_ids.push_back(id_of(pp.at("sep").at(0).get<std::string>()));
    } else {
      throw std::runtime_error(where + ": post-processor '" + type + "' is not supported");
    }
  }

  void apply_config(const json& cfg) {
    auto id_of = [&](const char* key) {
      const auto tok = config_token(cfg, key);
      return tok ? token_to_id(*tok) : -1;
    };
    bos = id_of("bos_token");
    eos = id_of("eos_token");
    pad = id_of("pad_token");
    if (cfg.contains("add_bos_token") || cfg.contains("add_eos_token")) {
      prefix_ids.clear();
      suffix_ids.clear();
      if (cfg.value("add_bos_token", false) && bos >= 0) prefix_ids.push_back(bos);
      if (cfg.value("add_eos_token", false) && eos >= 0) suffix_ids.push_back(eos);
    }
  }

  // Pre-tokenizes one normalized piece and runs the model on each word.
  void encode_words(std::string_view text, bool at_start, std::vector<int32_t>& out) const {
    thread_local std::vector<std::string_view> words;
    thread_local std::deque<std::string> storage;
    words.clear();
    storage.clear();
    pre_tokenizer.split(text, at_start, words, storage);
    for (std::string_view w : words) model.tokenize(w, out);
  }

  void encode_segment(std::string_view segment, bool at_start, std::vector<int32_t>& out) const {
    std::string buffer;
    const std::string_view norm = normalizer.apply(segment, buffer);
    if (normalized_matcher.empty()) return encode_words(norm, at_start, out);
    std::vector<tok::AddedTokenMatcher::Segment> parts;
    normalized_matcher.split(norm, parts);
    for (const auto& p : parts) {
      if (p.id >= 0) out.push_back(p.id);
      else encode_words(norm.substr(p.begin, p.end - p.begin), at_start && p.begin == 0, out);
    }
  }

  void encode(std::string_view text, bool add_special, std::vector<int32_t>& out) const {
    std::string repaired;
    if (!unicode::is_valid_utf8(text)) {
      repaired = unicode::to_valid_utf8(text);
      text = repaired;
    }
    if (add_special) out.insert(out.end(), prefix_ids.begin(), prefix_ids.end());
    if (raw_matcher.empty()) {
      if (!text.empty()) encode_segment(text, true, out);
    } else {
      thread_local std::vector<tok::AddedTokenMatcher::Segment> parts;
      parts.clear();
      raw_matcher.split(text, parts);
      for (const auto& p : parts) {
        if (p.id >= 0) out.push_back(p.id);
        else encode_segment(text.substr(p.begin, p.end - p.begin), p.begin == 0, out);
      }
    }
    if (add_special) out.insert(out.end(), suffix_ids.begin(), suffix_ids.end());
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_file(const std::string& tokenizer_json) {
  return Tokenizer(std::make_unique<Impl>(read_json(tokenizer_json), tokenizer_json));
}

Tokenizer Tokenizer::from_dir(const std::string& dir) {
  const std::filesystem::path d(dir);
  Tokenizer t = from_file((d / "tokenizer.json").string());
  const auto cfg_path = d / "tokenizer_config.json";
  if (std::filesystem::exists(cfg_path)) t.impl_->apply_config(read_json(cfg_path.string()));
  return t;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  impl_->encode(text, add_special_tokens, out);
  return out;
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(const std::vector<std::string>& texts,
                                                          int num_threads,
                                                          bool add_special_tokens) const {
  std::vector<std::vector<int32_t>> out(texts.size());
  size_t threads = num_threads > 0 ? static_cast<size_t>(num_threads)
                                   : std::max(1u, std::thread::hardware_concurrency());
  threads = std::min(threads, std::max<size_t>(1, texts.size()));
  // Texts vary in length, so threads take small chunks from a shared counter.
  constexpr size_t kChunk = 16;
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  auto work = [&] {
    try {
      for (size_t b; !failed && (b = next.fetch_add(kChunk)) < texts.size();) {
        for (size_t i = b; i < std::min(b + kChunk, texts.size()); ++i)
          impl_->encode(texts[i], add_special_tokens, out[i]);
      }
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };
  if (threads <= 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    for (size_t t = 0; t < threads; ++t) pool.emplace_back(work);
    for (auto& th : pool) th.join();
  }
  if (error) std::rethrow_exception(error);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const int32_t id : ids) {
    if (auto it = impl_->added_by_id.find(id); it != impl_->added_by_id.end()) {
      const tok::AddedToken& t = impl_->added[it->second];
      if (!(skip_special_tokens && t.special)) tokens.push_back(t.content);
      continue;
    }
    // Ids without a token are skipped, as HF tokenizers does: a model's embedding table is
    // often padded beyond the tokenizer's vocabulary, and generate may sample such an id.
    if (const std::string* t = impl_->model.id_to_token(id)) tokens.push_back(*t);
  }
  return impl_->decoder.decode(std::move(tokens));
}

int32_t Tokenizer::token_to_id(std::string_view token) const { return impl_->token_to_id(token); }

std::string Tokenizer::id_to_token(int32_t id) const {
  if (auto it = impl_->added_by_id.find(id); it != impl_->added_by_id.end())
    return impl_->added[it->second].content;
  const std::string* t = impl_->model.id_to_token(id);
  return t ? *t : std::string();
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
int32_t Tokenizer::pad_id() const { return impl_->pad; }

}  // namespace ftune
