// Parsed records to token ids and labels, following MedicalGPT's preprocessing.
#include <algorithm>
#include <stdexcept>

#include "dataset_internal.hpp"
#include "ftune/data/tokenizer.hpp"

namespace ftune::dataset {
namespace {

using Ids = std::vector<int32_t>;

// Python's `v = v[:n]` (a negative n counts from the end), which MedicalGPT's truncation
// relies on when max_target_len is 0: target_ids[:-1] keeps all but the last token.
// Returns whether anything was cut.
bool py_truncate(Ids& v, int64_t n) {
  const auto len = static_cast<int64_t>(v.size());
  if (n < 0) n = std::max<int64_t>(0, len + n);
  if (n >= len) return false;
  v.resize(static_cast<size_t>(n));
  return true;
}

void append(Ids& dst, const Ids& src) { dst.insert(dst.end(), src.begin(), src.end()); }

}  // namespace

Encoded encode_chat(const EncodeContext& ctx, const ParsedRecord& rec) {
  // supervised_finetuning.py preprocess_function, per turn i:
  //   source = encode(prompt_i, add_special_tokens=(i == 0)), target = encode(answer_i);
  //   if the turn alone is longer than max_length, both are cut in proportion to their
  //   lengths (target to max_target_len - 1, leaving room for eos);
  //   a leading eos on the source (the "</s>" separator of later turns) and a trailing eos
  //   on the target are dropped;
  //   if the turn + eos no longer fits after the turns before it, it and all later turns
  //   are dropped (earlier turns stay whole);
  //   input += source + target + [eos]; labels += [-100] * |source| (or the source itself
  //   with train_on_inputs) + target + [eos].
  const Tokenizer& tok = *ctx.tokenizer;
  const std::vector<std::string> dialog = ctx.chat_template->render(rec.turns, rec.system);
  const int64_t max_len = ctx.max_length;
  Encoded out;
  Example ex;
  for (size_t i = 0; i + 1 < dialog.size(); i += 2) {
    Ids source = tok.encode(dialog[i], /*add_special_tokens=*/i == 0);
    Ids target = tok.encode(dialog[i + 1], false);
    const size_t total = source.size() + target.size();
    if (total > 0) {  // (MedicalGPT divides by zero here; nothing to cut)
      // int(max_length * (len / total)) in double precision, exactly as Python computes it.
      const auto max_source = static_cast<int64_t>(
          static_cast<double>(max_len) * (static_cast<double>(source.size()) / static_cast<double>(total)));
      const auto max_target = static_cast<int64_t>(
          static_cast<double>(max_len) * (static_cast<double>(target.size()) / static_cast<double>(total)));
      if (static_cast<int64_t>(source.size()) > max_source)
        out.truncated |= py_truncate(source, max_source);
      if (static_cast<int64_t>(target.size()) > max_target - 1)
        out.truncated |= py_truncate(target, max_target - 1);
    }
    if (!source.empty() && source.front() == ctx.eos) source.erase(source.begin());
    if (!target.empty() && target.back() == ctx.eos) target.pop_back();
    if (static_cast<int64_t>(ex.input_ids.size() + source.size() + target.size() + 1) > max_len) {
      out.truncated = true;
      break;
    }
    append(ex.input_ids, source);
    append(ex.input_ids, target);
    ex.input_ids.push_back(ctx.eos);
    if (ctx.train_on_inputs) append(ex.labels, source);
    else ex.labels.insert(ex.labels.end(), source.size(), kIgnoreIndex);
    append(ex.labels, target);
    ex.labels.push_back(ctx.eos);
  }
  out.examples.push_back(std::move(ex));
  return out;
}

Encoded encode_text(const EncodeContext& ctx, const std::string& text) {
  // pretraining.py: tokenizer(text) (bos when the tokenizer adds one), eos appended unless
  // the text already ends with it, every token labelled. MedicalGPT then concatenates a
  // batch of documents and cuts it into block_size chunks, dropping the remainder; ftune
  // cuts each document on its own into max_length blocks and keeps the last, shorter block,
  // so no text is lost and no example spans two documents (packing several short examples
  // into one sequence is the trainer's job).
  Ids ids = ctx.tokenizer->encode(text, /*add_special_tokens=*/true);
  if (ids.empty() || ids.back() != ctx.eos) ids.push_back(ctx.eos);
  Encoded out;
  const auto block = static_cast<size_t>(ctx.max_length);
  for (size_t off = 0; off < ids.size(); off += block) {
    Example ex;
    ex.input_ids.assign(ids.begin() + off, ids.begin() + std::min(ids.size(), off + block));
    ex.labels = ex.input_ids;
    out.examples.push_back(std::move(ex));
  }
  return out;
}

Encoded encode_tokens(const EncodeContext& ctx, Example ex) {
  Encoded out;
  const auto max_len = static_cast<size_t>(ctx.max_length);
  if (ex.input_ids.size() > max_len) {
    ex.input_ids.resize(max_len);
    ex.labels.resize(max_len);
    out.truncated = true;
  }
  out.examples.push_back(std::move(ex));
  return out;
}

bool has_trainable_label(const Example& ex) {
  return std::any_of(ex.labels.begin() + std::min<size_t>(1, ex.labels.size()), ex.labels.end(),
                     [](int32_t l) { return l != kIgnoreIndex; });
}

}  // namespace ftune::dataset
