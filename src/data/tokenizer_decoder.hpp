#pragma once
// Private to the data module: tokenizer.json decoders (ByteLevel, Replace, ByteFallback,
// Fuse, Strip, Metaspace, Sequence), applied as HF decode_chain then concatenated.
#include <nlohmann/json_fwd.hpp>

#include <string>
#include <vector>

namespace ftune::tok {

class Decoder {
 public:
  // `config` is tokenizer.json's "decoder" (null: tokens joined by spaces, as HF).
  Decoder(const nlohmann::json& config, const std::string& where);
  ~Decoder();
  Decoder(Decoder&&) noexcept;

  std::string decode(std::vector<std::string> tokens) const;

  struct Step;

 private:
  std::vector<Step> steps_;
  bool present_ = false;
};

}  // namespace ftune::tok
