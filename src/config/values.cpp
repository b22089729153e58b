// Typed access to one parameter: text/TOML -> field, field -> TOML text.
#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <utility>

#include "ftune/config/parse.hpp"
#include "params.hpp"

namespace ftune::config {

namespace {

template <class... F>
struct Overload : F... {
  using F::operator()...;
};
template <class... F>
Overload(F...) -> Overload<F...>;

using Str = std::string TrainConfig::*;
using Int = int TrainConfig::*;
using Int64 = int64_t TrainConfig::*;
using Float = double TrainConfig::*;
using Bool = bool TrainConfig::*;
using List = std::vector<std::string> TrainConfig::*;

[[noreturn]] void bad(const Param& p, const std::string& where, const std::string& why) {
  throw ConfigError("invalid value for '" + std::string(p.name) + "' " + where + ": " + why);
}

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char ch : s) {
    switch (ch) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (ch < 0x20 || ch == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04X", ch);
          out += buf;
        } else {
          out += static_cast<char>(ch);
        }
    }
  }
  return out + "\"";
}

// Shortest text that reads back to the same double, always in TOML float syntax.
std::string format_double(double v) {
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v);
  std::string s(buf, res.ptr);
  if (s.find_first_of(".eni") == std::string::npos) s += ".0";
  return s;
}

std::string trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return std::string(s.substr(b, e - b));
}

// "a, b,,c" -> {"a","b","c"}; empty items (e.g. a trailing comma) are dropped.
std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t comma = s.find(',', start);
    if (comma == std::string::npos) comma = s.size();
    std::string item = trim(std::string_view(s).substr(start, comma - start));
    if (!item.empty()) out.push_back(std::move(item));
    start = comma + 1;
  }
  return out;
}

bool parse_int(const std::string& text, int64_t& out) {
  std::string_view s = text;
  if (!s.empty() && s[0] == '+') s.remove_prefix(1);
  auto res = std::from_chars(s.data(), s.data() + s.size(), out);
  return !s.empty() && res.ec == std::errc() && res.ptr == s.data() + s.size();
}

bool parse_double(const std::string& text, double& out) {
  std::string_view s = text;
  if (!s.empty() && s[0] == '+') s.remove_prefix(1);
  auto res = std::from_chars(s.data(), s.data() + s.size(), out);
  return !s.empty() && res.ec == std::errc() && res.ptr == s.data() + s.size();
}

// The spellings HF's string_to_bool accepts, case-insensitively.
bool parse_bool(const std::string& text, bool& out) {
  std::string s = text;
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  if (s == "true" || s == "t" || s == "yes" || s == "y" || s == "1") return out = true, true;
  if (s == "false" || s == "f" || s == "no" || s == "n" || s == "0") return out = false, true;
  return false;
}

std::string toml_type(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::string:
      return "a string";
    case toml::node_type::integer:
      return "an integer";
    case toml::node_type::floating_point:
      return "a float";
    case toml::node_type::boolean:
      return "a boolean";
    case toml::node_type::array:
      return "an array";
    case toml::node_type::table:
      return "a table";
    default:
      return "a date/time";
  }
}

void set_int_checked(const Param& p, TrainConfig& c, int64_t v, const std::string& where) {
  std::visit(Overload{[&](Int m) {
                        if (!std::in_range<int>(v))
                          bad(p, where, std::to_string(v) + " does not fit in a 32-bit integer");
                        c.*m = static_cast<int>(v);
                      },
                      [&](Int64 m) { c.*m = v; }, [](auto) {}},
             p.member);
}

void set_double_checked(const Param& p, TrainConfig& c, double v, const std::string& where) {
  if (!std::isfinite(v)) bad(p, where, "expected a finite number");
  c.*std::get<Float>(p.member) = v;
}

// Raw value for comparing against p.choices (strings unquoted).
std::string plain_value(const Param& p, const TrainConfig& c) {
  if (auto m = std::get_if<Str>(&p.member)) return c.**m;
  return format_value(p, c);
}

void check_choice(const Param& p, const TrainConfig& c, const std::string& where) {
  if (value_allowed(p, c)) return;
  std::string v = plain_value(p, c), list;
  for (const auto& ch : p.choices) list += (list.empty() ? "" : ", ") + ch;
  std::string msg = "'" + v + "' is not one of: " + list;
  std::string near = nearest_name(v, p.choices);
  if (!near.empty()) msg += "; did you mean '" + near + "'?";
  bad(p, where, msg);
}

}  // namespace

