#include "manifest.hpp"

#include <cmath>

namespace ktrt {
namespace {

// The manifest schema version this host understands (runtime/contract/manifest.py SCHEMA_VERSION: 4, the
// per-row contract) and what an older set needs (REEXPORT_HINT there).
constexpr int64_t kSchemaVersion = 4;
constexpr const char* kReexportHint =
    "the artifacts predate per-row timesteps and coefficients; re-run `kandinsky-trt export`";

std::string at(const std::string& where, size_t i) { return where + "[" + std::to_string(i) + "]"; }

std::string text_field(const Json& j, const std::string& key, const std::string& where) {
  return string_of(member(j, key, where), where + "." + key);
}

std::string file_field(const Json& j, const std::string& key, const std::string& where) {
  const std::string name = text_field(j, key, where);
  check_relative_name(name, where + "." + key);
  return name;
}

std::string sha256_field(const Json& j, const std::string& where) {
  const std::string digest = text_field(j, "sha256", where);
  bool hex = digest.size() == 64;
  for (char c : digest) hex = hex && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
  if (!hex) throw ContractError(where + ".sha256: expected 64 lower-case hex digits, found " + describe(Json(digest)));
  return digest;
}

std::vector<Tensor> tensors(const Json& list, const std::string& where) {
  std::vector<Tensor> out;
  for (size_t i = 0; i < array_of(list, where).size(); ++i) {
    const std::string w = at(where, i);
    out.push_back({text_field(list[i], "name", w), text_field(list[i], "dtype", w),
                   shape_of(member(list[i], "shape", w), w + ".shape")});
  }
  return out;
}

const Tensor& find(const std::vector<Tensor>& list, const std::string& name, const std::string& where) {
  for (const auto& t : list)
    if (t.name == name) return t;
  throw ContractError(where + ": expected a tensor named " + name + ", found none");
}

Profile parse_profile(const Json& p, const std::string& where) {
  return {int_of(member(p, "batch", where), where + ".batch", 1, kMaxBatch),
          int_of(member(p, "height", where), where + ".height", 1, kMaxImageSide),
          int_of(member(p, "width", where), where + ".width", 1, kMaxImageSide),
          bool_of(member(p, "cfg", where), where + ".cfg")};
}

size_t pick_profile(const std::vector<Profile>& profiles, const ProfileChoice& choice) {
  for (size_t i = 0; i < profiles.size(); ++i) {
    const Profile& p = profiles[i];
    if ((!choice.batch || p.batch == choice.batch) && (!choice.width || p.width == choice.width) &&
        (!choice.height || p.height == choice.height))
      return i;
  }
  std::string held;
  for (const auto& p : profiles) held += (held.empty() ? "" : ", ") + p.label();
  throw ContractError("profile: expected one of the manifest's profiles (" + held + "), found none of batch " +
                      std::to_string(choice.batch) + " at " + std::to_string(choice.width) + "x" +
                      std::to_string(choice.height));
}

// A network's I/O at profile `index`: networks[].profiles[index], which must say it is that profile's.
Network network_at(const Json& n, size_t index, const std::string& where) {
  const std::string name = text_field(n, "name", where);
  const Json& list = member(n, "profiles", name);
  const std::string w = name + ".profiles[" + std::to_string(index) + "]";
  if (!list.is_array() || index >= list.size() ||
      int_of(member(list[index], "profile", w), w + ".profile", 0, INT64_MAX) != int64_t(index))
    throw ContractError(name + ".profiles: expected the resolved I/O of profile " + std::to_string(index) +
                        ", found none");
  const Json& io = list[index];
  return {name, file_field(n, "onnx", name), tensors(member(io, "inputs", w), w + ".inputs"),
          tensors(member(io, "outputs", w), w + ".outputs")};
}

Constant parse_constant(const Json& c, const std::string& where) {
  return {text_field(c, "name", where), file_field(c, "file", where), text_field(c, "dtype", where),
          sha256_field(c, where), shape_of(member(c, "shape", where), where + ".shape")};
}

// The file names a manifest's fields refer to (each must have a record in `files`), with the field.
std::vector<std::pair<std::string, std::string>> named_files(const Json& j) {
  std::vector<std::pair<std::string, std::string>> names;
  const Json& networks = member(j, "networks", "manifest");
  for (size_t i = 0; i < networks.size(); ++i) {
    const std::string w = at("networks", i);
    names.emplace_back(file_field(networks[i], "onnx", w), w + ".onnx");
    if (!has_member(networks[i], "external_data")) continue;
    const Json& external = array_of(networks[i]["external_data"], w + ".external_data");
    for (size_t k = 0; k < external.size(); ++k) {
      const std::string name = string_of(external[k], at(w + ".external_data", k));
      check_relative_name(name, at(w + ".external_data", k));
      names.emplace_back(name, at(w + ".external_data", k));
    }
  }
  const Json& constants = member(j, "constants", "manifest");
  for (size_t i = 0; i < constants.size(); ++i) names.emplace_back(file_field(constants[i], "file", at("constants", i)), at("constants", i) + ".file");
  if (has_member(j, "tokenizers"))
    for (const auto& item : object_of(j["tokenizers"], "tokenizers").items())
      names.emplace_back(file_field(item.value(), "file", "tokenizers." + item.key()), "tokenizers." + item.key() + ".file");
  return names;
}

std::vector<FileRecord> file_records(const Json& j) {
  std::vector<FileRecord> files;
  for (const auto& [name, record] : object_of(member(j, "files", "manifest"), "files").items()) {
    const std::string w = "files." + name;
    check_relative_name(name, "files");
    files.push_back({name, sha256_field(record, w), w, int_of(member(record, "size", w), w + ".size", 0, kMaxFileBytes)});
  }
  const Json& networks = member(j, "networks", "manifest");
  for (size_t i = 0; i < networks.size(); ++i) {
    if (!has_member(networks[i], "engine") || networks[i]["engine"].is_null()) continue;
    const std::string w = at("networks", i) + ".engine";
    const Json& engine = object_of(networks[i]["engine"], w);
    files.push_back({file_field(engine, "file", w), sha256_field(engine, w), w, -1});
  }
  return files;
}

void check_schema_version(const Json& root) {
  const int64_t version = int_of(member(root, "schema_version", "manifest"), "manifest.schema_version", INT64_MIN, INT64_MAX);
  const std::string found = "manifest.schema_version: expected " + std::to_string(kSchemaVersion) + ", found " +
                            std::to_string(version);
  if (version < kSchemaVersion)  // never read an older layout as this one
    throw ContractError(found + " (" + kReexportHint + ")");
  if (version != kSchemaVersion) throw ContractError(found + " (re-export, or use a host built for that schema)");
}

}  // namespace

std::string Profile::label() const {
  return "b" + std::to_string(batch) + " " + std::to_string(width) + "x" + std::to_string(height);
}

int64_t Tensor::count() const { return checked_product(shape, kMaxElements, name + ".shape"); }

const Tensor& Network::input(const std::string& tensor) const { return find(inputs, tensor, name + ".inputs"); }
const Tensor& Network::output(const std::string& tensor) const { return find(outputs, tensor, name + ".outputs"); }

Manifest Manifest::load(const std::string& artifacts_dir, const ProfileChoice& choice) {
  auto dir = std::make_shared<Directory>(artifacts_dir, "artifacts");
  const RegularFile file(*dir, "manifest.json", "manifest", kMaxManifestBytes);
  Manifest m = parse(file.read_all(), choice);
  m.dir_ = dir;
  return m;
}

Manifest Manifest::parse(const std::string& text, const ProfileChoice& choice) {
  Manifest m;
  m.json_ = parse_json(text, "manifest");
  const Json& root = object_of(m.json_, "manifest");
  check_schema_version(root);
  m.schema_version = kSchemaVersion;
  m.precision = text_field(root, "precision", "manifest");
  const Json& profiles = array_of(member(root, "profiles", "manifest"), "manifest.profiles");
  for (size_t i = 0; i < profiles.size(); ++i) m.profiles.push_back(parse_profile(profiles[i], at("profiles", i)));
  if (m.profiles.empty()) throw ContractError("manifest.profiles: expected at least one profile, found none");
  m.profile_index = pick_profile(m.profiles, choice);
  m.profile = m.profiles[m.profile_index];
  const Json& networks = array_of(member(root, "networks", "manifest"), "manifest.networks");
  for (size_t i = 0; i < networks.size(); ++i) {
    Network network = network_at(networks[i], m.profile_index, at("networks", i));
    m.networks[network.name] = network;
  }
  const Json& constants = array_of(member(root, "constants", "manifest"), "manifest.constants");
  for (size_t i = 0; i < constants.size(); ++i) m.constants.push_back(parse_constant(constants[i], at("constants", i)));
  m.files_ = file_records(root);
  const Json& records = root["files"];
  for (const auto& [name, where] : named_files(root))
    if (!records.contains(name)) throw ContractError(where + ": expected a size + sha256 record in files for " + name + ", found none");
  return m;
}

const Directory& Manifest::directory() const {
  if (!dir_) throw ContractError("manifest: expected an artifacts directory, found a manifest parsed from text");
  return *dir_;
}

const Network& Manifest::network(const std::string& name) const {
  auto it = networks.find(name);
  if (it == networks.end()) throw ContractError("networks: expected a network named " + name + ", found none");
  return it->second;
}

SchedulerTable Manifest::table(const std::string& scheduler, int64_t steps) const {
  const std::string where = "schedulers." + scheduler;
  const Json& tables = member(member(member(json_, "schedulers", "manifest"), scheduler, "schedulers"), "tables", where);
  const std::string key = std::to_string(steps);
  if (!object_of(tables, where + ".tables").contains(key)) {
    std::string stored;
    for (const auto& item : tables.items()) stored += " " + item.key();
    throw ContractError(where + ".tables: expected a table for " + key + " steps, found tables for" + stored);
  }
  const std::string w = where + ".tables[\"" + key + "\"]";
  const Json& t = object_of(tables[key], w);
  const Json& columns = array_of(member(t, "columns", w), w + ".columns");
  bool same = columns.size() == kColumns.size();
  for (size_t i = 0; same && i < columns.size(); ++i) same = columns[i].is_string() && columns[i] == kColumns[i];
  if (!same) throw ContractError(w + ".columns: expected the 12 step-graph columns p..log_var_max, found " + describe(columns));
  SchedulerTable table{text_field(t, "kind", w), int_of(member(t, "num_inference_steps", w), w + ".num_inference_steps", steps, steps),
                       f32_of(member(t, "init_noise_sigma", w), w + ".init_noise_sigma"), {}, {}, {}};
  const Json& timesteps = array_of(member(t, "timesteps", w), w + ".timesteps");
  for (size_t i = 0; i < timesteps.size(); ++i) table.timesteps.push_back(int_of(timesteps[i], at(w + ".timesteps", i), 0, INT32_MAX));
  const Json& stochastic = array_of(member(t, "stochastic", w), w + ".stochastic");
  for (size_t i = 0; i < stochastic.size(); ++i) table.stochastic.push_back(bool_of(stochastic[i], at(w + ".stochastic", i)));
  const Json& rows = array_of(member(t, "coefficients", w), w + ".coefficients");
  for (size_t i = 0; i < rows.size(); ++i) {
    const Json& row = array_of(rows[i], at(w + ".coefficients", i));
    if (row.size() != kColumns.size())
      throw ContractError(at(w + ".coefficients", i) + ": expected a row of 12, found a row of " + std::to_string(row.size()));
    Row r;
    for (size_t k = 0; k < r.size(); ++k) r[k] = f32_of(row[k], at(at(w + ".coefficients", i), k));  // as numpy's float32 cast
    table.rows.push_back(r);
  }
  if (table.rows.size() != table.timesteps.size() || table.stochastic.size() != table.timesteps.size() ||
      table.timesteps.size() != static_cast<size_t>(steps))
    throw ContractError(w + ": expected " + key + " timesteps, coefficient rows and stochastic flags, found " +
                        std::to_string(table.timesteps.size()) + ", " + std::to_string(table.rows.size()) + " and " +
                        std::to_string(table.stochastic.size()));
  return table;
}

std::vector<float> Manifest::constant(const std::string& name) const {
  for (const auto& c : constants) {
    if (c.name != name) continue;
    const std::string where = "constants." + name;
    if (c.dtype != "float32") throw ContractError(where + ".dtype: expected float32, found " + c.dtype);
    const int64_t count = checked_product(c.shape, kMaxElements, where + ".shape");
    const RegularFile file(directory(), c.file, where + ".file", count * int64_t{sizeof(float)});
    if (file.sha256() != c.sha256) throw ContractError(where + ": " + c.file + " does not match its sha256");
    std::vector<float> values = file.read_f32(count);  // raw little-endian float32
    for (size_t i = 0; i < values.size(); ++i)
      if (!std::isfinite(values[i]))
        throw ContractError(where + ": expected finite float32 values, found " + std::to_string(values[i]) + " at element " + std::to_string(i));
    return values;
  }
  throw ContractError("constants: expected a constant named " + name + ", found none");
}

}  // namespace ktrt
