// Writing models as init-model does: bf16 rounding, the streamed safetensors writer, and
// save_random_hf_model (the fast init written slice by slice) read back by load_base_weights.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <fstream>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "ftune/io/hf_model.hpp"
#include "ftune/io/safetensors.hpp"
#include "test_util.hpp"

using namespace ftune;

namespace {

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

float bf16_round(float x) { return std::bit_cast<float>(uint32_t{float_to_bf16(x)} << 16); }

// vocab 70000 x hidden 64 = 4.48M elements: the embedding (and lm_head) span two slices of
// the streamed writer, so slice boundaries and the double buffer are exercised.
ModelConfig multi_slice_config(const std::string& model_type) {
  ModelConfig c = test::llama_tiny_config();
  c.model_type = model_type;
  c.vocab_size = 70000;
  c.attention_bias = model_type == "qwen2";
  c.qk_norm = model_type == "qwen3";
  return c;
}

BaseWeights fast_weights(const ModelConfig& c, uint64_t seed, double std) {
  BaseWeights w;
  w.allocate(c);
  init_random_weights_fast(w, seed, std);
  return w;
}

std::string torch_dtype_of(const std::string& dir) {
  std::ifstream in(dir + "/config.json");
  return nlohmann::json::parse(in).at("torch_dtype").get<std::string>();
}

}  // namespace

TEST_CASE("float_to_bf16 rounds to nearest even, as torch does") {
  auto bits = [](uint32_t b) { return float_to_bf16(std::bit_cast<float>(b)); };
  CHECK(bits(0x3f800000u) == 0x3f80);  // 1.0 exactly
  CHECK(bits(0x3f808000u) == 0x3f80);  // half way, even neighbour below
  CHECK(bits(0x3f818000u) == 0x3f82);  // half way, even neighbour above
  CHECK(bits(0x3f808001u) == 0x3f81);  // just above half way
  CHECK(bits(0x3f807fffu) == 0x3f80);  // just below
  CHECK(bits(0x80000000u) == 0x8000);  // -0
  CHECK(bits(0xbf818000u) == 0xbf82);  // sign does not change the rounding
  CHECK(bits(0x7f800000u) == 0x7f80);  // inf
  CHECK(bits(0x7f7fffffu) == 0x7f80);  // FLT_MAX rounds up to inf, as in torch
  const uint16_t nan = bits(0x7f800001u);  // payload only in the dropped bits
  CHECK((nan & 0x7f80) == 0x7f80);
  CHECK((nan & 0x007f) != 0);
}

TEST_CASE("write_safetensors_streamed: F32 is byte-identical to write_safetensors; BF16 rounds") {
  const std::string dir = test::scratch("io_init_streamed");
  // 5M elements: more than one slice; a tensor of 0 elements and one of 1.
  std::vector<float> big(5'000'000), one{0.1f};
  for (size_t i = 0; i < big.size(); ++i) big[i] = std::sin(0.001 * i) * 3.0f;
  const std::vector<TensorToWrite> tensors = {
      {"z.big", {1000, 5000}, big.data()}, {"a.one", {1}, one.data()}, {"m.empty", {0, 4}, nullptr}};
  std::vector<TensorToStream> streams;
  for (const TensorToWrite& t : tensors) {
    const float* data = t.data;
    streams.push_back({t.name, t.shape, [data](float* dst, size_t begin, size_t count) {
                         std::copy(data + begin, data + begin + count, dst);
                       }});
  }
  write_safetensors(dir + "/plain.safetensors", tensors, {{"format", "pt"}});
  write_safetensors_streamed(dir + "/f32.safetensors", streams, DType::F32, {{"format", "pt"}});
  CHECK(file_bytes(dir + "/plain.safetensors") == file_bytes(dir + "/f32.safetensors"));

  write_safetensors_streamed(dir + "/bf16.safetensors", streams, DType::BF16);
  const SafetensorsFile f(dir + "/bf16.safetensors");
  CHECK(f.info("z.big").dtype == DType::BF16);
  CHECK(f.info("m.empty").shape == std::vector<int64_t>{0, 4});
  std::vector<float> back(big.size());
  f.read_f32("z.big", {1000, 5000}, back.data());
  size_t mismatches = 0;
  for (size_t i = 0; i < big.size(); ++i) mismatches += back[i] != bf16_round(big[i]);
  CHECK(mismatches == 0);

  CHECK(test::error_of([&] {
          write_safetensors_streamed(dir + "/f16.safetensors", streams, DType::F16);
        }).find("F32 or BF16") != std::string::npos);
}

TEST_CASE("save_random_hf_model bf16 loads as the bf16-rounded fast init") {
  for (const char* type : {"llama", "qwen2", "qwen3"}) {
    CAPTURE(type);
    ModelConfig c = multi_slice_config(type);
    c.tie_word_embeddings = std::string(type) == "qwen2";
    const std::string dir = test::scratch(std::string("io_init_bf16_") + type);
    save_random_hf_model(dir, c, 11, 0.02, DType::BF16);
    CHECK(torch_dtype_of(dir) == "bfloat16");
    const SafetensorsFile f(dir + "/model.safetensors");
    for (const std::string& name : f.names()) CHECK(f.info(name).dtype == DType::BF16);

    const BaseWeights loaded = load_base_weights(dir);
    const BaseWeights want = fast_weights(c, 11, 0.02);
    REQUIRE(loaded.storage.size() == want.storage.size());
    size_t mismatches = 0;
    for (size_t i = 0; i < want.storage.size(); ++i)
      mismatches += loaded.storage[i] != bf16_round(want.storage[i]);
    CHECK(mismatches == 0);
  }
}

TEST_CASE("save_random_hf_model fp32 is the file save_hf_model writes for the fast init") {
  const ModelConfig c = multi_slice_config("llama");
  const std::string dir = test::scratch("io_init_f32");
  save_random_hf_model(dir + "/streamed", c, 5, 0.1);
  save_hf_model(dir + "/in_memory", fast_weights(c, 5, 0.1));
  CHECK(file_bytes(dir + "/streamed/model.safetensors") ==
        file_bytes(dir + "/in_memory/model.safetensors"));
  CHECK(file_bytes(dir + "/streamed/config.json") == file_bytes(dir + "/in_memory/config.json"));
  CHECK(torch_dtype_of(dir + "/streamed") == "float32");
}

TEST_CASE("save_hf_model bf16 of in-memory weights (the default init path)") {
  const ModelConfig c = test::llama_tiny_config();
  BaseWeights w;
  w.allocate(c);
  init_random_weights(w, 2, 0.05);
  const std::string dir = test::scratch("io_init_save_bf16");
  save_hf_model(dir, w, DType::BF16);
  CHECK(torch_dtype_of(dir) == "bfloat16");
  const BaseWeights loaded = load_base_weights(dir);
  REQUIRE(loaded.storage.size() == w.storage.size());
  size_t mismatches = 0;
  for (size_t i = 0; i < w.storage.size(); ++i)
    mismatches += loaded.storage[i] != bf16_round(w.storage[i]);
  CHECK(mismatches == 0);
  CHECK(test::error_of([&] { save_hf_model(dir, w, DType::F16); }).find("F16") !=
        std::string::npos);
}
