// Weight sources: the base weights read tensor by tensor (what the CUDA backend converts
// from) equal the materialised model, for safetensors (f32 and bf16, single and sharded),
// random-on-load directories and weights in memory; their checks name the file and key.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "ftune/io/hf_model.hpp"
#include "ftune/io/safetensors.hpp"
#include "ftune/model/weight_source.hpp"
#include "test_util.hpp"

using namespace ftune;
namespace fs = std::filesystem;

namespace {

BaseWeights fast_weights(const ModelConfig& c, uint64_t seed, double std) {
  BaseWeights w;
  w.allocate(c);
  init_random_weights_fast(w, seed, std);
  return w;
}

// Reads every tensor of src in uneven slices (3 per tensor, boundaries off the rows) into
// one flat vector laid out as BaseWeights::storage.
std::vector<float> read_sliced(const WeightSource& src) {
  std::vector<float> flat(src.total_numel(), -7.0f);
  const auto& entries = src.entries();
  for (size_t t = 0; t < entries.size(); ++t) {
    const size_t n = entries[t].numel();
    const size_t a = n / 3 + 1 > n ? n : n / 3 + 1, b = std::max(a, n - n / 5);
    src.read(t, 0, a, flat.data() + entries[t].offset);
    src.read(t, a, b - a, flat.data() + entries[t].offset + a);
    src.read(t, b, n - b, flat.data() + entries[t].offset + b);
  }
  return flat;
}

std::vector<float> old_strided_sample(const BaseWeights& w) {  // the trainer's former formula
  std::vector<float> s;
  const size_t stride = std::max<size_t>(1, w.storage.size() / 65536);
  for (size_t i = 0; i < w.storage.size(); i += stride) s.push_back(w.storage[i]);
  return s;
}

ModelConfig config_of(const std::string& type) {
  ModelConfig c = test::llama_tiny_config();
  c.model_type = type;
  c.attention_bias = type == "qwen2";
  c.qk_norm = type == "qwen3";
  c.tie_word_embeddings = type == "qwen2";
  return c;
}

}  // namespace

TEST_CASE("random-on-load directory: the fast init, read whole or in slices, without a file") {
  for (const char* type : {"llama", "qwen2", "qwen3"}) {
    CAPTURE(type);
    const ModelConfig c = config_of(type);
    const std::string dir = test::scratch(std::string("ws_onload_") + type);
    save_random_on_load_model(dir, c, 17, 0.03);
    CHECK(fs::exists(dir + "/config.json"));
    CHECK(fs::exists(dir + "/ftune_random_init.json"));
    CHECK(!fs::exists(dir + "/model.safetensors"));
    CHECK(load_model_config(dir).num_hidden_layers == c.num_hidden_layers);

    const BaseWeights want = fast_weights(c, 17, 0.03);
    const BaseWeights loaded = load_base_weights(dir);
    CHECK(loaded.storage == want.storage);
    const auto src = open_base_weights(dir, load_model_config(dir));
    CHECK(src->describe().find("seed 17") != std::string::npos);
    CHECK(read_sliced(*src) == want.storage);
    CHECK(strided_sample(*src) == old_strided_sample(want));
  }
}

TEST_CASE("safetensors source: slices equal whole reads for f32, bf16 and sharded files") {
  const ModelConfig c = config_of("qwen2");
  const BaseWeights w = fast_weights(c, 3, 0.05);
  const std::string dir = test::scratch("ws_safetensors");
  save_hf_model(dir + "/f32", w);
  save_random_hf_model(dir + "/bf16", c, 3, 0.05, DType::BF16);
  // Sharded: the same tensors split over two files listed by an index.
  {
    const auto entries = BaseWeights::layout(c);
    std::vector<TensorToWrite> parts[2];
    nlohmann::json index;
    for (size_t t = 0; t < entries.size(); ++t) {
      const int shard = t < entries.size() / 2 ? 0 : 1;
      parts[shard].push_back({entries[t].name, entries[t].shape, w.storage.data() + entries[t].offset});
      index["weight_map"][entries[t].name] = "model-0000" + std::to_string(shard + 1) + "-of-00002.safetensors";
    }
    fs::create_directories(dir + "/sharded");
    for (int k = 0; k < 2; ++k)
      write_safetensors(dir + "/sharded/model-0000" + std::to_string(k + 1) + "-of-00002.safetensors",
                        parts[k]);
    std::ofstream(dir + "/sharded/model.safetensors.index.json") << index.dump();
    fs::copy_file(dir + "/f32/config.json", dir + "/sharded/config.json");
  }
  for (const char* sub : {"f32", "bf16", "sharded"}) {
    CAPTURE(sub);
    const std::string d = dir + "/" + sub;
    const BaseWeights whole = load_base_weights(d);
    const auto src = open_base_weights(d, c);
    CHECK(read_sliced(*src) == whole.storage);
    CHECK(strided_sample(*src) == old_strided_sample(whole));
    CHECK(src->describe().find(d) != std::string::npos);
  }
  CHECK(fs::exists(dir + "/sharded/model.safetensors.index.json"));
  CHECK(load_base_weights(dir + "/f32").storage == w.storage);
  CHECK(load_base_weights(dir + "/sharded").storage == w.storage);
}

