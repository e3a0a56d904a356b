// ktrt_host_contract: what a C++ host does with an artifacts directory, minus running the networks.
//
//   ktrt_host_contract ARTIFACTS RECORDING [--size WIDTHxHEIGHT] [--batch N] [--tolerance 1e-6]
//
// 1. reads manifest.json and checks its schema version; picks the profile of --size and --batch
//    (default: the first), whose resolved I/O every later step uses;
// 2. verifies every file the manifest names (inside the directory, sha256 where recorded);
// 3. lists the bindings of the loop's network and step graph, by name, dtype and shape;
// 4. loads every constant (byte size against its shape, sha256);
// 5. loads the scheduler's coefficient table and replays the step update over the model outputs
//    the Python loop recorded (RECORDING/recording.json), comparing every step's latents with it:
//    per step (each from the Python loop's previous latents and x0: this decides) and free-running
//    (reported: float32 exp differs from ONNX Runtime's in the last ulp, which DDPM's learned
//    variance carries from step to step).
// Exit status: 0 reproduced within the tolerance, 1 not, 2 a contract error (one line on stderr).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

#include "manifest.hpp"
#include "sha256.hpp"
#include "step_update.hpp"

namespace {

using ktrt::ContractError;

std::vector<float> read_f32(const std::string& path, size_t count, const std::string& what) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw ContractError(what + ": expected a readable file " + path + ", found none");
  const auto bytes = static_cast<size_t>(in.tellg());
  if (bytes != count * sizeof(float))
    throw ContractError(what + ": expected " + std::to_string(count * sizeof(float)) + " bytes of float32, found " +
                        std::to_string(bytes));
  std::vector<float> values(count);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(bytes));
  return values;
}

std::string shape_text(const ktrt::Tensor& t) {
  std::string s = "[";
  for (size_t i = 0; i < t.shape.size(); ++i) s += (i ? "," : "") + std::to_string(t.shape[i]);
  return s + "]";
}

void verify_files(const ktrt::Manifest& m) {
  size_t bytes = 0;
  const auto files = m.files();
  for (const auto& record : files) {
    const std::string path = m.path(record.file, "files");
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) throw ContractError("files: expected " + path + ", found none");
    const auto size = static_cast<int64_t>(in.tellg());
    if (record.size >= 0 && size != record.size)
      throw ContractError("files: " + path + " has " + std::to_string(size) + " bytes, the manifest records " +
                          std::to_string(record.size));
    if (ktrt::sha256_file(path) != record.sha256)
      throw ContractError("files: " + path + " does not match the sha256 in the manifest");
    bytes += static_cast<size_t>(size);
  }
  std::printf("files: %zu named, size and sha256 verified (%zu bytes)\n", files.size(), bytes);
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

double relative(const std::vector<float>& ours, const float* want, size_t n) {
  double diff = 0.0, scale = 0.0;
  for (size_t j = 0; j < n; ++j) {
    diff = std::max(diff, std::fabs(double(ours[j]) - double(want[j])));
    scale = std::max(scale, std::fabs(double(want[j])));
  }
  return scale > 0 ? diff / scale : diff;
}

