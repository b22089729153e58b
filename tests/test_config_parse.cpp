// config module: TOML file + flags -> TrainConfig, errors, help, round trip.
#include <doctest/doctest.h>

#include <fstream>
#include <iostream>
#include <sstream>

#include "ftune/config/parse.hpp"
#include "test_util.hpp"

using namespace ftune;

namespace {

std::string write_file(const std::string& dir, const std::string& name, const std::string& text) {
  std::string path = dir + "/" + name;
  std::ofstream(path) << text;
  return path;
}

TrainConfig parse(const std::vector<std::string>& args) {
  auto c = parse_train_command(args);
  REQUIRE(c.has_value());
  return *c;
}

// The message of the ConfigError thrown by f ("" if none; other exceptions fail the test).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// Every field name, spelled out here independently of the library's table.
const std::vector<std::string> kAllFields = {"model_name_or_path",
                                             "tokenizer_name_or_path",
                                             "train_file_dir",
                                             "validation_file_dir",
                                             "output_dir",
                                             "init_adapter",
                                             "cache_dir",
                                             "template_name",
                                             "model_max_length",
                                             "max_train_samples",
                                             "max_eval_samples",
                                             "validation_split_percentage",
                                             "preprocessing_num_workers",
                                             "dataloader_num_workers",
                                             "shuffle",
                                             "train_on_inputs",
                                             "packing",
                                             "skip_bad_examples",
                                             "use_peft",
                                             "lora_rank",
                                             "lora_alpha",
                                             "lora_dropout",
                                             "target_modules",
                                             "use_rslora",
                                             "learning_rate",
                                             "num_train_epochs",
                                             "max_steps",
                                             "per_device_train_batch_size",
                                             "per_device_eval_batch_size",
                                             "gradient_accumulation_steps",
                                             "warmup_ratio",
                                             "warmup_steps",
                                             "weight_decay",
                                             "lr_scheduler_type",
                                             "max_grad_norm",
                                             "adam_beta1",
                                             "adam_beta2",
                                             "adam_epsilon",
                                             "seed",
                                             "bf16",
                                             "fp16",
                                             "flash_attn",
                                             "gradient_checkpointing",
                                             "selective_recompute",
                                             "load_in_8bit",
                                             "load_in_4bit",
                                             "zero_stage",
                                             "offload_optimizer",
                                             "offload_param",
                                             "device",
                                             "num_threads",
                                             "logging_steps",
                                             "save_steps",
                                             "save_total_limit",
                                             "save_only_model",
                                             "eval_steps",
                                             "resume_from_checkpoint",
                                             "report_to",
                                             "overwrite_output_dir"};

}  // namespace

TEST_CASE("no arguments gives the TrainConfig defaults") {
  TrainConfig c = parse({});
  CHECK(c.output_dir == "outputs-ftune");
  CHECK(c.learning_rate == doctest::Approx(2e-5));
  CHECK(c.lora_rank == 8);
  CHECK(c.target_modules == std::vector<std::string>{"all"});
  CHECK(c.bf16);
  CHECK(c.max_steps == -1);
  CHECK(c.lr_scheduler_type == "linear");
  CHECK(c.train_file_dir.empty());
}

TEST_CASE("TOML file: every value type") {
  auto dir = test::scratch("config_types");
  auto path = write_file(dir, "cfg.toml", R"(
model_name_or_path = "/models/qwen"
train_file_dir = ["data/a", "data/b"]
validation_file_dir = "val/x, val/y"
model_max_length = 512
max_steps = -1
seed = 1234567890123
lora_rank = 16
lora_alpha = 32          # an integer for a float field is fine
lora_dropout = 0.1
learning_rate = 2e-4
bf16 = false
shuffle = true
lr_scheduler_type = "cosine"
target_modules = ["q_proj", "v_proj"]
)");
  TrainConfig c = load_train_config_file(path);
  CHECK(c.model_name_or_path == "/models/qwen");
  CHECK(c.train_file_dir == std::vector<std::string>{"data/a", "data/b"});
  CHECK(c.validation_file_dir == std::vector<std::string>{"val/x", "val/y"});
  CHECK(c.model_max_length == 512);
  CHECK(c.seed == 1234567890123);
  CHECK(c.lora_rank == 16);
  CHECK(c.lora_alpha == 32.0);
  CHECK(c.lora_dropout == doctest::Approx(0.1));
  CHECK(c.learning_rate == doctest::Approx(2e-4));
  CHECK_FALSE(c.bf16);
  CHECK(c.shuffle);
  CHECK(c.lr_scheduler_type == "cosine");
  CHECK(c.target_modules == std::vector<std::string>{"q_proj", "v_proj"});
  CHECK(c.output_dir == "outputs-ftune");  // untouched keys keep their defaults
}

