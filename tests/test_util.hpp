#pragma once
// Helpers shared by tests: paths to the source tree, ../shared and a scratch dir.
#include <cstdlib>
#include <filesystem>
#include <string>

namespace ftune::test {
inline std::string source_dir() { return FTUNE_SOURCE_DIR; }
inline std::string shared_dir() {
  if (const char* e = std::getenv("FTUNE_SHARED_DIR")) return e;
  return FTUNE_SHARED_DIR;
}
inline bool have_shared() { return std::filesystem::exists(shared_dir() + "/data"); }
inline std::string ftune_bin() { return FTUNE_BIN; }
// A fresh, empty scratch directory for one test.
inline std::string scratch(const std::string& name) {
  std::filesystem::path p = std::filesystem::path(FTUNE_TEST_TMP) / name;
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}
}  // namespace ftune::test