const char* type_name(const Param& p) {
  return std::visit(Overload{[](Str) { return "STR"; }, [](Int) { return "INT"; },
                             [](Int64) { return "INT"; }, [](Float) { return "FLOAT"; },
                             [](Bool) { return "BOOL"; }, [](List) { return "LIST"; }},
                    p.member);
}

std::string format_value(const Param& p, const TrainConfig& c) {
  return std::visit(
      Overload{[&](Str m) { return quote(c.*m); }, [&](Int m) { return std::to_string(c.*m); },
               [&](Int64 m) { return std::to_string(c.*m); },
               [&](Float m) { return format_double(c.*m); },
               [&](Bool m) { return std::string(c.*m ? "true" : "false"); },
               [&](List m) {
                 std::string s = "[";
                 for (const auto& item : c.*m) s += (s.size() > 1 ? ", " : "") + quote(item);
                 return s + "]";
               }},
      p.member);
}

bool value_allowed(const Param& p, const TrainConfig& c) {
  if (p.choices.empty()) return true;
  std::string v = plain_value(p, c);
  return std::find(p.choices.begin(), p.choices.end(), v) != p.choices.end();
}

void set_from_string(const Param& p, TrainConfig& c, const std::string& text,
                     const std::string& where) {
  const std::string quoted = "'" + text + "'";
  std::visit(Overload{[&](Str m) { c.*m = text; }, [&](List m) { c.*m = split_list(text); },
                      [&](Bool m) {
                        bool b;
                        if (!parse_bool(text, b))
                          bad(p, where, "expected true or false, got " + quoted);
                        c.*m = b;
                      },
                      [&](Float) {
                        double d;
                        if (!parse_double(text, d))
                          bad(p, where, "expected a number, got " + quoted);
                        set_double_checked(p, c, d, where);
                      },
                      [&](auto) {  // Int, Int64
                        int64_t i;
                        double d;
                        if (parse_int(text, i)) return set_int_checked(p, c, i, where);
                        if (parse_double(text, d))
                          bad(p, where, "expected an integer, got the non-integer " + quoted);
                        bad(p, where, "expected an integer, got " + quoted);
                      }},
             p.member);
  check_choice(p, c, where);
}

void set_from_toml(const Param& p, TrainConfig& c, const toml::node& n, const std::string& where) {
  auto expected = [&](const std::string& what) {
    bad(p, where, "expected " + what + ", got " + toml_type(n));
  };
  std::visit(
      Overload{[&](Str m) {
                 if (!n.is_string()) expected("a string");
                 c.*m = n.as_string()->get();
               },
               [&](List m) {
                 if (n.is_string()) return void(c.*m = split_list(n.as_string()->get()));
                 if (!n.is_array()) expected("an array of strings or a comma-separated string");
                 std::vector<std::string> items;
                 for (const toml::node& e : *n.as_array()) {
                   if (!e.is_string())
                     bad(p, where,
                         "expected an array of strings, but an element is " + toml_type(e));
                   items.push_back(e.as_string()->get());
                 }
                 c.*m = std::move(items);
               },
               [&](Bool m) {
                 if (n.is_string())
                   bad(p, where,
                       "expected a boolean (true or false, without quotes), got the string " +
                           quote(n.as_string()->get()));
                 if (!n.is_boolean()) expected("a boolean (true or false)");
                 c.*m = n.as_boolean()->get();
               },
               [&](Float) {
                 if (n.is_integer())
                   return set_double_checked(p, c, double(n.as_integer()->get()), where);
                 if (!n.is_floating_point()) expected("a number");
                 set_double_checked(p, c, n.as_floating_point()->get(), where);
               },
               [&](auto) {  // Int, Int64: a float is rejected rather than truncated
                 if (n.is_floating_point())
                   bad(p, where,
                       "expected an integer, got the float " +
                           format_double(n.as_floating_point()->get()));
                 if (!n.is_integer()) expected("an integer");
                 set_int_checked(p, c, n.as_integer()->get(), where);
               }},
      p.member);
  check_choice(p, c, where);
}

}  // namespace ftune::config
