// safetensors: fp32 round trip, exact bf16/f16/f64 conversion, malformed files, shards.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <vector>

#include "ftune/io/safetensors.hpp"
#include "test_util.hpp"

using namespace ftune;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using ftune::test::error_of;

// Writes a safetensors file byte by byte: header JSON as given (no padding) + raw data.
void write_raw(const std::string& path, const std::string& header, const std::string& data) {
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = header.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << header << data;
}

template <class T>
std::string bytes_of(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

std::vector<char> file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_CASE("write_safetensors / SafetensorsFile round trip") {
  const std::string dir = test::scratch("io_st_roundtrip");
  const std::string path = dir + "/t.safetensors";
  std::vector<float> a(6), b(5), scalar{42.5f};
  for (size_t i = 0; i < a.size(); ++i) a[i] = 0.25f * static_cast<float>(i) - 1.0f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = std::ldexp(1.0f, static_cast<int>(i)) + 1e-3f;
  // Given out of order: the writer sorts by name.
  write_safetensors(path,
                    {{"z.b", {5}, b.data()}, {"a.w", {2, 3}, a.data()}, {"m.s", {}, scalar.data()},
                     {"e.empty", {0, 3}, nullptr}},
                    {{"format", "pt"}});
  CHECK_FALSE(fs::exists(path + ".tmp"));

  // Layout: 8-byte length, header padded to a multiple of 8, data offsets in name order.
  const std::vector<char> raw = file_bytes(path);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  CHECK(n % 8 == 0);
  const json header = json::parse(std::string(raw.data() + 8, n));
  CHECK(header["__metadata__"]["format"] == "pt");
  CHECK(header["a.w"]["data_offsets"] == json({0, 24}));
  CHECK(header["e.empty"]["data_offsets"] == json({24, 24}));
  CHECK(header["m.s"]["data_offsets"] == json({24, 28}));
  CHECK(header["z.b"]["data_offsets"] == json({28, 48}));
  CHECK(raw.size() == 8 + n + 48);

  SafetensorsFile f(path);
  CHECK(f.names() == std::vector<std::string>{"a.w", "e.empty", "m.s", "z.b"});
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.info("a.w").dtype == DType::F32);
  CHECK(f.info("a.w").shape == std::vector<int64_t>{2, 3});
  CHECK(f.info("a.w").numel() == 6);
  CHECK(f.info("m.s").numel() == 1);
  CHECK(f.info("e.empty").numel() == 0);
  std::vector<float> ra(6), rb(5), rs(1);
  f.read_f32("a.w", {2, 3}, ra.data());
  f.read_f32("z.b", {5}, rb.data());
  f.read_f32("m.s", {}, rs.data());
  CHECK(ra == a);
  CHECK(rb == b);
  CHECK(rs[0] == 42.5f);

  const std::string wrong_shape = error_of([&] { f.read_f32("a.w", {3, 2}, ra.data()); });
  CHECK(wrong_shape.find(path) != std::string::npos);
  CHECK(wrong_shape.find("a.w") != std::string::npos);
  CHECK(wrong_shape.find("[2, 3]") != std::string::npos);
  const std::string missing = error_of([&] { (void)f.info("nope"); });
  CHECK(missing.find("nope") != std::string::npos);
  CHECK(missing.find(path) != std::string::npos);

  // Overwriting replaces the file; duplicates are refused.
  write_safetensors(path, {{"only", {1}, scalar.data()}});
  CHECK(SafetensorsFile(path).names() == std::vector<std::string>{"only"});
  CHECK(SafetensorsFile(path).metadata().empty());
  CHECK(error_of([&] {
          write_safetensors(path, {{"x", {1}, scalar.data()}, {"x", {1}, scalar.data()}});
        }).find("duplicate") != std::string::npos);
}

