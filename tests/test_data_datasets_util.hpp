#pragma once
// Helpers shared by the test_data_datasets*.cpp tests: the in-repo tiny tokenizer, writing
// small data files, and decoding an example's prompt / answer parts.
#include <doctest/doctest.h>

#include <algorithm>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "ftune/data/dataset.hpp"
#include "ftune/data/tokenizer.hpp"
#include "test_util.hpp"

namespace ftune::test {

inline std::string tiny_tokenizer_dir() { return source_dir() + "/inputs/tiny-tokenizer"; }

inline const Tokenizer& tiny_tokenizer() {
  static const Tokenizer tok = Tokenizer::from_dir(tiny_tokenizer_dir());
  return tok;
}

inline void write_file(const std::string& path, const std::string& content) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << content;
}

// Options over `dir` with the tiny tokenizer and `template_name`.
inline DatasetOptions tiny_options(const std::string& dir, const std::string& template_name = "vicuna",
                                   int64_t max_length = 2048) {
  DatasetOptions o;
  o.dirs = {dir};
  o.tokenizer = &tiny_tokenizer();
  o.tokenizer_path = tiny_tokenizer_dir();
  o.template_name = template_name;
  o.max_length = max_length;
  return o;
}

// Text of the tokens whose label is (answer == false) / is not (answer == true) -100.
inline std::string decode_part(const Tokenizer& tok, const Example& ex, bool answer) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < ex.input_ids.size(); ++i)
    if ((ex.labels[i] != -100) == answer) ids.push_back(ex.input_ids[i]);
  return tok.decode(ids);
}

inline std::string decode_all(const Tokenizer& tok, const Example& ex) { return tok.decode(ex.input_ids); }

// Runs `fn` and returns the message of the std::exception it throws ("" if none).
template <class Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace ftune::test
