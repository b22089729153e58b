#pragma once
// Private to the data module: tokenizer.json normalizers (NFC/NFD/NFKC/NFKD, Prepend,
// Replace, Strip, Sequence).
#include <nlohmann/json_fwd.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace ftune::tok {

class Normalizer {
 public:
  // `config` is tokenizer.json's "normalizer" (null: identity).
  Normalizer(const nlohmann::json& config, const std::string& where);
  ~Normalizer();
  Normalizer(Normalizer&&) noexcept;

  bool empty() const { return steps_.empty(); }
  // Normalizes `in`. Returns a view of either `in` (unchanged) or `buffer`.
  std::string_view apply(std::string_view in, std::string& buffer) const;

  struct Step;

 private:
  std::vector<Step> steps_;
};

}  // namespace ftune::tok
