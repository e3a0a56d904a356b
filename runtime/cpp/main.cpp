// ktrt_host_contract: what a C++ host does with an artifacts directory, minus running the networks.
//
//   ktrt_host_contract ARTIFACTS RECORDING [--size WIDTHxHEIGHT] [--batch N] [--tolerance 1e-6]
//
// 1. reads manifest.json and checks its schema version; picks the profile of --size and --batch
//    (default: the first), whose resolved I/O every later step uses;
// 2. verifies every file the manifest names (inside the directory, sha256 where recorded);
// 3. lists the bindings of the loop's network and step graph, by name, dtype and shape;
// 4. loads every constant (byte size against its shape, sha256);
// 5. loads the scheduler coefficient table of every latents row (the per-row contract: each row names its
//    table, its position in it and its guidance scale, so rows may be at different steps) and replays
//    the step update over the model outputs the Python loop recorded (RECORDING/recording.json),
//    comparing every step's latents with it:
//    per step (each from the Python loop's previous latents and x0: this decides) and free-running
//    (reported: float32 exp differs from ONNX Runtime's in the last ulp, which DDPM's learned
//    variance carries from step to step).
// Exit status: 0 reproduced within the tolerance, 1 not (or any NaN/Inf in the replay), 2 a contract
// error (one line on stderr naming the field). Manifest, recording and every file they name are untrusted
// (see checked_json.hpp, safe_file.hpp).
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "manifest.hpp"
#include "recording.hpp"
#include "safe_file.hpp"
#include "step_update.hpp"

namespace {

using ktrt::ContractError;

std::string shape_text(const ktrt::Tensor& t) {
  std::string s = "[";
  for (size_t i = 0; i < t.shape.size(); ++i) s += (i ? "," : "") + std::to_string(t.shape[i]);
  return s + "]";
}

void verify_files(const ktrt::Manifest& m) {
  int64_t bytes = 0;
  for (const auto& record : m.files()) {
    const ktrt::RegularFile file(m.directory(), record.file, record.where, ktrt::kMaxFileBytes);
    if (record.size >= 0 && file.size() != record.size)
      throw ContractError(record.where + ": " + record.file + " has " + std::to_string(file.size()) +
                          " bytes, the manifest records " + std::to_string(record.size));
    if (file.sha256() != record.sha256)
      throw ContractError(record.where + ": " + record.file + " does not match the sha256 in the manifest");
    bytes += file.size();
  }
  std::printf("files: %zu named, size and sha256 verified (%lld bytes)\n", m.files().size(), (long long)bytes);
}

void print_bindings(const ktrt::Network& n) {
  for (const auto* group : {&n.inputs, &n.outputs})
    for (const auto& t : *group)
      std::printf("  bind %-18s %-6s %-14s %s %s\n", n.name.c_str(), group == &n.inputs ? "input" : "output",
                  t.name.c_str(), t.dtype.c_str(), shape_text(t).c_str());
}

struct Replay {
  size_t steps = 0;
  double per_step = 0.0;  // each step from the Python loop's previous state: the contract itself
  double free_running = 0.0;  // all steps from the C++ state: adds float32 exp's last-ulp drift
};

// max that keeps NaN (std::max(x, NaN) returns x and would report a NaN replay as a match).
double max_keep_nan(double a, double b) { return std::isnan(a) || std::isnan(b) ? std::nan("") : std::max(a, b); }

// max |ours - want| / max |want|; NaN if any value on either side is NaN or infinite.
double relative(const std::vector<float>& ours, const float* want, size_t n) {
  double diff = 0.0, scale = 0.0;
  for (size_t j = 0; j < n; ++j) {
    if (!std::isfinite(ours[j]) || !std::isfinite(want[j])) return std::nan("");
    diff = std::max(diff, std::fabs(double(ours[j]) - double(want[j])));
    scale = std::max(scale, std::fabs(double(want[j])));
  }
  return scale > 0 ? diff / scale : diff;
}

std::vector<float> slice(const std::vector<float>& all, size_t i, size_t n) {
  return std::vector<float>(all.begin() + static_cast<std::ptrdiff_t>(i * n), all.begin() + static_cast<std::ptrdiff_t>((i + 1) * n));
}

struct Recorded {
  std::vector<float> start, start_x0, outputs, noise, expected, expected_x0;
};

// The recorded float32 files, each a regular file in the recording directory of exactly the size the
// step graph's shapes and the step count give (overflow-checked before anything is allocated).
Recorded read_recorded(const ktrt::Directory& dir, const ktrt::Recording& rec, size_t n, const ktrt::StepShapes& shapes) {
  auto read = [&](const char* key, int64_t per_step, int64_t steps) {
    const std::string where = std::string("recording.files.") + key;
    const int64_t count = ktrt::checked_mul(per_step, steps, ktrt::kMaxElements, where);
    const ktrt::RegularFile file(dir, rec.file(key), where, count * int64_t{sizeof(float)});
    return file.read_f32(count);
  };
  const auto latent = static_cast<int64_t>(shapes.latent_count()), steps = static_cast<int64_t>(n);
  return {read("latents", latent, 1), read("x0_prev", latent, 1),
          read("model_outputs", static_cast<int64_t>(shapes.output_count()), steps),
          read("noise", latent, steps), read("expected", latent, steps), read("expected_x0", latent, steps)};
}

// Where each latents row reads its coefficients: its table (read once however many rows use it), its
// position at the first recorded step and its guidance scale. Checked before any file is read.
class RowTables {
 public:
  RowTables(const ktrt::Manifest& m, const ktrt::Recording& rec, size_t batch) : rec_(rec) {
    if (rec.rows.size() != batch)
      throw ContractError("recording.rows: expected " + std::to_string(batch) + " rows (one per latents row of " +
                          rec.step_graph + "), found " + std::to_string(rec.rows.size()));
    for (size_t b = 0; b < batch; ++b) {
      const auto& row = rec.rows[b];
      const auto key = std::make_pair(row.scheduler, row.steps);
      if (tables_.find(key) == tables_.end()) tables_.emplace(key, m.table(row.scheduler, row.steps));
      const auto& table = tables_.at(key);
      // start and steps are in [0, kMaxSteps]: their sum cannot overflow.
      if (row.start + rec.steps > static_cast<int64_t>(table.rows.size()))
        throw ContractError("recording.rows[" + std::to_string(b) + "].start: expected start + steps <= " +
                            std::to_string(table.rows.size()) + " (the rows of table " + row.scheduler + " " +
                            std::to_string(row.steps) + "), found " + std::to_string(row.start) + " + " +
                            std::to_string(rec.steps));
      row_tables_.push_back(&table);
    }
  }

