#include "checked_json.hpp"

#include <cfloat>
#include <cmath>

namespace ktrt {
namespace {

// Deepest nesting of arrays/objects outside strings; stops counting once past `limit`.
size_t nesting_depth(const std::string& text, size_t limit) {
  size_t depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest) deepest = depth;
      if (deepest > limit) return deepest;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

std::string type_of(const Json& value) {
  if (value.is_number_integer()) return "an integer";
  if (value.is_number_float()) return "a non-integer number";
  return std::string("a") + (value.is_array() || value.is_object() ? "n " : " ") + value.type_name();
}

}  // namespace

Json parse_json(const std::string& text, const std::string& what) {
  if (nesting_depth(text, kMaxJsonDepth) > kMaxJsonDepth)
    throw ContractError(what + ": expected JSON nested at most " + std::to_string(kMaxJsonDepth) +
                        " deep, found deeper nesting");
  try {
    return Json::parse(text);
  } catch (const Json::exception& err) {
    throw ContractError(what + ": expected JSON, found a parse error (" + err.what() + ")");
  }
}

std::string describe(const Json& value) {
  // Depth is bounded by parse_json, so dump() recurses at most kMaxJsonDepth levels.
  std::string text = value.dump(-1, ' ', true, Json::error_handler_t::replace);
  if (text.size() > 80) text = text.substr(0, 77) + "...";
  return type_of(value) + " " + text;
}

bool has_member(const Json& object, const std::string& key) { return object.is_object() && object.contains(key); }

const Json& member(const Json& object, const std::string& key, const std::string& where) {
  if (!object.is_object()) throw ContractError(where + ": expected an object, found " + describe(object));
  const auto it = object.find(key);
  if (it == object.end()) throw ContractError(where + "." + key + ": expected the field, found none");
  return *it;
}

const Json& array_of(const Json& value, const std::string& where) {
  if (!value.is_array()) throw ContractError(where + ": expected an array, found " + describe(value));
  return value;
}

const Json& object_of(const Json& value, const std::string& where) {
  if (!value.is_object()) throw ContractError(where + ": expected an object, found " + describe(value));
  return value;
}

std::string string_of(const Json& value, const std::string& where) {
  if (!value.is_string()) throw ContractError(where + ": expected a string, found " + describe(value));
  return value.get<std::string>();
}

bool bool_of(const Json& value, const std::string& where) {
  if (!value.is_boolean()) throw ContractError(where + ": expected true or false, found " + describe(value));
  return value.get<bool>();
}

int64_t int_of(const Json& value, const std::string& where, int64_t lo, int64_t hi) {
  const std::string range = "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  if (!value.is_number_integer()) throw ContractError(where + ": expected " + range + ", found " + describe(value));
  // Unsigned JSON integers above INT64_MAX must not wrap to negative values.
  if (value.is_number_unsigned() && value.get<uint64_t>() > static_cast<uint64_t>(hi))
    throw ContractError(where + ": expected " + range + ", found " + describe(value));
  const int64_t v = value.get<int64_t>();
  if (v < lo || v > hi) throw ContractError(where + ": expected " + range + ", found " + describe(value));
  return v;
}

float f32_of(const Json& value, const std::string& where) {
  if (!value.is_number()) throw ContractError(where + ": expected a finite float32 number, found " + describe(value));
  const double v = value.get<double>();
  // Checked in double first: converting a double beyond float32's range is undefined behaviour.
  if (!std::isfinite(v) || std::fabs(v) > static_cast<double>(FLT_MAX))
    throw ContractError(where + ": expected a finite float32 number, found " + describe(value));
  return static_cast<float>(v);
}

int64_t checked_mul(int64_t a, int64_t b, int64_t limit, const std::string& where) {
  int64_t product = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &product) || product > limit)
    throw ContractError(where + ": expected a size of at most " + std::to_string(limit) + ", found " +
                        std::to_string(a) + " x " + std::to_string(b) + " (too large)");
  return product;
}

int64_t checked_product(const std::vector<int64_t>& dims, int64_t limit, const std::string& where) {
  int64_t n = 1;
  for (int64_t d : dims) n = checked_mul(n, d, limit, where);
  return n;
}

std::vector<int64_t> shape_of(const Json& value, const std::string& where) {
  const Json& list = array_of(value, where);
  if (list.size() > kMaxRank)
    throw ContractError(where + ": expected at most " + std::to_string(kMaxRank) + " dims, found " +
                        std::to_string(list.size()));
  std::vector<int64_t> dims;
  for (size_t i = 0; i < list.size(); ++i)
    dims.push_back(int_of(list[i], where + "[" + std::to_string(i) + "]", 1, kMaxDim));
  checked_product(dims, kMaxElements, where);
  return dims;
}

}  // namespace ktrt
