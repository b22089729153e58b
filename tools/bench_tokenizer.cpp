// Speed benchmark driver for ftune::Tokenizer (used by tools/bench_tokenizer.py).
//
//   bench_tokenizer --tokenizer DIR --input CORPUS.jsonl [--min_mb 8] [--threads 1,2]
//                   [--iters 3]
//     Repeats the corpus texts until they hold at least min_mb MB, encodes them with
//     encode_batch for each thread count (best of iters, each with a freshly loaded
//     tokenizer, i.e. cold caches) and prints one JSON object.
//   bench_tokenizer tokenize ARGS...   same as `ftune tokenize ARGS...`
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ftune/data/tokenizer.hpp"

namespace {

std::vector<std::string> read_texts(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open file");
  std::vector<std::string> texts;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) texts.push_back(nlohmann::json::parse(line).at("text").get<std::string>());
  return texts;
}

std::vector<int> parse_list(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(std::stoi(item));
  return out;
}

int bench(int argc, char** argv) {
  std::string dir, input, threads = "1,2";
  double min_mb = 8;
  int iters = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i], value = argv[i + 1];
    if (key == "--tokenizer") dir = value;
    else if (key == "--input") input = value;
    else if (key == "--min_mb") min_mb = std::stod(value);
    else if (key == "--threads") threads = value;
    else if (key == "--iters") iters = std::stoi(value);
    else throw std::runtime_error("unknown option " + key);
  }
  if (dir.empty() || input.empty()) throw std::runtime_error("--tokenizer and --input are required");

  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const ftune::Tokenizer tok = ftune::Tokenizer::from_dir(dir);
  const double load_s = std::chrono::duration<double>(clock::now() - t0).count();

  const std::vector<std::string> corpus = read_texts(input);
  size_t corpus_bytes = 0;
  for (const auto& t : corpus) corpus_bytes += t.size();
  std::vector<std::string> texts;
  size_t bytes = 0;
  while (bytes < min_mb * 1e6 && corpus_bytes > 0) {
    texts.insert(texts.end(), corpus.begin(), corpus.end());
    bytes += corpus_bytes;
  }

  nlohmann::json result = {{"tokenizer", dir},     {"texts", texts.size()},
                           {"bytes", bytes},       {"load_seconds", load_s},
                           {"iters", iters},       {"runs", nlohmann::json::array()}};
  for (int n : parse_list(threads)) {
    double best = 1e30;
    size_t tokens = 0;
    for (int it = 0; it < iters; ++it) {
      // A freshly loaded tokenizer per run, so every run starts with cold word caches.
      const ftune::Tokenizer fresh = ftune::Tokenizer::from_dir(dir);
      const auto start = clock::now();
      const auto ids = fresh.encode_batch(texts, n);
      const double s = std::chrono::duration<double>(clock::now() - start).count();
      best = std::min(best, s);
      tokens = 0;
      for (const auto& v : ids) tokens += v.size();
    }
    result["runs"].push_back({{"threads", n},
                              {"seconds", best},
                              {"mb_per_s", bytes / 1e6 / best},
                              {"tokens", tokens}});
  }
  std::cout << result.dump() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc > 1 && std::string(argv[1]) == "tokenize")
      return ftune::run_tokenize_command(std::vector<std::string>(argv + 2, argv + argc));
    return bench(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "bench_tokenizer: " << e.what() << "\n";
    return 2;
  }
}