TEST_CASE("in-memory source and materialize are inverse") {
  const ModelConfig c = config_of("qwen3");
  const BaseWeights w = fast_weights(c, 9, 0.02);
  const InMemoryWeightSource src(w);
  CHECK(read_sliced(src) == w.storage);
  const BaseWeights back = materialize(src);
  CHECK(back.storage == w.storage);
  CHECK(back.cfg.hidden_size == c.hidden_size);
  // Slices past a tensor's end are refused with its name.
  CHECK(test::error_of([&] {
          float x[4];
          src.read(0, src.entries()[0].numel() - 2, 4, x);
        }).find("model.embed_tokens.weight") != std::string::npos);
}

TEST_CASE("layout entries name what each tensor is") {
  const ModelConfig c = config_of("qwen3");
  int proj = 0, norms = 0;
  for (const auto& e : BaseWeights::layout(c)) {
    using K = BaseWeights::Kind;
    if (e.kind == K::proj_weight) {
      ++proj;
      CHECK(e.name == "model.layers." + std::to_string(e.layer) + "." + proj_parent(e.proj) + "." +
                          proj_name(e.proj) + ".weight");
    }
    if (e.kind == K::q_norm || e.kind == K::k_norm) {
      ++norms;
      CHECK(e.shape == std::vector<int64_t>{c.head_dim});
    }
    if (e.kind == K::embed) CHECK(e.name == "model.embed_tokens.weight");
    if (e.kind == K::lm_head) CHECK(e.name == "lm_head.weight");
    if (e.kind == K::final_norm) CHECK(e.layer == -1);
  }
  CHECK(proj == kNumProj * c.num_hidden_layers);
  CHECK(norms == 2 * c.num_hidden_layers);
}

TEST_CASE("random-on-load: bad markers and mixed directories are refused, naming the file") {
  const ModelConfig c = config_of("llama");
  const std::string dir = test::scratch("ws_bad_marker");
  save_random_on_load_model(dir, c, 1, 0.02);
  auto write = [&](const std::string& text) {
    std::ofstream(dir + "/ftune_random_init.json") << text;
  };
  write(R"({"generator": "mt19937", "seed": 1, "initializer_range": 0.02})");
  std::string e = test::error_of([&] { (void)load_base_weights(dir); });
  CHECK(e.find("ftune_random_init.json") != std::string::npos);
  CHECK(e.find("generator") != std::string::npos);
  write(R"({"generator": "fast_init", "initializer_range": 0.02})");
  e = test::error_of([&] { (void)load_base_weights(dir); });
  CHECK(e.find("'seed'") != std::string::npos);
  write(R"({"generator": "fast_init", "seed": 1, "initializer_range": -1})");
  CHECK(test::error_of([&] { (void)load_base_weights(dir); }).find("initializer_range") !=
        std::string::npos);
  write("{not json");
  CHECK(test::error_of([&] { (void)load_base_weights(dir); }).find("ftune_random_init.json") !=
        std::string::npos);
  // Stored weights win over the marker (as a directory with safetensors is a normal model),
  // and writing a random-on-load model into a directory with weights is refused.
  save_hf_model(dir, fast_weights(c, 4, 0.02));
  CHECK(load_base_weights(dir).storage == fast_weights(c, 4, 0.02).storage);
  CHECK(test::error_of([&] { save_random_on_load_model(dir, c, 1, 0.02); })
            .find("model.safetensors") != std::string::npos);
  // A directory with neither gives the usual message.
  const std::string empty = test::scratch("ws_empty");
  std::ofstream(empty + "/config.json") << "{}";
  CHECK(test::error_of([&] { (void)open_base_weights(empty, c); }).find("model.safetensors") !=
        std::string::npos);
}
