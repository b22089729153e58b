#include "ftune/data/pretokenized.hpp"

#include "dataset_internal.hpp"  // parse_pretokenized_example, shared with load_dataset

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace fs = std::filesystem;

namespace ftune {

std::vector<std::string> list_data_files(const std::vector<std::string>& dirs) {
  std::vector<std::string> files;
  for (const std::string& d : dirs) {
    if (d.empty()) continue;
    if (!fs::exists(d)) throw std::runtime_error("data path '" + d + "' does not exist");
    if (fs::is_regular_file(d)) {
      files.push_back(d);
      continue;
    }
    std::vector<std::string> here;
    for (const auto& e : fs::recursive_directory_iterator(d)) {
      const std::string ext = e.path().extension().string();
      if (e.is_regular_file() && (ext == ".jsonl" || ext == ".json")) here.push_back(e.path().string());
    }
    if (here.empty()) throw std::runtime_error("data directory '" + d + "' has no *.jsonl or *.json files");
    std::sort(here.begin(), here.end());
    files.insert(files.end(), here.begin(), here.end());
  }
  return files;
}

static std::vector<int32_t> int_array(const nlohmann::json& j, const char* key,
                                      const std::string& where) {
  if (!j.is_array()) throw std::runtime_error(where + ": \"" + key + "\" must be an array of integers");
  std::vector<int32_t> out;
  out.reserve(j.size());
  for (const auto& v : j) {
    if (!v.is_number_integer())
      throw std::runtime_error(where + ": \"" + key + "\" must contain only integers");
    out.push_back(v.get<int32_t>());
  }
  return out;
}

Example parse_pretokenized_example(const nlohmann::json& j, const std::string& where) {
  Example ex;
  ex.input_ids = int_array(j.at("input_ids"), "input_ids", where);
  if (j.contains("labels")) {
    ex.labels = int_array(j["labels"], "labels", where);
    if (ex.labels.size() != ex.input_ids.size())
      throw std::runtime_error(where + ": \"labels\" has " + std::to_string(ex.labels.size()) +
                               " entries but \"input_ids\" has " + std::to_string(ex.input_ids.size()));
  } else {
    ex.labels = ex.input_ids;
  }
  if (ex.input_ids.empty()) throw std::runtime_error(where + ": \"input_ids\" is empty");
  for (int32_t t : ex.input_ids)
    if (t < 0) throw std::runtime_error(where + ": negative token id " + std::to_string(t));
  return ex;
}

std::vector<Example> read_pretokenized(const std::vector<std::string>& dirs,
                                       const PretokenizedOptions& opt) {
  std::vector<Example> out;
  for (const std::string& file : list_data_files(dirs)) {
    std::ifstream in(file);
    if (!in) throw std::runtime_error("cannot open data file '" + file + "'");
    std::string line;
    for (int64_t lineno = 1; std::getline(in, line); ++lineno) {
      if (opt.max_samples >= 0 && static_cast<int64_t>(out.size()) >= opt.max_samples) return out;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      const std::string where = file + ":" + std::to_string(lineno);
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::parse_error& e) {
        throw std::runtime_error(where + ": invalid JSON (" + e.what() + ")");
      }
      if (!j.is_object() || !j.contains("input_ids"))
        throw std::runtime_error(where + ": expected an object with \"input_ids\" (pre-tokenized data)");
      Example ex = parse_pretokenized_example(j, where);
      if (opt.max_length > 0 && static_cast<int64_t>(ex.input_ids.size()) > opt.max_length) {
        ex.input_ids.resize(opt.max_length);
        ex.labels.resize(opt.max_length);
      }
      out.push_back(std::move(ex));
    }
  }
  return out;
}

}  // namespace ftune
