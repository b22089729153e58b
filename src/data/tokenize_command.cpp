// `ftune tokenize`: JSONL {"text": ...} lines -> JSONL {"ids": [...]} lines, same order.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "ftune/data/tokenizer.hpp"

namespace ftune {
namespace {

// Lines are processed in blocks: parsed, tokenized and formatted in parallel, then written.
constexpr size_t kBlockLines = 1 << 14;

struct LineResult {
  std::string output;  // {"ids":[...]} without the newline
  std::string error;   // non-empty: this line is malformed
};

LineResult process_line(const Tokenizer& tok, const std::string& line) {
  LineResult r;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(line);
  } catch (const nlohmann::json::exception& e) {
    r.error = std::string("invalid JSON: ") + e.what();
    return r;
  }
  auto it = j.is_object() ? j.find("text") : j.end();
  if (!j.is_object() || it == j.end() || !it->is_string()) {
    r.error = "expected a JSON object with a string field \"text\"";
    return r;
  }
  const std::vector<int32_t> ids = tok.encode(it->get_ref<const std::string&>());
  r.output.reserve(10 + ids.size() * 7);
  r.output += "{\"ids\": [";
  char buf[16];
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) r.output += ", ";
    const auto res = std::to_chars(buf, buf + sizeof buf, ids[i]);
    r.output.append(buf, res.ptr);
  }
  r.output += "]}";
  return r;
}

void process_block(const Tokenizer& tok, const std::vector<std::string>& lines,
                   std::vector<LineResult>& results, int num_threads) {
  results.assign(lines.size(), {});
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < lines.size();) results[i] = process_line(tok, lines[i]);
  };
  const size_t n = std::min<size_t>(num_threads, std::max<size_t>(1, lines.size()));
  std::vector<std::thread> pool;
  for (size_t t = 1; t < n; ++t) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
}

int tokenize_file(const std::string& tokenizer_dir, const std::string& input,
                  const std::string& output, int num_threads) {
  const Tokenizer tok = Tokenizer::from_dir(tokenizer_dir);
  std::ifstream in(input, std::ios::binary);
  if (!in) throw std::runtime_error(input + ": cannot open file");
  // Written to a temporary name and renamed at the end, so a failed run leaves no output.
  const std::string tmp = output + ".tmp";
  std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error(output + ": cannot create file");

  std::vector<std::string> lines;
  std::vector<LineResult> results;
  size_t line_no = 0;  // lines before the current block
  std::string line;
  bool eof = false;
  while (!eof) {
    lines.clear();
    while (lines.size() < kBlockLines) {
      if (!std::getline(in, line)) {
        eof = true;
        break;
      }
      if (!line.empty() && line.back() == '\r') line.pop_back();
      lines.push_back(std::move(line));
    }
    process_block(tok, lines, results, num_threads);
    for (size_t i = 0; i < results.size(); ++i) {
      if (!results[i].error.empty()) {
        out.close();
        std::filesystem::remove(tmp);
        throw std::runtime_error(input + ":" + std::to_string(line_no + i + 1) + ": " +
                                 results[i].error);
      }
      out << results[i].output << '\n';
    }
    line_no += lines.size();
  }
  out.close();
  if (!out) throw std::runtime_error(output + ": write failed");
  std::filesystem::rename(tmp, output);
  return 0;
}

}  // namespace

int run_tokenize_command(const std::vector<std::string>& args) {
  CLI::App app{"Tokenize a JSONL file: every line {\"text\": ...} becomes {\"ids\": [...]} "
               "(no special tokens added), in the same order.",
               "ftune tokenize"};
  std::string tokenizer_dir, input, output;
  int num_threads = 0;
  app.add_option("--tokenizer", tokenizer_dir,
                 "Directory with tokenizer.json (and tokenizer_config.json)")
      ->required();
  app.add_option("--input", input, "Input JSONL file")->required();
  app.add_option("--output", output, "Output JSONL file")->required();
  app.add_option("--num_threads", num_threads, "Worker threads (default: all cores)")
      ->check(CLI::NonNegativeNumber);
  try {
    std::vector<std::string> reversed(args.rbegin(), args.rend());  // CLI11 wants them reversed
    app.parse(reversed);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) {  // --help
      std::cout << app.help();
      return 0;
    }
    std::cerr << "ftune tokenize: " << e.what() << "\n" << "Run 'ftune tokenize --help' for usage.\n";
    return 2;
  }
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  try {
    return tokenize_file(tokenizer_dir, input, output, num_threads);
  } catch (const std::exception& e) {
    std::cerr << "ftune tokenize: " << e.what() << "\n";
    return 2;
  }
}

}  // namespace ftune
