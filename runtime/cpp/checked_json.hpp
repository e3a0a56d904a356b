// Reading untrusted JSON (manifest.json, recording.json) without trusting it: a size and nesting
// bound checked before nlohmann parses, and accessors that check each field's JSON type and range
// before converting. Every failure is a ContractError "<where>: expected ..., found ..." that names
// the field.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace ktrt {

struct ContractError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

using Json = nlohmann::json;

constexpr size_t kMaxJsonDepth = 64;                    // arrays + objects open at once
constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;     // one tensor dimension
constexpr size_t kMaxRank = 8;
constexpr int64_t kMaxElements = int64_t{1} << 40;      // one tensor's element count

// Parses `text` as JSON after checking its nesting depth (outside strings) against kMaxJsonDepth;
// `what` names the document in errors.
Json parse_json(const std::string& text, const std::string& what);

// A short, bounded rendering of a JSON value for error messages.
std::string describe(const Json& value);

const Json& member(const Json& object, const std::string& key, const std::string& where);
bool has_member(const Json& object, const std::string& key);
const Json& array_of(const Json& value, const std::string& where);
const Json& object_of(const Json& value, const std::string& where);
std::string string_of(const Json& value, const std::string& where);
bool bool_of(const Json& value, const std::string& where);
// A JSON integer (not 3.0, not 3e0) in [lo, hi].
int64_t int_of(const Json& value, const std::string& where, int64_t lo, int64_t hi);
// A JSON number that is finite in float32 (no NaN, no Inf, no double beyond float32's range).
float f32_of(const Json& value, const std::string& where);
// A tensor shape: at most kMaxRank integer dims in [1, kMaxDim], element count <= kMaxElements.
std::vector<int64_t> shape_of(const Json& value, const std::string& where);

// Product of `dims` with overflow checks; throws if it exceeds `limit`.
int64_t checked_product(const std::vector<int64_t>& dims, int64_t limit, const std::string& where);
// a * b with overflow check; throws if the product exceeds `limit`.
int64_t checked_mul(int64_t a, int64_t b, int64_t limit, const std::string& where);

}  // namespace ktrt