  // Replay step i: row b's coefficient row start_b + i and its guidance scale.
  ktrt::StepRows at(size_t i) const {
    ktrt::StepRows rows;
    for (size_t b = 0; b < row_tables_.size(); ++b) {
      rows.coefficients.push_back(row_tables_[b]->rows[static_cast<size_t>(rec_.rows[b].start) + i]);
      rows.guidance.push_back(rec_.rows[b].guidance_scale);
    }
    return rows;
  }

 private:
  const ktrt::Recording& rec_;
  std::map<std::pair<std::string, int64_t>, ktrt::SchedulerTable> tables_;
  std::vector<const ktrt::SchedulerTable*> row_tables_;  // into tables_ (std::map nodes do not move)
};

Replay replay(const ktrt::Manifest& m, const ktrt::Directory& dir, const ktrt::Recording& rec) {
  const auto& step_graph = m.network(rec.step_graph);
  const auto shapes = ktrt::StepShapes::of(step_graph, m.profile.cfg);
  const RowTables tables(m, rec, shapes.batch);
  const size_t n = static_cast<size_t>(rec.steps), latent = shapes.latent_count(), output = shapes.output_count();
  const Recorded r = read_recorded(dir, rec, n, shapes);
  ktrt::StepState free{r.start, r.start_x0};
  Replay result{n, 0.0, 0.0};
  for (size_t i = 0; i < n; ++i) {
    const std::vector<float> out = slice(r.outputs, i, output), eta = slice(r.noise, i, latent);
    const ktrt::StepRows rows = tables.at(i);
    ktrt::StepState forced = i == 0 ? ktrt::StepState{r.start, r.start_x0}
                                    : ktrt::StepState{slice(r.expected, i - 1, latent), slice(r.expected_x0, i - 1, latent)};
    ktrt::step_update(rows, shapes, out, eta, forced);
    ktrt::step_update(rows, shapes, out, eta, free);
    result.per_step = max_keep_nan(result.per_step, relative(forced.latents, &r.expected[i * latent], latent));
    result.free_running = max_keep_nan(result.free_running, relative(free.latents, &r.expected[i * latent], latent));
  }
  return result;
}

struct Args {
  std::string artifacts, recording;
  ktrt::ProfileChoice choice;
  double tolerance = 1e-6;
};

int64_t positive_int(const std::string& text, const std::string& where) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || v < 1 || v > ktrt::kMaxImageSide)
    throw ContractError(where + ": expected an integer in [1, " + std::to_string(ktrt::kMaxImageSide) + "], found '" + text + "'");
  return v;
}

