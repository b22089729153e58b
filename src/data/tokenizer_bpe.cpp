#include "tokenizer_bpe.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <queue>
#include <stdexcept>

#include "unicode.hpp"

namespace ftune::tok {

void MergeMap::reserve(size_t n) {
  size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  std::vector<Slot> old = std::move(slots_);
  slots_.assign(cap, Slot{});
  mask_ = cap - 1;
  shift_ = 64 - __builtin_ctzll(cap);
  count_ = 0;
  for (const Slot& s : old)
    if (s.key != kEmpty)
      insert(static_cast<int32_t>(s.key >> 32), static_cast<int32_t>(s.key & 0xFFFFFFFF), s.value);
}

void MergeMap::insert(int32_t a, int32_t b, Value v) {
  if ((count_ + 1) * 2 > slots_.size()) reserve(count_ + 1 > 8 ? (count_ + 1) * 2 : 16);
  const uint64_t key = make_key(a, b);
  for (size_t i = slot_of(key);; i = (i + 1) & mask_) {
    Slot& s = slots_[i];
    if (s.key == key) {
      s.value = v;
      return;
    }
    if (s.key == kEmpty) {
      s.key = key;
      s.value = v;
      ++count_;
      return;
    }
  }
}

namespace {

// Words longer than this are not cached (HF caches words below 256 characters too).
constexpr size_t kMaxCachedWordBytes = 256;
// Short words merge with a linear scan over pair ranks; long ones with a priority queue.
constexpr size_t kMaxLinearScanSymbols = 48;

uint64_t hash_bytes(std::string_view s) {
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ s.size();
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    h = (h ^ w) * 0xBF58476D1CE4E5B9ULL;
    h ^= h >> 31;
  }
  uint64_t w = 0;
  std::memcpy(&w, s.data() + i, s.size() - i);
  h = (h ^ w) * 0x94D049BB133111EBULL;
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ULL;
  h ^= h >> 32;
  return h | 1;  // 0 marks an empty slot
}

// Per-thread word -> ids cache: open addressing over arenas (no allocation per entry).
// Cleared wholesale when full; pre-tokenized words repeat a lot, so it refills quickly.
class WordCache {
 public:
  const int32_t* find(std::string_view key, uint64_t h, size_t& n) const {
    if (slots_.empty()) return nullptr;
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.hash == 0) return nullptr;
      if (s.hash == h && s.key_len == key.size() &&
          std::memcmp(keys_.data() + s.key_off, key.data(), key.size()) == 0) {
        n = s.val_len;
        return vals_.data() + s.val_off;
      }
    }
  }
  void insert(std::string_view key, uint64_t h, const int32_t* ids, size_t n) {
    if (slots_.empty() || (count_ + 1) * 2 > slots_.size()) {
      if (count_ >= kMaxEntries || slots_.empty()) {
        clear(slots_.empty() ? 4096 : slots_.size());
      } else {
        grow();
      }
    }
    size_t i = h & mask_;
    while (slots_[i].hash != 0) i = (i + 1) & mask_;
    slots_[i] = {h, static_cast<uint32_t>(keys_.size()), static_cast<uint32_t>(key.size()),
                 static_cast<uint32_t>(vals_.size()), static_cast<uint32_t>(n)};
    keys_.append(key);
    vals_.insert(vals_.end(), ids, ids + n);
    ++count_;
  }
  void clear(size_t capacity) {
    slots_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    count_ = 0;
    keys_.clear();
    vals_.clear();
  }

 private:
  static constexpr size_t kMaxEntries = size_t{1} << 19;
  struct Slot {
    uint64_t hash = 0;
    uint32_t key_off = 0, key_len = 0, val_off = 0, val_len = 0;
  };
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(old.size() * 2, Slot{});
    mask_ = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.hash == 0) continue;
      size_t i = s.hash & mask_;
      while (slots_[i].hash != 0) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }
  std::vector<Slot> slots_;
  size_t mask_ = 0, count_ = 0;
  std::string keys_;
  std::vector<int32_t> vals_;
};

// One cache per thread, owned by the last model that used it on that thread.
struct ThreadCache {
  uint64_t owner = 0;
  WordCache cache;
  std::vector<int32_t> scratch;
};

