// manifest.json as a C++ host reads it: schema version, the profiles and the one it picks, each
// network's ordered I/O at that profile, files and their sha256, constants, scheduler coefficient
// tables. The manifest is untrusted: every field is read with its expected JSON type and range
// (checked_json.hpp), every file it names is opened as a regular file inside the directory
// (safe_file.hpp). Every problem is a ContractError whose message names the manifest field, what
// was expected and what was found.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "checked_json.hpp"
#include "safe_file.hpp"

namespace ktrt {

// The step graphs' coefficient columns, in order (runtime/contract/spec.py COEFFICIENT_COLUMNS).
constexpr std::array<const char*, 12> kColumns = {"p", "q", "clip_min", "clip_max", "u", "v", "w", "r",
                                                  "s", "learned", "log_var_min", "log_var_max"};
using Row = std::array<float, kColumns.size()>;

constexpr int64_t kMaxManifestBytes = int64_t{64} << 20;
constexpr int64_t kMaxFileBytes = int64_t{1} << 50;  // a recorded file size (external data can be GBs)
constexpr int64_t kMaxBatch = 1 << 16, kMaxImageSide = 1 << 20, kMaxSteps = 100000;

struct Tensor {
  std::string name, dtype;
  std::vector<int64_t> shape;  // dims in [1, kMaxDim], element count <= kMaxElements (checked)
  int64_t count() const;       // number of elements
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
  std::string file, sha256, where;  // where: the manifest field that records it
  int64_t size = -1;                // -1 = not recorded (engine plans)
};

struct SchedulerTable {
  std::string kind;
  int64_t steps = 0;
  float init_noise_sigma = 1.0f;
  std::vector<int64_t> timesteps;
  std::vector<bool> stochastic;
  std::vector<Row> rows;  // every value finite in float32
};

class Manifest {
 public:
  // Reads ARTIFACTS/manifest.json (a regular file of at most kMaxManifestBytes) and parses it.
  static Manifest load(const std::string& artifacts_dir, const ProfileChoice& choice = {});
  // Parses manifest text without touching any file (the fuzz target's entry point).
  static Manifest parse(const std::string& text, const ProfileChoice& choice = {});

  int64_t schema_version = 0;
  std::string precision;
  std::vector<Profile> profiles;
  size_t profile_index = 0;  // the profile picked; `networks` hold their I/O at it
  Profile profile;
  std::map<std::string, Network> networks;
  std::vector<Constant> constants;

  const Network& network(const std::string& name) const;
  SchedulerTable table(const std::string& scheduler, int64_t steps) const;
  // The constant's float32 values; its byte size, sha256 and finiteness are checked.
  std::vector<float> constant(const std::string& name) const;
  // Every file the manifest names: the `files` records (graphs, external data, constants,
  // tokenizers: size + sha256) and the engine plans (sha256; size -1 = not recorded).
  const std::vector<FileRecord>& files() const { return files_; }
  const Directory& directory() const;

 private:
  std::shared_ptr<Directory> dir_;
  Json json_;
  std::vector<FileRecord> files_;
};

}  // namespace ktrt
