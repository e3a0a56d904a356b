// manifest.json as a C++ host reads it: schema version, the profiles and the one it picks, each
// network's ordered I/O at that profile, files and their sha256, constants, scheduler coefficient tables. Every problem is a ContractError whose
// message names the manifest field, what was expected and what was found.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace ktrt {

struct ContractError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The step graphs' coefficient columns, in order (runtime/contract/spec.py COEFFICIENT_COLUMNS).
constexpr std::array<const char*, 12> kColumns = {"p", "q", "clip_min", "clip_max", "u", "v", "w", "r",
                                                  "s", "learned", "log_var_min", "log_var_max"};
using Row = std::array<float, kColumns.size()>;

struct Tensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  size_t count() const;  // number of elements
};

struct Network {
  std::string name, onnx;
  std::vector<Tensor> inputs, outputs;
  const Tensor& input(const std::string& tensor) const;
  const Tensor& output(const std::string& tensor) const;
};

struct Profile {
  int64_t batch = 0, height = 0, width = 0;
  bool cfg = true;
  std::string label() const;  // "b1 512x512" (batch, width x height)
};

// Which profile a host serves: the first of this batch and size; 0 = any (the default is the first).
struct ProfileChoice {
  int64_t batch = 0, width = 0, height = 0;
};

struct Constant {
  std::string name, file, dtype, sha256;
  std::vector<int64_t> shape;
};

struct FileRecord {
  std::string file, sha256;
  int64_t size = -1;
};

struct SchedulerTable {
  std::string kind;
  int64_t steps = 0;
  float init_noise_sigma = 1.0f;
  std::vector<int64_t> timesteps;
  std::vector<bool> stochastic;
  std::vector<Row> rows;
};

class Manifest {
 public:
  static Manifest load(const std::string& artifacts_dir, const ProfileChoice& choice = {});

  int64_t schema_version = 0;
  std::string precision;
  std::vector<Profile> profiles;
  size_t profile_index = 0;  // the profile picked; `networks` hold their I/O at it
  Profile profile;
  std::map<std::string, Network> networks;
  std::vector<Constant> constants;

  const Network& network(const std::string& name) const;
  SchedulerTable table(const std::string& scheduler, int64_t steps) const;
  // The constant's float32 values; its byte size and sha256 are checked against the manifest.
  std::vector<float> constant(const std::string& name) const;
  // Every file the manifest names: the `files` records (graphs, external data, constants,
  // tokenizers: size + sha256) and the engine plans (sha256; size -1 = not recorded).
  std::vector<FileRecord> files() const;
  std::string path(const std::string& file, const std::string& field) const;

 private:
  std::string dir_;
  nlohmann::json json_;
};

}  // namespace ktrt