Replay replay(const ktrt::Manifest& m, const std::string& dir, const nlohmann::json& rec) {
  const auto& step_graph = m.network(rec.at("step_graph").get<std::string>());
  const auto shapes = ktrt::StepShapes::of(step_graph, m.profile.cfg);
  const auto table = m.table(rec.at("scheduler").get<std::string>(), rec.at("num_inference_steps").get<int64_t>());
  const size_t n = table.rows.size(), latent = shapes.latent_count(), output = shapes.output_count();
  const auto& files = rec.at("files");
  auto file = [&](const char* key) { return dir + "/" + files.at(key).get<std::string>(); };
  const auto start = read_f32(file("latents"), latent, "latents");
  const auto outputs = read_f32(file("model_outputs"), n * output, "model_outputs");
  const auto noise = read_f32(file("noise"), n * latent, "noise");
  const auto expected = read_f32(file("expected"), n * latent, "expected");
  const auto expected_x0 = read_f32(file("expected_x0"), n * latent, "expected_x0");
  const float guidance = rec.at("guidance_scale").get<float>();
  ktrt::StepState free{start, std::vector<float>(latent, 0.0f)};
  Replay result{n, 0.0, 0.0};
  for (size_t i = 0; i < n; ++i) {
    const std::vector<float> out(outputs.begin() + i * output, outputs.begin() + (i + 1) * output);
    const std::vector<float> eta(noise.begin() + i * latent, noise.begin() + (i + 1) * latent);
    ktrt::StepState forced = i == 0 ? ktrt::StepState{start, std::vector<float>(latent, 0.0f)}
        : ktrt::StepState{std::vector<float>(expected.begin() + (i - 1) * latent, expected.begin() + i * latent),
                          std::vector<float>(expected_x0.begin() + (i - 1) * latent, expected_x0.begin() + i * latent)};
    ktrt::step_update(table.rows[i], shapes, guidance, out, eta, forced);
    ktrt::step_update(table.rows[i], shapes, guidance, out, eta, free);
    result.per_step = std::max(result.per_step, relative(forced.latents, &expected[i * latent], latent));
    result.free_running = std::max(result.free_running, relative(free.latents, &expected[i * latent], latent));
  }
  return result;
}

struct Args {
  std::string artifacts, recording;
  ktrt::ProfileChoice choice;
  double tolerance = 1e-6;
};

Args parse_args(int argc, char** argv) {
  const std::string usage = "usage: ktrt_host_contract ARTIFACTS RECORDING [--size WIDTHxHEIGHT] [--batch N] "
                            "[--tolerance 1e-6]";
  if (argc < 3 || argc % 2 == 0) throw ContractError(usage);
  Args args{argv[1], argv[2], {}, 1e-6};
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--tolerance") {
      args.tolerance = std::stod(value);
    } else if (flag == "--batch") {
      args.choice.batch = std::stoll(value);
    } else if (flag == "--size" && value.find('x') != std::string::npos) {
      args.choice.width = std::stoll(value.substr(0, value.find('x')));
      args.choice.height = std::stoll(value.substr(value.find('x') + 1));
    } else {
      throw ContractError(usage + " (found " + flag + " " + value + ")");
    }
  }
  return args;
}

int run(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  const double tolerance = args.tolerance;
  const std::string& recording = args.recording;
  const auto m = ktrt::Manifest::load(args.artifacts, args.choice);
  std::printf("manifest: schema %lld, %s, %zu profile(s), serving profile %zu: batch %lld %lldx%lld cfg %s\n",
              (long long)m.schema_version, m.precision.c_str(), m.profiles.size(), m.profile_index,
              (long long)m.profile.batch, (long long)m.profile.width, (long long)m.profile.height,
              m.profile.cfg ? "on" : "off");
  verify_files(m);
  std::ifstream rec_in(recording + "/recording.json");
  if (!rec_in) throw ContractError("recording: expected " + recording + "/recording.json, found none");
  const auto rec = nlohmann::json::parse(rec_in);
  print_bindings(m.network(rec.at("network").get<std::string>()));
  print_bindings(m.network(rec.at("step_graph").get<std::string>()));
  for (const auto& c : m.constants)
    std::printf("  constant %-18s %zu float32 values\n", c.name.c_str(), m.constant(c.name).size());
  const Replay r = replay(m, recording, rec);
  const bool ok = r.per_step <= tolerance;
  std::printf("free-running over all steps: max relative difference %.3e\n", r.free_running);
  std::printf("replayed %zu steps of %s: max relative difference to the Python loop per step %.3e (tolerance %.0e) %s\n",
              r.steps, rec.at("step_graph").get<std::string>().c_str(), r.per_step, tolerance, ok ? "ok" : "FAIL");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const ContractError& err) {
    std::fprintf(stderr, "error: %s\n", err.what());
  } catch (const nlohmann::json::exception& err) {
    std::fprintf(stderr, "error: recording: expected the documented JSON fields (%s)\n", err.what());
  } catch (const std::exception& err) {
    std::fprintf(stderr, "error: %s\n", err.what());
  }
  return 2;
}
