// load_dataset: files -> records -> (parallel) parse + tokenize -> examples, with the cache.
#include "ftune/data/dataset.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <thread>
#include <unistd.h>

#include "dataset_internal.hpp"
#include "ftune/data/pretokenized.hpp"  // list_data_files
#include "ftune/data/tokenizer.hpp"

namespace ftune {
namespace {

using namespace dataset;

// What one record turned into.
struct Outcome {
  std::vector<Example> examples;
  std::string error;  // malformed record: "<file>:<line>: ..."
  bool fatal = false; // an error skip_bad_examples must not hide
  bool no_pairs = false;
  bool truncated = false;
};

Outcome process(const EncodeContext& ctx, const RawRecord& r) {
  Outcome o;
  const std::string where = r.where();
  if (!r.error.empty()) {
    o.error = where + ": " + r.error;
    o.fatal = true;
    return o;
  }
  ParsedRecord rec;
  try {
    rec = parse_record(nlohmann::json::parse(r.json), where);
  } catch (const nlohmann::json::parse_error& e) {
    o.error = where + ": invalid JSON (" + e.what() + ")";
    return o;
  } catch (const nlohmann::json::exception& e) {  // a value of an unexpected JSON type
    o.error = where + ": " + e.what();
    return o;
  } catch (const std::exception& e) {  // parse_record's messages already carry file:line
    o.error = e.what();
    return o;
  }
  try {
    Encoded enc;
    if (rec.kind == RecordKind::Tokens) {
      enc = encode_tokens(ctx, std::move(rec.tokens));
    } else {
      if (!ctx.tokenizer)
        throw std::runtime_error(
            "text data (ShareGPT / Alpaca / \"text\" records) needs a tokenizer, but none was "
            "loaded: tokenizer_name_or_path (or the model directory) has no tokenizer.json");
      if (ctx.eos < 0)
        throw std::runtime_error("the tokenizer has no eos token (tokenizer_config.json "
                                 "\"eos_token\") and template '" + ctx.chat_template->name +
                                 "' stop string '" + ctx.chat_template->stop_str + "' is not a token");
      if (rec.kind == RecordKind::Text) {
        enc = encode_text(ctx, rec.text);
      } else if (rec.no_pairs) {
        o.no_pairs = true;
        return o;
      } else {
        enc = encode_chat(ctx, rec);
      }
    }
    o.examples = std::move(enc.examples);
    o.truncated = enc.truncated;
  } catch (const std::exception& e) {
    o.error = where + ": " + e.what();
    o.fatal = true;
  }
  return o;
}

// Runs fn(i) for i in [0, n) on `threads` threads; results land by index, so order holds.
template <class Fn>
void parallel_for(size_t n, int threads, Fn fn) {
  const size_t t = std::min<size_t>(std::max(threads, 1), n);
  if (t <= 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<size_t> next{0};
  auto work = [&] {
    constexpr size_t kChunk = 8;  // records vary in length: small chunks balance the load
    for (size_t b; (b = next.fetch_add(kChunk)) < n;)
      for (size_t i = b; i < std::min(n, b + kChunk); ++i) fn(i);
  };
  std::vector<std::thread> pool;
  for (size_t k = 1; k < t; ++k) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
}

class Progress {
 public:
  Progress(bool on, uint64_t total)
      : on_(on), tty_(isatty(STDERR_FILENO)), total_(std::max<uint64_t>(total, 1)) {}
  void update(uint64_t done, size_t examples, bool final = false) {
    // Redrawn in place on a terminal; in logs (batch jobs) only the final line.
    if (!on_ || (!tty_ && !final)) return;
    const auto now = std::chrono::steady_clock::now();
    if (!final && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    std::fprintf(stderr, "\r[ftune] tokenizing dataset: %3d%% (%.1f / %.1f MiB, %zu examples)%s",
                 static_cast<int>(100 * std::min(done, total_) / total_), done / 1048576.0,
                 total_ / 1048576.0, examples, final ? "\n" : "");
    std::fflush(stderr);
  }

 private:
  bool on_, tty_;
  uint64_t total_;
  std::chrono::steady_clock::time_point last_{};
};

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ",") + x;
  return s;
}

std::vector<Example> build(const DatasetOptions& opt, const ChatTemplate& tmpl,
                           const std::vector<std::string>& files, DatasetStats& stats) {
  EncodeContext ctx{opt.tokenizer, &tmpl, -1, opt.max_length, opt.train_on_inputs};
  if (opt.tokenizer) {
    // MedicalGPT: `if tokenizer.eos_token_id is None: tokenizer.eos_token = stop_str`.
    ctx.eos = opt.tokenizer->eos_id();
    if (ctx.eos < 0) ctx.eos = opt.tokenizer->token_to_id(tmpl.stop_str);
  }
  RecordReader reader(files);
  Progress progress(opt.progress, reader.bytes_total());
  const int workers = std::max(opt.num_workers, 1);
  std::vector<Example> examples;
  std::vector<RawRecord> batch;
  std::vector<Outcome> outcomes;
  bool done = false;
  while (!done) {
    batch.clear();
    const bool more = reader.next_batch(256 * static_cast<size_t>(workers), batch);
    outcomes.assign(batch.size(), Outcome{});
    parallel_for(batch.size(), workers, [&](size_t i) { outcomes[i] = process(ctx, batch[i]); });
    for (size_t i = 0; i < outcomes.size() && !done; ++i) {  // in file order
      Outcome& o = outcomes[i];
      ++stats.records;
      if (!o.error.empty()) {
        if (o.fatal || !opt.skip_bad_examples) throw std::runtime_error(o.error);
        ++stats.skipped;
        continue;
      }
      stats.no_pairs += o.no_pairs;
      stats.truncated += o.truncated;
      for (Example& ex : o.examples) {
        if (!has_trainable_label(ex)) {  // MedicalGPT's filter_empty_labels
          ++stats.dropped_no_labels;
          continue;
        }
        stats.tokens += static_cast<int64_t>(ex.input_ids.size());
        stats.label_tokens +=
            std::count_if(ex.labels.begin(), ex.labels.end(), [](int32_t l) { return l != kIgnoreIndex; });
        examples.push_back(std::move(ex));
        if (opt.max_samples > 0 && static_cast<int64_t>(examples.size()) >= opt.max_samples) {
          done = true;
          break;
        }
      }
    }
    progress.update(reader.bytes_done(), examples.size());
    if (!more) done = true;
  }
  progress.update(reader.bytes_total(), examples.size(), /*final=*/true);
  stats.examples = static_cast<int64_t>(examples.size());
  if (examples.empty()) {
    const std::string in = " in " + join(opt.dirs);
    if (stats.records == 0) throw std::runtime_error("no records" + in + " (the data files are empty)");
    std::string counts = std::to_string(stats.records) + " records read, " +
                         std::to_string(stats.skipped) + " malformed and skipped, " +
                         std::to_string(stats.no_pairs) + " conversations without a complete " +
                         "user/assistant pair, " + std::to_string(stats.dropped_no_labels) +
                         " examples without labels";
    if (stats.dropped_no_labels > 0)
      throw std::runtime_error(
          "every example" + in + " lost all its labels (" + counts +
          "): the prompts alone reach model_max_length=" + std::to_string(opt.max_length) +
          " before any answer token, or the data has no answers; raise model_max_length");
    throw std::runtime_error("no usable examples" + in + " (" + counts + ")");
  }
  return examples;
}

void check_options(const DatasetOptions& opt) {
  if (opt.dirs.empty()) throw std::invalid_argument("load_dataset: no data directories given");
  if (opt.max_length < 2)
    throw std::invalid_argument("model_max_length must be at least 2, got " + std::to_string(opt.max_length));
  get_chat_template(opt.template_name);  // an unknown name fails here, listing the valid ones
}

}  // namespace

std::vector<Example> load_dataset(const DatasetOptions& opt, DatasetStats* stats_out) {
  check_options(opt);
  const ChatTemplate& tmpl = get_chat_template(opt.template_name);
  const std::vector<std::string> files = list_data_files(opt.dirs);
  DatasetStats stats;
  std::vector<Example> examples;
  std::string description, path;
  if (!opt.cache_dir.empty()) {
    description = cache_description(opt, files);
    path = cache_file_for(opt, description);
    if (read_cache(path, description, examples, stats)) {
      stats.cache_hit = true;
      if (stats_out) *stats_out = stats;
      return examples;
    }
  }
  examples = build(opt, tmpl, files, stats);
  if (!path.empty()) write_cache(path, description, examples, stats);
  if (stats_out) *stats_out = stats;
  return examples;
}

std::string dataset_cache_path(const DatasetOptions& opt) {
  if (opt.cache_dir.empty()) return "";
  check_options(opt);
  return cache_file_for(opt, cache_description(opt, list_data_files(opt.dirs)));
}

bool dataset_cache_exists(const DatasetOptions& opt) {
  if (opt.cache_dir.empty()) return false;
  check_options(opt);
  const std::string description = cache_description(opt, list_data_files(opt.dirs));
  return cache_is_valid(cache_file_for(opt, description), description);
}

std::pair<std::vector<Example>, std::vector<Example>> split_validation(
    std::vector<Example> examples, double percentage) {
  if (!(percentage >= 0 && percentage <= 100))
    throw std::invalid_argument("validation_split_percentage must be in [0, 100], got " +
                                std::to_string(percentage));
  const auto n = static_cast<int64_t>(examples.size());
  int64_t n_val = static_cast<int64_t>(std::floor(static_cast<double>(n) * percentage / 100.0));
  if (percentage > 0 && n >= 2) n_val = std::max<int64_t>(n_val, 1);
  n_val = std::min(n_val, std::max<int64_t>(n - 1, 0));  // training keeps at least one
  std::vector<Example> val(std::make_move_iterator(examples.end() - n_val),
                           std::make_move_iterator(examples.end()));
  examples.resize(static_cast<size_t>(n - n_val));
  return {std::move(examples), std::move(val)};
}

}  // namespace ftune
