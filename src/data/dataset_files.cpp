// Data files to records: JSON Lines streamed line by line, JSON arrays split into elements.
#include <filesystem>
#include <sstream>
#include <stdexcept>

#include "dataset_internal.hpp"

namespace fs = std::filesystem;

namespace ftune::dataset {
namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// Index just past a UTF-8 byte order mark and leading whitespace.
size_t skip_leading(const std::string& s) {
  size_t i = s.rfind("\xEF\xBB\xBF", 0) == 0 ? 3 : 0;
  while (i < s.size() && is_space(s[i])) ++i;
  return i;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open data file '" + path + "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

std::vector<std::pair<std::string, int64_t>> split_json_array(const std::string& doc) {
  std::vector<std::pair<std::string, int64_t>> out;
  int64_t line = 1;
  size_t i = skip_leading(doc);
  for (size_t k = 0; k < i; ++k) line += doc[k] == '\n';
  auto skip_ws = [&] {
    for (; i < doc.size() && is_space(doc[i]); ++i) line += doc[i] == '\n';
  };
  if (i >= doc.size() || doc[i] != '[') throw std::runtime_error("line 1: expected a JSON array");
  ++i;
  skip_ws();
  if (i < doc.size() && doc[i] == ']') {
    ++i;
  } else {
    for (;;) {
      skip_ws();
      const size_t start = i;
      const int64_t start_line = line;
      int depth = 0;
      bool in_string = false;
      for (; i < doc.size(); ++i) {  // to the ',' or ']' that ends this element
        const char c = doc[i];
        if (c == '\n') ++line;
        if (in_string) {
          if (c == '\\') ++i;  // an escape never hides a newline (raw newlines are invalid)
          else if (c == '"') in_string = false;
        } else if (c == '"') {
          in_string = true;
        } else if (c == '{' || c == '[') {
          ++depth;
        } else if (c == '}' || c == ']') {
          if (depth == 0) break;
          --depth;
        } else if (c == ',' && depth == 0) {
          break;
        }
      }
      if (i >= doc.size())
        throw std::runtime_error("line " + std::to_string(start_line) +
                                 ": unterminated JSON array element");
      size_t end = i;
      while (end > start && is_space(doc[end - 1])) --end;
      out.emplace_back(doc.substr(start, end - start), start_line);
      if (doc[i++] == ']') break;
      if (doc[i - 1] == '}')
        throw std::runtime_error("line " + std::to_string(line) + ": unbalanced '}' in JSON array");
    }
  }
  skip_ws();
  if (i < doc.size())
    throw std::runtime_error("line " + std::to_string(line) + ": unexpected text after the JSON array");
  return out;
}

RecordReader::RecordReader(std::vector<std::string> files) : files_(std::move(files)) {
  for (const auto& f : files_) {
    std::error_code ec;
    const auto size = fs::file_size(f, ec);
    bytes_total_ += ec ? 0 : size;
  }
}

uint64_t RecordReader::bytes_done() const {
  uint64_t cur = 0;
  if (in_.is_open()) {
    const auto pos = in_.tellg();
    cur = pos < 0 ? current_size_ : static_cast<uint64_t>(pos);
  } else if (!pending_.empty()) {
    cur = current_size_ * pending_pos_ / pending_.size();
  }
  return bytes_before_current_ + cur;
}

// Opens the next file: JSONL is streamed; a .json document starting with '[' (or holding a
// single object) is split into pending_ records up front.
bool RecordReader::open_next() {
  in_.close();
  pending_.clear();
  pending_pos_ = 0;
  bytes_before_current_ += current_size_;
  current_size_ = 0;
  if (next_file_ >= files_.size()) return false;
  current_ = files_[next_file_++];
  std::error_code ec;
  current_size_ = fs::file_size(current_, ec);
  if (ec) current_size_ = 0;
  line_ = 0;
  if (fs::path(current_).extension() == ".json") {
    std::string doc = read_all(current_);
    const size_t first = skip_leading(doc);
    if (first < doc.size() && doc[first] == '[') {
      try {
        for (auto& [text, line] : split_json_array(doc))
          pending_.push_back({current_, line, std::move(text), {}});
      } catch (const std::runtime_error& e) {  // a broken file: one record carrying the error
        const std::string what = e.what();     // "line N: ..."
        const size_t colon = what.find(':');
        const int64_t line = std::stoll(what.substr(5, colon - 5));
        pending_.push_back({current_, line, {}, what.substr(colon + 2)});
      }
      return true;
    }
    if (first < doc.size() && doc[first] == '{' && nlohmann::json::accept(doc)) {
      int64_t line = 1;  // one pretty-printed record
      for (size_t k = 0; k < first; ++k) line += doc[k] == '\n';
      pending_.push_back({current_, line, std::move(doc), {}});
      return true;
    }
  }
  in_.open(current_, std::ios::binary);  // JSON Lines
  if (!in_) throw std::runtime_error("cannot open data file '" + current_ + "'");
  return true;
}

bool RecordReader::next_batch(size_t max, std::vector<RawRecord>& out) {
  size_t added = 0;
  while (added < max) {
    if (pending_pos_ < pending_.size()) {
      out.push_back(std::move(pending_[pending_pos_++]));
      ++added;
      continue;
    }
    std::string line;
    if (in_.is_open() && std::getline(in_, line)) {
      ++line_;
      if (line_ == 1 && line.rfind("\xEF\xBB\xBF", 0) == 0) line.erase(0, 3);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.find_first_not_of(" \t") == std::string::npos) continue;
      out.push_back({current_, line_, std::move(line), {}});
      ++added;
      continue;
    }
    if (!open_next()) return false;
  }
  return true;
}

}  // namespace ftune::dataset