ThreadCache& thread_cache(uint64_t owner) {
  thread_local ThreadCache tc;
  if (tc.owner != owner) {
    tc.cache.clear(4096);
    tc.owner = owner;
  }
  return tc;
}

std::atomic<uint64_t> next_instance_id{1};

std::string optional_string(const nlohmann::json& m, const char* key) {
  auto it = m.find(key);
  return (it == m.end() || it->is_null()) ? std::string() : it->get<std::string>();
}
bool optional_bool(const nlohmann::json& m, const char* key) {
  auto it = m.find(key);
  return it != m.end() && !it->is_null() && it->get<bool>();
}

}  // namespace

BpeModel::BpeModel(const nlohmann::json& model, bool byte_level, const std::string& where)
    : byte_level_(byte_level), instance_id_(next_instance_id.fetch_add(1)) {
  if (auto d = model.find("dropout"); d != model.end() && !d->is_null() && d->get<double>() > 0)
    throw std::runtime_error(where + ": BPE dropout is not supported");
  ignore_merges_ = optional_bool(model, "ignore_merges");
  byte_fallback_ = optional_bool(model, "byte_fallback");
  fuse_unk_ = optional_bool(model, "fuse_unk");
  prefix_ = optional_string(model, "continuing_subword_prefix");
  suffix_ = optional_string(model, "end_of_word_suffix");

  const auto& vocab = model.at("vocab");
  if (!vocab.is_object()) throw std::runtime_error(where + ": model.vocab must be an object");
  vocab_.reserve(vocab.size());
  for (const auto& [token, id_json] : vocab.items()) {
    const auto id = id_json.get<int64_t>();
    if (id < 0 || id > INT32_MAX) throw std::runtime_error(where + ": bad id for token " + token);
    vocab_[token] = static_cast<int32_t>(id);
    if (static_cast<size_t>(id) >= id_to_token_.size()) id_to_token_.resize(id + 1);
    id_to_token_[id] = token;
  }
  if (std::string unk = optional_string(model, "unk_token"); !unk.empty()) {
    auto it = vocab_.find(unk);
    if (it == vocab_.end()) throw std::runtime_error(where + ": unk_token '" + unk + "' not in vocab");
    unk_id_ = it->second;
  }

  const auto& merges = model.at("merges");
  merges_.reserve(merges.size());
  std::vector<std::pair<std::string, std::string>> merge_pairs;
  merge_pairs.reserve(merges.size());
  auto lookup = [&](const std::string& t) {
    auto it = vocab_.find(t);
    if (it == vocab_.end()) throw std::runtime_error(where + ": merge token '" + t + "' not in vocab");
    return it->second;
  };
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& m = merges[rank];
    std::string a, b;
    if (m.is_string()) {  // legacy "a b"
      const auto s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        throw std::runtime_error(where + ": bad merge '" + s + "'");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      a = m.at(0).get<std::string>();
      b = m.at(1).get<std::string>();
    }
    // As HF: the merged token drops the prefix length from the right part unconditionally.
    const std::string merged = a + b.substr(std::min(prefix_.size(), b.size()));
    const int32_t left = lookup(a), right = lookup(b);  // in order, for the error message
    merges_.insert(left, right, {static_cast<uint32_t>(rank), lookup(merged)});
    merge_pairs.emplace_back(std::move(a), std::move(b));
  }

  // Boundary character: needs merges that never join "...x" + "c..." with x != c, and no
  // feature that looks at whole words (ignore_merges, prefix, suffix).
  if (!byte_level_ && !ignore_merges_ && prefix_.empty() && suffix_.empty()) {
    for (const char* candidate : {"\u2581", " "}) {
      const std::string_view c = candidate;
      if (token_to_id(c) < 0) continue;
      bool ok = true;
      for (size_t rank = 0; ok && rank < merge_pairs.size(); ++rank) {
        const auto& [a, b] = merge_pairs[rank];
        ok = !(std::string_view(b).starts_with(c) && !std::string_view(a).ends_with(c));
      }
      if (ok) {
        boundary_ = c;
        break;
      }
    }
  }

  for (int b = 0; b < 256; ++b) {
    byte_ids_[b] = token_to_id(unicode::to_utf8(unicode::byte_to_unicode()[b]));
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    fallback_ids_[b] = byte_fallback_ ? token_to_id(name) : -1;
  }
  if (!byte_level_) {
    bmp_ids_.assign(0x10000, -1);
    for (const auto& [token, id] : vocab_) {
      size_t i = 0;
      char32_t cp;
      if (token.empty() || !unicode::next_code_point(token, i, cp) || i != token.size()) continue;
      if (cp < 0x10000) bmp_ids_[cp] = id;
      else astral_ids_[cp] = id;
    }
  }
}