TEST_CASE("empty config file is valid and gives defaults") {
  auto dir = test::scratch("config_empty");
  auto path = write_file(dir, "empty.toml", "");
  TrainConfig c = load_train_config_file(path);
  CHECK(train_config_to_toml(c) == train_config_to_toml(TrainConfig{}));
  TrainConfig d = parse({"--config", path, "--lora_rank", "4"});
  CHECK(d.lora_rank == 4);
}

TEST_CASE("a flag overrides the file") {
  auto dir = test::scratch("config_override");
  auto path = write_file(dir, "cfg.toml",
                         "learning_rate = 1e-3\nlora_rank = 16\nbf16 = true\n"
                         "train_file_dir = [\"file/a\"]\n");
  TrainConfig c = parse({"--learning_rate", "2e-4", "--config", path, "--bf16=false",
                         "--train_file_dir", "cli/a,cli/b"});
  CHECK(c.learning_rate == doctest::Approx(2e-4));
  CHECK_FALSE(c.bf16);
  CHECK(c.lora_rank == 16);  // from the file
  CHECK(c.train_file_dir == std::vector<std::string>{"cli/a", "cli/b"});
}

TEST_CASE("command line: both --foo bar and --foo=bar, negative numbers, last one wins") {
  TrainConfig c = parse({"--max_steps", "-1", "--max_grad_norm=-0.5", "--lora_rank", "4",
                         "--lora_rank", "12", "--output_dir=out dir", "--seed", "+7"});
  CHECK(c.max_steps == -1);
  CHECK(c.max_grad_norm == -0.5);
  CHECK(c.lora_rank == 12);
  CHECK(c.output_dir == "out dir");
  CHECK(c.seed == 7);
}

TEST_CASE("booleans take an explicit value, in HF's spellings") {
  CHECK_FALSE(parse({"--bf16", "false"}).bf16);
  CHECK(parse({"--shuffle", "true"}).shuffle);
  CHECK(parse({"--packing", "1"}).packing);
  CHECK_FALSE(parse({"--shuffle", "0"}).shuffle);
  CHECK(parse({"--packing", "yes"}).packing);
  CHECK_FALSE(parse({"--shuffle", "no"}).shuffle);
  CHECK(parse({"--packing", "True"}).packing);
  CHECK_FALSE(parse({"--bf16", "False"}).bf16);

  std::string bare_last = error_of([] { parse_train_command({"--bf16"}); });
  CHECK(contains(bare_last, "--bf16 needs a value"));
  CHECK(contains(bare_last, "--bf16 false"));
  std::string bare_mid = error_of([] { parse_train_command({"--bf16", "--shuffle", "true"}); });
  CHECK(contains(bare_mid, "--bf16 needs a value"));
  std::string junk = error_of([] { parse_train_command({"--bf16", "maybe"}); });
  CHECK(contains(junk, "'bf16'"));
  CHECK(contains(junk, "'maybe'"));
  CHECK(contains(error_of([] { parse_train_command({"--lora_rank"}); }),
                 "--lora_rank needs a value"));
}

TEST_CASE("lists are comma-separated on the command line") {
  TrainConfig c = parse({"--train_file_dir", "a,b", "--target_modules", "q_proj, k_proj,v_proj,",
                         "--validation_file_dir", "only"});
  CHECK(c.train_file_dir == std::vector<std::string>{"a", "b"});
  CHECK(c.target_modules == std::vector<std::string>{"q_proj", "k_proj", "v_proj"});
  CHECK(c.validation_file_dir == std::vector<std::string>{"only"});
}