double tolerance_of(const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !std::isfinite(v) || v < 0)
    throw ContractError("--tolerance: expected a finite number >= 0, found '" + text + "'");
  return v;
}

Args parse_args(int argc, char** argv) {
  const std::string usage = "usage: ktrt_host_contract ARTIFACTS RECORDING [--size WIDTHxHEIGHT] [--batch N] "
                            "[--tolerance 1e-6]";
  if (argc < 3 || argc % 2 == 0) throw ContractError(usage);
  Args args{argv[1], argv[2], {}, 1e-6};
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--tolerance") {
      args.tolerance = tolerance_of(value);
    } else if (flag == "--batch") {
      args.choice.batch = positive_int(value, "--batch");
    } else if (flag == "--size" && value.find('x') != std::string::npos) {
      args.choice.width = positive_int(value.substr(0, value.find('x')), "--size width");
      args.choice.height = positive_int(value.substr(value.find('x') + 1), "--size height");
    } else {
      throw ContractError(usage + " (found " + flag + " " + value + ")");
    }
  }
  return args;
}

int run(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  const auto m = ktrt::Manifest::load(args.artifacts, args.choice);
  std::printf("manifest: schema %lld, %s, %zu profile(s), serving profile %zu: batch %lld %lldx%lld cfg %s\n",
              (long long)m.schema_version, m.precision.c_str(), m.profiles.size(), m.profile_index,
              (long long)m.profile.batch, (long long)m.profile.width, (long long)m.profile.height,
              m.profile.cfg ? "on" : "off");
  verify_files(m);
  const ktrt::Directory dir(args.recording, "recording");
  const ktrt::RegularFile rec_file(dir, "recording.json", "recording", ktrt::kMaxRecordingJsonBytes);
  const auto rec = ktrt::Recording::parse(rec_file.read_all());
  print_bindings(m.network(rec.network));
  print_bindings(m.network(rec.step_graph));
  for (const auto& c : m.constants)
    std::printf("  constant %-18s %zu float32 values\n", c.name.c_str(), m.constant(c.name).size());
  const Replay r = replay(m, dir, rec);
  const bool finite = std::isfinite(r.per_step) && std::isfinite(r.free_running);
  const bool ok = finite && r.per_step <= args.tolerance;
  std::printf("free-running over all steps: max relative difference %.3e\n", r.free_running);
  if (!finite) std::printf("non-finite values (NaN or Inf) in the replay or the recording: a failure\n");
  std::printf("replayed %zu steps of %s: max relative difference to the Python loop per step %.3e (tolerance %.0e) %s\n",
              r.steps, rec.step_graph.c_str(), r.per_step, args.tolerance, ok ? "ok" : "FAIL");
  return ok ? 0 : 1;
}

// Field names and values in a message come from untrusted JSON: control characters are shown as '?'
// so an error stays one line.
std::string one_line(const char* message) {
  std::string text = message;
  for (char& c : text)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const ContractError& err) {
    std::fprintf(stderr, "error: %s\n", one_line(err.what()).c_str());
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
  } catch (const std::exception& err) {  // not expected: every input is checked before use
    std::fprintf(stderr, "error: internal: %s\n", one_line(err.what()).c_str());
  }
  return 2;
}