BpeModel::~BpeModel() = default;
BpeModel::BpeModel(BpeModel&&) noexcept = default;

int32_t BpeModel::token_to_id(std::string_view token) const {
  auto it = vocab_.find(std::string(token));
  return it == vocab_.end() ? -1 : it->second;
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) return nullptr;
  const std::string& t = id_to_token_[id];
  return t.empty() ? nullptr : &t;
}

int32_t BpeModel::char_id(char32_t cp) const {
  if (cp < 0x10000) return bmp_ids_[cp];
  auto it = astral_ids_.find(cp);
  return it == astral_ids_.end() ? -1 : it->second;
}

// HF BPE::merge_word: one symbol per character (byte for byte-level), prefix/suffix added,
// unknown characters through byte_fallback, else unk (fused when fuse_unk).
void BpeModel::initial_symbols(std::string_view w, std::vector<Symbol>& syms) const {
  syms.clear();
  auto add = [&](int32_t id) {
    const auto n = static_cast<int32_t>(syms.size());
    syms.push_back({id, n - 1, -1});
    if (n > 0) syms[n - 1].next = n;
  };
  bool pending_unk = false;
  auto add_known = [&](int32_t id) {
    if (pending_unk) add(unk_id_);
    pending_unk = false;
    add(id);
  };
  const bool plain = prefix_.empty() && suffix_.empty();
  std::string ch;
  for (size_t i = 0; i < w.size();) {
    const size_t start = i;
    if (byte_level_) {
      const auto b = static_cast<unsigned char>(w[i++]);
      if (plain && byte_ids_[b] >= 0) {
        add_known(byte_ids_[b]);
        continue;
      }
      ch = unicode::to_utf8(unicode::byte_to_unicode()[b]);
    } else {
      const char32_t cp = unicode::next_code_point_valid(w, i);
      if (plain) {
        if (const int32_t id = char_id(cp); id >= 0) {
          add_known(id);
          continue;
        }
      }
      ch.assign(w.substr(start, i - start));
    }
    if (!plain) {
      if (start > 0) ch.insert(0, prefix_);
      if (i == w.size()) ch += suffix_;
      if (const int32_t id = token_to_id(ch); id >= 0) {
        add_known(id);
        continue;
      }
    }
    if (byte_fallback_) {
      bool all = true;
      for (unsigned char b : ch) all = all && fallback_ids_[b] >= 0;
      if (all) {  // as HF, a pending unk is not flushed before byte tokens
        for (unsigned char b : ch) add(fallback_ids_[b]);
        continue;
      }
    }
    if (unk_id_ >= 0) {
      if (pending_unk && !fuse_unk_) add(unk_id_);
      pending_unk = true;
    }  // no unk token: the character is dropped, as HF does
  }
  if (pending_unk) add(unk_id_);
}

// Repeatedly merges the lowest-rank adjacent pair (leftmost on ties), keeping one rank per
// pair and updating only the neighbours of each merge.
void BpeModel::merge_small(std::vector<Symbol>& syms) const {
  constexpr uint32_t kNone = UINT32_MAX;
  uint32_t rank[kMaxLinearScanSymbols];
  int32_t merged[kMaxLinearScanSymbols];
  auto update = [&](int32_t i) {
    const int32_t j = syms[i].next;
    const MergeMap::Value* v = j < 0 ? nullptr : merges_.find(syms[i].id, syms[j].id);
    rank[i] = v ? v->rank : kNone;
    merged[i] = v ? v->id : -1;
  };
  const auto n = static_cast<int32_t>(syms.size());
  for (int32_t i = 0; i < n; ++i) update(i);
  for (;;) {
    // A flat scan over all positions (removed ones rank kNone) beats walking the list.
    uint32_t best = kNone;
    int32_t at = -1;
    for (int32_t i = 0; i < n; ++i)
      if (rank[i] < best) best = rank[i], at = i;
    if (at < 0) return;
    const int32_t right = syms[at].next;
    syms[at].id = merged[at];
    syms[at].next = syms[right].next;
    if (syms[right].next >= 0) syms[syms[right].next].prev = at;
    syms[right].id = -1;
    rank[right] = kNone;
    update(at);
    if (syms[at].prev >= 0) update(syms[at].prev);
  }
}