TEST_CASE("bf16, f16 and f64 convert to fp32 exactly") {
  const std::string path = test::scratch("io_st_dtypes") + "/d.safetensors";
  // bf16 is the upper half of an fp32: 1.0, -3.0, 0.15625, +inf, the smallest subnormal (2^-133).
  const std::vector<uint16_t> bf16 = {0x3F80, 0xC040, 0x3E20, 0x7F80, 0x0001};
  // f16: 1.0, -2.0, 0x3555 = 1365/4096, smallest subnormal 2^-24, largest subnormal 1023*2^-24,
  // max 65504, +inf, -inf, NaN, -0.0, smallest normal 2^-14.
  const std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x3555, 0x0001, 0x03FF, 0x7BFF,
                                     0x7C00, 0xFC00, 0x7E00, 0x8000, 0x0400};
  const std::vector<double> f64 = {0.1, -1e30, 3.0};
  const std::string bf = bytes_of(bf16), hf = bytes_of(f16), df = bytes_of(f64);
  const json header = {
      {"b", {{"dtype", "BF16"}, {"shape", {5}}, {"data_offsets", {0, 10}}}},
      {"h", {{"dtype", "F16"}, {"shape", {11}}, {"data_offsets", {10, 32}}}},
      {"d", {{"dtype", "F64"}, {"shape", {3}}, {"data_offsets", {32, 56}}}},
      {"i", {{"dtype", "I32"}, {"shape", {1}}, {"data_offsets", {56, 60}}}},
  };
  // Header deliberately not padded: the reader must cope with unaligned data.
  write_raw(path, header.dump() + " ", bf + hf + df + std::string(4, '\0'));

  SafetensorsFile f(path);
  CHECK(f.info("b").dtype == DType::BF16);
  CHECK(f.info("h").dtype == DType::F16);
  std::vector<float> b(5), h(11), d(3);
  f.read_f32("b", {5}, b.data());
  CHECK(b[0] == 1.0f);
  CHECK(b[1] == -3.0f);
  CHECK(b[2] == 0.15625f);
  CHECK(std::isinf(b[3]));
  CHECK(b[3] > 0);
  CHECK(b[4] == std::ldexp(1.0f, -133));

  f.read_f32("h", {11}, h.data());
  CHECK(h[0] == 1.0f);
  CHECK(h[1] == -2.0f);
  CHECK(h[2] == 0.333251953125f);
  CHECK(h[3] == 5.9604644775390625e-08f);
  CHECK(h[4] == 6.097555160522460937500e-05f);
  CHECK(h[5] == 65504.0f);
  CHECK((std::isinf(h[6]) && h[6] > 0));
  CHECK((std::isinf(h[7]) && h[7] < 0));
  CHECK(std::isnan(h[8]));
  CHECK((h[9] == 0.0f && std::signbit(h[9])));
  CHECK(h[10] == 6.103515625e-05f);

  f.read_f32("d", {3}, d.data());
  CHECK(d[0] == 0.1f);
  CHECK(d[1] == -1e30f);
  CHECK(d[2] == 3.0f);

  float i32;
  const std::string e = error_of([&] { f.read_f32("i", {1}, &i32); });
  CHECK(e.find("I32") != std::string::npos);
  CHECK(e.find(path) != std::string::npos);
}