TEST_CASE("unknown TOML key: file, line and nearest name") {
  auto dir = test::scratch("config_unknown_key");
  auto path = write_file(dir, "cfg.toml", "lora_rank = 8\n\nlearning_rat = 2e-4\n");
  std::string e = error_of([&] { load_train_config_file(path); });
  CHECK(contains(e, "unknown key 'learning_rat' in " + path + " line 3"));
  CHECK(contains(e, "did you mean 'learning_rate'?"));

  auto far = write_file(dir, "far.toml", "zzzzzzzzzz = 1\n");
  std::string e2 = error_of([&] { load_train_config_file(far); });
  CHECK(contains(e2, "unknown key 'zzzzzzzzzz'"));
  CHECK_FALSE(contains(e2, "did you mean"));
}

TEST_CASE("unknown flag: nearest name suggested") {
  std::string e = error_of([] { parse_train_command({"--learning_rat", "2e-4"}); });
  CHECK(contains(e, "unknown flag '--learning_rat'"));
  CHECK(contains(e, "did you mean '--learning_rate'?"));
  std::string eq = error_of([] { parse_train_command({"--lora-rank=8"}); });
  CHECK(contains(eq, "unknown flag '--lora-rank'"));
  CHECK(contains(eq, "did you mean '--lora_rank'?"));
  std::string confg = error_of([] { parse_train_command({"--confg", "x.toml"}); });
  CHECK(contains(confg, "did you mean '--config'?"));
  std::string pos = error_of([] { parse_train_command({"cfg.toml"}); });
  CHECK(contains(pos, "unexpected argument 'cfg.toml'"));
}

TEST_CASE("TOML type errors name the file, the line and the key") {
  auto dir = test::scratch("config_type_errors");
  struct Case {
    std::string body, key, line, detail;
  };
  const std::vector<Case> cases = {
      {"seed = 1\nbf16 = \"false\"\n", "bf16", "line 2", "without quotes"},
      {"lora_rank = 8.5\n", "lora_rank", "line 1", "expected an integer"},
      {"\n\nlearning_rate = \"fast\"\n", "learning_rate", "line 3", "expected a number"},
      {"output_dir = 3\n", "output_dir", "line 1", "expected a string"},
      {"target_modules = [\"q\", 1]\n", "target_modules", "line 1", "array of strings"},
      {"shuffle = 1\n", "shuffle", "line 1", "expected a boolean"},
      {"lora_rank = 99999999999\n", "lora_rank", "line 1", "does not fit in a 32-bit integer"},
      {"device = \"gpu\"\n", "device", "line 1", "did you mean 'cpu'"},
  };
  for (const Case& k : cases) {
    CAPTURE(k.body);
    auto path = write_file(dir, "cfg.toml", k.body);
    std::string e = error_of([&] { load_train_config_file(path); });
    CHECK(contains(e, "'" + k.key + "'"));
    CHECK(contains(e, path + " " + k.line));
    CHECK(contains(e, k.detail));
  }
}

TEST_CASE("TOML: nested tables, syntax errors and missing files are errors") {
  auto dir = test::scratch("config_tables");
  auto table = write_file(dir, "t.toml", "lora_rank = 8\n[lora]\nrank = 8\n");
  std::string e = error_of([&] { load_train_config_file(table); });
  CHECK(contains(e, "table 'lora'"));
  CHECK(contains(e, "line 2"));
  auto dotted = write_file(dir, "d.toml", "optim.lr = 1\n");
  CHECK(contains(error_of([&] { load_train_config_file(dotted); }), "table 'optim'"));
  auto broken = write_file(dir, "b.toml", "lora_rank = 8\nlora_alpha = = 3\n");
  std::string syntax = error_of([&] { load_train_config_file(broken); });
  CHECK(contains(syntax, broken + " line 2"));
  CHECK(contains(error_of([&] { load_train_config_file(dir + "/missing.toml"); }), "missing.toml"));
  CHECK(contains(error_of([&] {
                   parse_train_command({"--config", dir + "/missing.toml"});
                 }),
                 "missing.toml"));
}

TEST_CASE("command-line type errors name the flag and the value") {
  std::string e = error_of([] { parse_train_command({"--lora_rank", "8.5"}); });
  CHECK(contains(e, "'lora_rank'"));
  CHECK(contains(e, "expected an integer"));
  CHECK(contains(e, "'8.5'"));
  CHECK(contains(error_of([] {
                   parse_train_command({"--learning_rate", "2e-4x"});
                 }),
                 "expected a number"));
  CHECK(contains(error_of([] { parse_train_command({"--learning_rate", "nan"}); }), "finite"));
  std::string sched = error_of([] { parse_train_command({"--lr_scheduler_type", "cosin"}); });
  CHECK(contains(sched, "did you mean 'cosine'"));
}

