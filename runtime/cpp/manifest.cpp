#include "manifest.hpp"

#include <fstream>
#include <sstream>

#include "sha256.hpp"

namespace ktrt {
namespace {

// The manifest schema version this host understands (runtime/contract/manifest.py SCHEMA_VERSION) and
// the first kandinsky-trt writing it (MIN_PRODUCER_VERSION).
constexpr int64_t kSchemaVersion = 3;
constexpr const char* kMinProducer = "0.3.0";

const nlohmann::json& field(const nlohmann::json& j, const std::string& key, const std::string& where) {
  if (!j.is_object() || !j.contains(key))
    throw ContractError(where + "." + key + ": expected the field, found none");
  return j.at(key);
}

template <typename T>
T get(const nlohmann::json& j, const std::string& key, const std::string& where) {
  const nlohmann::json& value = field(j, key, where);
  try {
    return value.get<T>();
  } catch (const nlohmann::json::exception&) {
    throw ContractError(where + "." + key + ": expected a value of another type, found " + value.dump());
  }
}

std::vector<Tensor> tensors(const nlohmann::json& list, const std::string& where) {
  std::vector<Tensor> out;
  for (const auto& t : list) {
    Tensor tensor{get<std::string>(t, "name", where), get<std::string>(t, "dtype", where),
                  get<std::vector<int64_t>>(t, "shape", where)};
    for (int64_t d : tensor.shape)
      if (d < 1) throw ContractError(where + " " + tensor.name + ".shape: expected dims >= 1, found " + std::to_string(d));
    out.push_back(tensor);
  }
  return out;
}

const Tensor& find(const std::vector<Tensor>& list, const std::string& name, const std::string& where) {
  for (const auto& t : list)
    if (t.name == name) return t;
  throw ContractError(where + ": expected a tensor named " + name + ", found none");
}

// The file names a manifest's fields refer to (each must have a record in `files`).
std::vector<std::string> named_files(const nlohmann::json& j) {
  std::vector<std::string> names;
  for (const auto& n : j.at("networks")) {
    names.push_back(n.at("onnx").get<std::string>());
    if (n.contains("external_data"))
      for (const auto& e : n.at("external_data")) names.push_back(e.get<std::string>());
  }
  for (const auto& c : j.at("constants")) names.push_back(c.at("file").get<std::string>());
  const nlohmann::json tokenizers = j.value("tokenizers", nlohmann::json::object());  // kept alive for the loop
  for (const auto& item : tokenizers.items()) names.push_back(item.value().at("file").get<std::string>());
  return names;
}

Profile parse_profile(const nlohmann::json& p, const std::string& where) {
  return {get<int64_t>(p, "batch", where), get<int64_t>(p, "height", where), get<int64_t>(p, "width", where),
          get<bool>(p, "cfg", where)};
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
Network network_at(const nlohmann::json& n, size_t index) {
  const std::string name = get<std::string>(n, "name", "networks[]");
  const auto& list = field(n, "profiles", name);
  if (!list.is_array() || index >= list.size() || get<int64_t>(list.at(index), "profile", name) != int64_t(index))
    throw ContractError(name + ".profiles: expected the resolved I/O of profile " + std::to_string(index) +
                        ", found none");
  const auto& io = list.at(index);
  const std::string where = name + ".profiles[" + std::to_string(index) + "]";
  return {name, get<std::string>(n, "onnx", name), tensors(field(io, "inputs", where), where + ".inputs"),
          tensors(field(io, "outputs", where), where + ".outputs")};
}

}  // namespace

std::string Profile::label() const {
  return "b" + std::to_string(batch) + " " + std::to_string(width) + "x" + std::to_string(height);
}

size_t Tensor::count() const {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

const Tensor& Network::input(const std::string& tensor) const { return find(inputs, tensor, name + ".inputs"); }
const Tensor& Network::output(const std::string& tensor) const { return find(outputs, tensor, name + ".outputs"); }

Manifest Manifest::load(const std::string& artifacts_dir, const ProfileChoice& choice) {
  Manifest m;
  m.dir_ = artifacts_dir;
  const std::string file = artifacts_dir + "/manifest.json";
  std::ifstream in(file);
  if (!in) throw ContractError("manifest: expected " + file + ", found no readable file");
  try {
    m.json_ = nlohmann::json::parse(in);
  } catch (const nlohmann::json::parse_error& err) {
    throw ContractError("manifest: expected JSON in " + file + ", found a parse error (" + err.what() + ")");
  }
  m.schema_version = get<int64_t>(m.json_, "schema_version", "manifest");
  if (m.schema_version < kSchemaVersion)  // never read an older layout as this one
    throw ContractError("manifest.schema_version: expected " + std::to_string(kSchemaVersion) + ", found " +
                        std::to_string(m.schema_version) + " (written by an older kandinsky-trt; re-export with " +
                        "kandinsky-trt >= " + kMinProducer + ")");
  if (m.schema_version != kSchemaVersion)
    throw ContractError("manifest.schema_version: expected " + std::to_string(kSchemaVersion) + ", found " +
                        std::to_string(m.schema_version) + " (re-export, or use a host built for that schema)");
  m.precision = get<std::string>(m.json_, "precision", "manifest");
  for (const auto& p : field(m.json_, "profiles", "manifest")) m.profiles.push_back(parse_profile(p, "profiles[]"));
  if (m.profiles.empty()) throw ContractError("manifest.profiles: expected at least one profile, found none");
  m.profile_index = pick_profile(m.profiles, choice);
  m.profile = m.profiles[m.profile_index];
  for (const auto& n : field(m.json_, "networks", "manifest")) {
    Network network = network_at(n, m.profile_index);
    m.networks[network.name] = network;
  }
  for (const auto& c : field(m.json_, "constants", "manifest"))
    m.constants.push_back({get<std::string>(c, "name", "constants[]"), get<std::string>(c, "file", "constants[]"),
                           get<std::string>(c, "dtype", "constants[]"), get<std::string>(c, "sha256", "constants[]"),
                           get<std::vector<int64_t>>(c, "shape", "constants[]")});
  const auto& records = field(m.json_, "files", "manifest");
  for (const auto& name : named_files(m.json_))
    if (m.path(name, "file name").empty() || !records.contains(name)) throw ContractError("files: expected a size + sha256 record for " + name + ", found none");
  for (const auto& record : m.files()) m.path(record.file, "files");  // refuses paths that leave the directory
  return m;
}

const Network& Manifest::network(const std::string& name) const {
  auto it = networks.find(name);
  if (it == networks.end()) throw ContractError("networks: expected a network named " + name + ", found none");
  return it->second;
}

SchedulerTable Manifest::table(const std::string& scheduler, int64_t steps) const {
  const std::string where = "schedulers." + scheduler;
  const auto& tables = field(field(field(json_, "schedulers", "manifest"), scheduler, "schedulers"), "tables", where);
  const std::string key = std::to_string(steps);
  if (!tables.contains(key)) {
    std::string stored;
    for (const auto& item : tables.items()) stored += " " + item.key();
    throw ContractError(where + ".tables: expected a table for " + key + " steps, found tables for" + stored);
  }
  const auto& t = tables.at(key);
  if (get<std::vector<std::string>>(t, "columns", where) != std::vector<std::string>(kColumns.begin(), kColumns.end()))
    throw ContractError(where + ".columns: expected the 12 step-graph columns p..log_var_max, found " + t.at("columns").dump());
  SchedulerTable table{get<std::string>(t, "kind", where), get<int64_t>(t, "num_inference_steps", where),
                       get<float>(t, "init_noise_sigma", where), get<std::vector<int64_t>>(t, "timesteps", where),
                       get<std::vector<bool>>(t, "stochastic", where), {}};
  for (const auto& row : field(t, "coefficients", where)) {
    const auto values = row.get<std::vector<double>>();
    if (values.size() != kColumns.size())
      throw ContractError(where + ".coefficients: expected rows of 12, found a row of " + std::to_string(values.size()));
    Row r;
    for (size_t i = 0; i < r.size(); ++i) r[i] = static_cast<float>(values[i]);  // as numpy's float32 cast
    table.rows.push_back(r);
  }
  if (table.rows.size() != table.timesteps.size() || table.stochastic.size() != table.timesteps.size())
    throw ContractError(where + ": expected as many coefficient rows and stochastic flags as timesteps");
  return table;
}

std::vector<float> Manifest::constant(const std::string& name) const {
  for (const auto& c : constants) {
    if (c.name != name) continue;
    if (c.dtype != "float32") throw ContractError("constants." + name + ".dtype: expected float32, found " + c.dtype);
    const std::string file = path(c.file, "constants." + name + ".file");
    if (sha256_file(file) != c.sha256) throw ContractError("constants." + name + ": " + file + " does not match its sha256");
    size_t count = 1;
    for (int64_t d : c.shape) count *= static_cast<size_t>(d);
    std::ifstream in(file, std::ios::binary | std::ios::ate);
    const auto bytes = static_cast<size_t>(in.tellg());
    if (bytes != count * sizeof(float))
      throw ContractError("constants." + name + ": expected " + std::to_string(count * sizeof(float)) +
                          " bytes for its shape, found " + std::to_string(bytes));
    std::vector<float> values(count);  // raw little-endian float32, as x86-64 and aarch64 hosts store it
    in.seekg(0);
    in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(bytes));
    return values;
  }
  throw ContractError("constants: expected a constant named " + name + ", found none");
}

std::vector<FileRecord> Manifest::files() const {
  std::vector<FileRecord> files;
  for (const auto& [name, record] : json_.at("files").items())
    files.push_back({name, get<std::string>(record, "sha256", "files." + name), get<int64_t>(record, "size", "files." + name)});
  for (const auto& n : json_.at("networks"))
    if (n.contains("engine") && !n.at("engine").is_null())
      files.push_back({get<std::string>(n.at("engine"), "file", "engine"), n.at("engine").value("sha256", ""), -1});
  return files;
}

std::string Manifest::path(const std::string& file, const std::string& where) const {
  // Every file lives inside the artifacts directory: no absolute paths, no "..", no empty names.
  std::stringstream parts(file);
  std::string part;
  bool escapes = file.empty() || file.front() == '/' || file.find('\\') != std::string::npos;
  while (std::getline(parts, part, '/')) escapes = escapes || part == "..";
  if (escapes) throw ContractError(where + ": expected a file name inside the artifacts directory, found '" + file + "'");
  return dir_ + "/" + file;
}

}  // namespace ktrt