// HF Word::merge_all: a min-heap of candidate merges (rank, then position); stale entries
// are skipped when popped.
void BpeModel::merge_large(std::vector<Symbol>& syms) const {
  struct Candidate {
    uint32_t rank;
    int32_t pos, id;
  };
  auto worse = [](const Candidate& x, const Candidate& y) {
    return x.rank != y.rank ? x.rank > y.rank : x.pos > y.pos;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(worse)> queue(worse);
  auto push = [&](int32_t i) {
    const int32_t j = syms[i].next;
    if (j < 0) return;
    if (const MergeMap::Value* v = merges_.find(syms[i].id, syms[j].id)) queue.push({v->rank, i, v->id});
  };
  for (int32_t i = 0; i < static_cast<int32_t>(syms.size()); ++i) push(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = syms[top.pos];
    if (left.id < 0 || left.next < 0) continue;
    const int32_t right = left.next;
    const MergeMap::Value* v = merges_.find(left.id, syms[right].id);
    if (!v || v->id != top.id) continue;
    left.id = top.id;
    left.next = syms[right].next;
    if (left.next >= 0) syms[left.next].prev = top.pos;
    syms[right].id = -1;
    if (left.prev >= 0) push(left.prev);
    push(top.pos);
  }
}

void BpeModel::tokenize_uncached(std::string_view word, std::vector<int32_t>& out) const {
  if (ignore_merges_) {  // a word that is itself a token skips the merges
    std::string key;
    if (byte_level_) {
      for (unsigned char b : word) unicode::append_utf8(key, unicode::byte_to_unicode()[b]);
    } else {
      key.assign(word);
    }
    if (const int32_t id = token_to_id(key); id >= 0) {
      out.push_back(id);
      return;
    }
  }
  thread_local std::vector<Symbol> syms;
  initial_symbols(word, syms);
  if (syms.empty()) return;
  if (syms.size() <= kMaxLinearScanSymbols) merge_small(syms);
  else merge_large(syms);
  for (int32_t i = 0; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
}

void BpeModel::tokenize_piece(std::string_view word, std::vector<int32_t>& out) const {
  if (word.size() > kMaxCachedWordBytes) {
    tokenize_uncached(word, out);
    return;
  }
  ThreadCache& tc = thread_cache(instance_id_);
  const uint64_t h = hash_bytes(word);
  size_t n = 0;
  if (const int32_t* ids = tc.cache.find(word, h, n)) {
    out.insert(out.end(), ids, ids + n);
    return;
  }
  const size_t before = out.size();
  tokenize_uncached(word, out);
  tc.cache.insert(word, h, out.data() + before, out.size() - before);
}

void BpeModel::tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (boundary_.empty()) return tokenize_piece(word, out);
  // No symbol can ever span a point right before a boundary character that follows a
  // different character: such a symbol would come from a merge (a, b) with b starting with
  // the boundary and a not ending with it, and there is none. So the pieces between those
  // points merge independently, exactly as the whole word would.
  const std::string_view c = boundary_;
  size_t start = 0;
  for (size_t p = word.find(c, 1); p != std::string_view::npos; p = word.find(c, p + 1)) {
    const bool after_boundary = p >= c.size() && word.compare(p - c.size(), c.size(), c) == 0;
    if (after_boundary) continue;
    tokenize_piece(word.substr(start, p - start), out);
    start = p;
  }
  tokenize_piece(word.substr(start), out);
}

}  // namespace ftune::tok