TEST_CASE("malformed safetensors files give errors naming the file") {
  const std::string dir = test::scratch("io_st_bad");
  auto open_error = [](const std::string& p) {
    return error_of([&] { SafetensorsFile f(p); });
  };
  auto expect = [&](const std::string& p, const std::string& what) {
    const std::string e = open_error(p);
    INFO(e);
    CHECK(e.find(p) != std::string::npos);
    CHECK(e.find(what) != std::string::npos);
  };

  const std::string tiny = dir + "/tiny.safetensors";
  std::ofstream(tiny) << "abc";
  expect(tiny, "truncated");

  expect(dir + "/absent.safetensors", "cannot open");

  const std::string huge = dir + "/huge.safetensors";
  write_raw(huge, "{}", "");
  {  // claim a header much longer than the file
    std::fstream io(huge, std::ios::in | std::ios::out | std::ios::binary);
    const uint64_t n = 1000;
    io.write(reinterpret_cast<const char*>(&n), 8);
  }
  expect(huge, "header length");

  const std::string notjson = dir + "/notjson.safetensors";
  write_raw(notjson, "{\"a\": [1, 2", "");
  expect(notjson, "JSON");

  const std::string notobj = dir + "/notobj.safetensors";
  write_raw(notobj, "[1, 2]", "");
  expect(notobj, "not a JSON object");

  const std::string out_of_range = dir + "/range.safetensors";
  write_raw(out_of_range,
            R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", std::string(8, '\0'));
  expect(out_of_range, "out of range");
  expect(out_of_range, "'w'");

  const std::string inconsistent = dir + "/size.safetensors";
  write_raw(inconsistent,
            R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", std::string(8, '\0'));
  expect(inconsistent, "needs 12");

  const std::string bad_dtype = dir + "/dtype.safetensors";
  write_raw(bad_dtype,
            R"({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})", std::string(2, '\0'));
  expect(bad_dtype, "F8_E4M3");

  const std::string no_offsets = dir + "/nooff.safetensors";
  write_raw(no_offsets, R"({"w": {"dtype": "F32", "shape": [2]}})", std::string(8, '\0'));
  expect(no_offsets, "data_offsets");

  // A valid file cut short: its last tensor now ends past the end of the file.
  const std::string cut = dir + "/cut.safetensors";
  std::vector<float> v(64, 1.0f);
  write_safetensors(cut, {{"a", {32}, v.data()}, {"b", {32}, v.data() + 32}});
  fs::resize_file(cut, fs::file_size(cut) - 4);
  expect(cut, "'b'");
  expect(cut, "out of range");
}

TEST_CASE("SafetensorsSet: single file, sharded index, missing files") {
  std::vector<float> x(12);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i) * 1.5f;

  const std::string single = test::scratch("io_st_single");
  write_safetensors(single + "/model.safetensors", {{"p", {3, 4}, x.data()}});
  SafetensorsSet s1(single);
  CHECK(s1.has("p"));
  CHECK_FALSE(s1.has("q"));
  CHECK(s1.names() == std::vector<std::string>{"p"});

  const std::string sharded = test::scratch("io_st_sharded");
  write_safetensors(sharded + "/model-00001-of-00002.safetensors",
                    {{"a", {4}, x.data()}, {"b", {2, 2}, x.data() + 4}});
  write_safetensors(sharded + "/model-00002-of-00002.safetensors", {{"c", {4}, x.data() + 8}});
  json index = {{"metadata", {{"total_size", 48}}},
                {"weight_map", {{"a", "model-00001-of-00002.safetensors"},
                                {"b", "model-00001-of-00002.safetensors"},
                                {"c", "model-00002-of-00002.safetensors"}}}};
  std::ofstream(sharded + "/model.safetensors.index.json") << index.dump(2);
  SafetensorsSet s2(sharded);
  CHECK(s2.names() == std::vector<std::string>{"a", "b", "c"});
  CHECK(s2.info("b").shape == std::vector<int64_t>{2, 2});
  std::vector<float> b(4), c(4);
  s2.read_f32("b", {2, 2}, b.data());
  s2.read_f32("c", {4}, c.data());
  CHECK(b == std::vector<float>(x.begin() + 4, x.begin() + 8));
  CHECK(c == std::vector<float>(x.begin() + 8, x.end()));
  CHECK(error_of([&] { s2.read_f32("zz", {1}, c.data()); }).find("zz") != std::string::npos);

  // An index that points at the wrong shard.
  index["weight_map"]["c"] = "model-00001-of-00002.safetensors";
  std::ofstream(sharded + "/model.safetensors.index.json") << index.dump(2);
  std::string e = error_of([&] { SafetensorsSet s(sharded); });
  CHECK(e.find("'c'") != std::string::npos);
  CHECK(e.find("index.json") != std::string::npos);

  // A shard that is missing.
  index["weight_map"]["c"] = "model-00009-of-00002.safetensors";
  std::ofstream(sharded + "/model.safetensors.index.json") << index.dump(2);
  e = error_of([&] { SafetensorsSet s(sharded); });
  CHECK(e.find("model-00009-of-00002.safetensors") != std::string::npos);

  const std::string empty = test::scratch("io_st_empty");
  e = error_of([&] { SafetensorsSet s(empty); });
  CHECK(e.find(empty) != std::string::npos);
  CHECK(e.find("model.safetensors") != std::string::npos);
}
