// The ftune binary as a user meets it: the embedded default trains and the loss falls,
// outputs are complete, and every bad input exits non-zero with a message naming it.
#include <doctest/doctest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "test_util.hpp"

namespace fs = std::filesystem;

namespace {

struct RunResult {
  int exit_code;
  std::string output;  // stdout + stderr
};

RunResult run_ftune(const std::string& args, const std::string& cwd = FTUNE_SOURCE_DIR) {
  const std::string cmd = "cd '" + cwd + "' && '" + ftune::test::ftune_bin() + "' " + args + " 2>&1";
  RunResult r{0, ""};
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  std::array<char, 4096> buf;
  while (size_t n = fread(buf.data(), 1, buf.size(), p)) r.output.append(buf.data(), n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  return r;
}

void write_file(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << text;
}

std::string tiny_model(const std::string& dir) {
  const RunResult r = run_ftune("init-model --output '" + dir + "' --hidden_size 32 --num_hidden_layers 1 "
                                "--vocab_size 64 --intermediate_size 48 --num_attention_heads 2 "
                                "--num_key_value_heads 1");
  REQUIRE_MESSAGE(r.exit_code == 0, r.output);
  return dir;
}

std::string common_flags(const std::string& model, const std::string& data, const std::string& out) {
  return "--model_name_or_path '" + model + "' --train_file_dir '" + data + "' --output_dir '" + out +
         "' --max_steps 2 --per_device_train_batch_size 1 --gradient_accumulation_steps 1";
}

}  // namespace

TEST_CASE("the embedded default trains, the loss falls and the adapter is written") {
  const std::string out = ftune::test::scratch("e2e_default");
  // The README's default run, shortened to 1 epoch to keep the test quick.
  const RunResult r = run_ftune("train --config inputs/default.toml --output_dir '" + out +
                                "' --num_train_epochs 1 --eval_steps 0");
  REQUIRE_MESSAGE(r.exit_code == 0, r.output);
  std::ifstream m(out + "/metrics.jsonl");
  std::string line;
  std::vector<double> losses;
  double eval_loss = 0;
  while (std::getline(m, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) {
      for (const char* k : {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"})
        CHECK_MESSAGE(j.contains(k), "metrics line lacks " << k << ": " << line);
      losses.push_back(j["loss"]);
    }
    if (j.contains("eval_loss")) eval_loss = j["eval_loss"];
  }
  REQUIRE(losses.size() >= 3);
  CHECK(losses.back() < losses.front() - 0.5);  // visibly falling
  CHECK(eval_loss > 0);
  CHECK(eval_loss < losses.front() - 1.0);  // the held-out conversations got easier too
  CHECK(fs::exists(out + "/adapter/adapter_config.json"));
  CHECK(fs::exists(out + "/adapter/adapter_model.safetensors"));
  CHECK(fs::exists(out + "/ftune_config.toml"));
  CHECK(r.output.find("step 60/60") != std::string::npos);  // 480 conversations / (4 x 2)
}

TEST_CASE("resolved config is written and flags override the file") {
  const std::string dir = ftune::test::scratch("e2e_resolved");
  const std::string model = tiny_model(dir + "/model");
  write_file(dir + "/data/a.jsonl", "{\"input_ids\": [1, 5, 6, 7, 8]}\n{\"input_ids\": [1, 9, 10]}\n");
  write_file(dir + "/cfg.toml", "learning_rate = 0.5\nlora_rank = 4\n");
  const RunResult r = run_ftune("train --config '" + dir + "/cfg.toml' " +
                                common_flags(model, dir + "/data", dir + "/out") + " --learning_rate 0.25");
  REQUIRE_MESSAGE(r.exit_code == 0, r.output);
  std::ifstream f(dir + "/out/ftune_config.toml");
  std::stringstream ss;
  ss << f.rdbuf();
  CHECK(ss.str().find("learning_rate = 0.25") != std::string::npos);
  CHECK(ss.str().find("lora_rank = 4") != std::string::npos);
}

TEST_CASE("selective_recompute: a CUDA option the CPU backend says it ignores") {
  const std::string dir = ftune::test::scratch("e2e_selective");
  const std::string model = tiny_model(dir + "/model");
  write_file(dir + "/data/a.jsonl", "{\"input_ids\": [1, 5, 6, 7, 8]}\n{\"input_ids\": [1, 9, 10]}\n");
  const std::string flags = common_flags(model, dir + "/data", dir + "/out") +
                            " --device cpu --selective_recompute true";
  const RunResult ok = run_ftune("train " + flags + " --gradient_checkpointing true");
  REQUIRE_MESSAGE(ok.exit_code == 0, ok.output);
  CHECK(ok.output.find("selective_recompute: no effect on the CPU backend") != std::string::npos);
  // Without checkpointing there is nothing to select: refused, the key named.
  const RunResult bad = run_ftune("train " + flags + " --overwrite_output_dir true");
  CHECK(bad.exit_code != 0);
  CHECK(bad.output.find("selective_recompute = true needs gradient_checkpointing = true") !=
        std::string::npos);
}

TEST_CASE("bad inputs fail with a message naming the file, line or key") {
  const std::string dir = ftune::test::scratch("e2e_errors");
  const std::string model = tiny_model(dir + "/model");
  write_file(dir + "/data/good.jsonl", "{\"input_ids\": [1, 5, 6, 7, 8]}\n");
  const std::string flags = common_flags(model, dir + "/data", dir + "/out");

  SUBCASE("unknown flag suggests the nearest name") {
    const RunResult r = run_ftune("train " + flags + " --learning_rat 0.1");
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("learning_rate") != std::string::npos);
  }
  SUBCASE("config typo names the file and line") {
    write_file(dir + "/typo.toml", "\n\nlora_rnk = 4\n");
    const RunResult r = run_ftune("train --config '" + dir + "/typo.toml' " + flags);
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("typo.toml") != std::string::npos);
    CHECK(r.output.find("line 3") != std::string::npos);
    CHECK(r.output.find("lora_rank") != std::string::npos);
  }
  SUBCASE("missing config file") {
    const RunResult r = run_ftune("train --config '" + dir + "/nope.toml' " + flags);
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("nope.toml") != std::string::npos);
  }
  SUBCASE("malformed JSON line names file:line") {
    write_file(dir + "/bad/x.jsonl", "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 2,\n");
    const RunResult r = run_ftune("train " + common_flags(model, dir + "/bad", dir + "/out"));
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("x.jsonl:2") != std::string::npos);
  }
  SUBCASE("token outside the vocabulary") {
    write_file(dir + "/oov/x.jsonl", "{\"input_ids\": [1, 2, 999]}\n");
    const RunResult r = run_ftune("train " + common_flags(model, dir + "/oov", dir + "/out"));
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("999") != std::string::npos);
  }
  SUBCASE("missing model directory") {
    const RunResult r = run_ftune("train " + common_flags(dir + "/no_model", dir + "/data", dir + "/out"));
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("no_model") != std::string::npos);
  }
  SUBCASE("unsupported model type") {
    fs::create_directories(dir + "/gpt2");
    write_file(dir + "/gpt2/config.json", "{\"model_type\": \"gpt2\", \"vocab_size\": 10}");
    const RunResult r = run_ftune("train " + common_flags(dir + "/gpt2", dir + "/data", dir + "/out"));
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("gpt2") != std::string::npos);
  }
  SUBCASE("a sliding window shorter than model_max_length is refused, a longer one accepted") {
    const RunResult m = run_ftune("init-model --output '" + dir + "/mistral' --model_type mistral "
                                  "--hidden_size 32 --num_hidden_layers 1 --vocab_size 64 "
                                  "--intermediate_size 48 --num_attention_heads 2 --num_key_value_heads 1 "
                                  "--max_position_embeddings 256");
    REQUIRE_MESSAGE(m.exit_code == 0, m.output);
    // Mistral-7B-v0.1 style window of 64 tokens.
    std::ifstream in(dir + "/mistral/config.json");
    nlohmann::json j = nlohmann::json::parse(in);
    j["sliding_window"] = 64;
    write_file(dir + "/mistral/config.json", j.dump());
    const std::string f = common_flags(dir + "/mistral", dir + "/data", dir + "/out_m");
    const RunResult bad = run_ftune("train " + f + " --model_max_length 128");
    CHECK(bad.exit_code != 0);
    CHECK(bad.output.find("sliding_window") != std::string::npos);
    CHECK(bad.output.find("model_max_length <= 64") != std::string::npos);
    const RunResult ok = run_ftune("train " + f + " --model_max_length 64");
    CHECK_MESSAGE(ok.exit_code == 0, ok.output);
  }
  SUBCASE("not-yet-supported parameters are refused, not ignored") {
    const RunResult r = run_ftune("train " + flags + " --fp16 true");
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("fp16") != std::string::npos);
    CHECK(r.output.find("not yet supported") != std::string::npos);
  }
  SUBCASE("init_adapter with another rank is refused") {
    const RunResult a = run_ftune("train " + flags + " --lora_rank 4");
    REQUIRE_MESSAGE(a.exit_code == 0, a.output);
    const RunResult r = run_ftune("train " + common_flags(model, dir + "/data", dir + "/out2") +
                                  " --lora_rank 8 --init_adapter '" + dir + "/out/adapter'");
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("r") != std::string::npos);
    CHECK_FALSE(fs::exists(dir + "/out2/adapter"));
  }
  SUBCASE("an existing adapter is not overwritten without overwrite_output_dir") {
    const RunResult a = run_ftune("train " + flags);
    REQUIRE_MESSAGE(a.exit_code == 0, a.output);
    const auto before = fs::last_write_time(dir + "/out/adapter/adapter_model.safetensors");
    const RunResult r = run_ftune("train " + flags + " --overwrite_output_dir false");
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("overwrite_output_dir") != std::string::npos);
    CHECK(fs::last_write_time(dir + "/out/adapter/adapter_model.safetensors") == before);
  }
}

TEST_CASE("help is complete") {
  const RunResult top = run_ftune("--help");
  CHECK(top.exit_code == 0);
  for (const char* c : {"train", "init-model", "tokenize"}) CHECK(top.output.find(c) != std::string::npos);
  const RunResult train = run_ftune("train --help");
  CHECK(train.exit_code == 0);
  for (const char* k : {"model_name_or_path", "lora_rank", "gradient_accumulation_steps", "zero_stage",
                        "init_adapter", "save_total_limit"})
    CHECK(train.output.find(k) != std::string::npos);
}