TEST_CASE("train_config_to_toml writes every field and round-trips") {
  TrainConfig c;
  c.model_name_or_path = "/models/with \"quotes\" and \\ backslash";
  c.train_file_dir = {"a", "b, with comma"};
  c.validation_file_dir = {};
  c.target_modules = {"q_proj", "v_proj"};
  c.learning_rate = 1.0 / 3.0;
  c.num_train_epochs = 3;
  c.adam_epsilon = 1e-12;
  c.lora_alpha = 7;
  c.seed = -5;
  c.max_train_samples = 1000;
  c.bf16 = false;
  c.use_rslora = true;
  c.zero_stage = 2;
  c.device = "cuda";
  c.resume_from_checkpoint = "latest";
  c.template_name = "line\nbreak\ttab";

  std::string text = train_config_to_toml(c);
  for (const auto& f : kAllFields) {
    CAPTURE(f);
    CHECK(contains(text, "\n" + f + " = "));
  }
  auto dir = test::scratch("config_roundtrip");
  auto path = write_file(dir, "resolved.toml", text);
  TrainConfig back = load_train_config_file(path);
  CHECK(train_config_to_toml(back) == text);
  CHECK(back.learning_rate == c.learning_rate);  // exact, not approximate
  CHECK(back.adam_epsilon == c.adam_epsilon);
  CHECK(back.model_name_or_path == c.model_name_or_path);
  CHECK(back.train_file_dir == c.train_file_dir);
  CHECK(back.validation_file_dir.empty());
  CHECK(back.template_name == c.template_name);
  CHECK(back.seed == -5);
  CHECK(back.zero_stage == 2);

  // Defaults round-trip too.
  auto dpath = write_file(dir, "defaults.toml", train_config_to_toml(TrainConfig{}));
  CHECK(train_config_to_toml(load_train_config_file(dpath)) == train_config_to_toml(TrainConfig{}));
}

TEST_CASE("help lists every parameter with type and default, grouped") {
  std::string h = train_help();
  for (const auto& f : kAllFields) {
    CAPTURE(f);
    CHECK(contains(h, "--" + f + " "));
  }
  for (const char* group :
       {"Model / data:", "LoRA:", "Optimisation:", "Numerics / memory:", "Logging / saving:"})
    CHECK(contains(h, group));
  CHECK(contains(h, "--lora_rank INT"));
  CHECK(contains(h, "--learning_rate FLOAT"));
  CHECK(contains(h, "--bf16 BOOL"));
  CHECK(contains(h, "--train_file_dir LIST"));
  CHECK(contains(h, "[default: 2e-05]"));
  CHECK(contains(h, "[default: \"outputs-ftune\"]"));
  CHECK(contains(h, "constant_with_warmup"));
  CHECK(contains(h, "--config FILE"));
}

TEST_CASE("--help prints the help and returns nullopt") {
  std::ostringstream captured;
  auto* old = std::cout.rdbuf(captured.rdbuf());
  auto r = parse_train_command({"--lora_rank", "4", "--help"});
  auto r2 = parse_train_command({"-h"});
  std::cout.rdbuf(old);
  CHECK_FALSE(r.has_value());
  CHECK_FALSE(r2.has_value());
  CHECK(contains(captured.str(), "--learning_rate FLOAT"));
}

TEST_CASE("nearest_name") {
  const std::vector<std::string> names = {"learning_rate", "lora_rank", "lora_alpha",
                                          "num_train_epochs", "seed"};
  CHECK(nearest_name("learning_rat", names) == "learning_rate");
  CHECK(nearest_name("LORA_RANK", names) == "lora_rank");
  CHECK(nearest_name("lora_alhpa", names) == "lora_alpha");
  CHECK(nearest_name("epochs", names) == "num_train_epochs");
  CHECK(nearest_name("xyz", names) == "");
  CHECK(nearest_name("", names) == "");
  CHECK(nearest_name("seed", {}) == "");
}
